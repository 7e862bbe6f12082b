"""The tasks mp_jax reads (SPEC §7): columns, labels, metric, TFDS name; label agreement."""

from pathlib import Path
from typing import NamedTuple

SOURCES = ('glue', 'csv', 'mr', 'bbc', 'tfds')


class Glue(NamedTuple):
  """A GLUE TSV layout: columns found by header name, raw label values and their names."""

  text_a: str
  text_b: str | None
  label: str
  raw_labels: tuple[str, ...]
  names: tuple[str, ...]


GLUE = {
    'qqp': Glue('question1', 'question2', 'is_duplicate', ('0', '1'),
                ('not_duplicate', 'duplicate')),
    'mrpc': Glue('#1 String', '#2 String', 'Quality', ('0', '1'),
                 ('not_equivalent', 'equivalent')),
    'rte': Glue('sentence1', 'sentence2', 'label', ('entailment', 'not_entailment'),
                ('entailment', 'not_entailment')),
    'sst2': Glue('sentence', None, 'label', ('0', '1'), ('negative', 'positive')),
}
# CSV (an optional header row is skipped): 1-based integer labels -> label names.
CSV = {
    'ag_news': ('World', 'Sports', 'Business', 'Sci/Tech'),
    'yelp': ('negative', 'positive'),
}
# The two files of a glue/csv folder: training data, then the held-out file (becomes `test`).
LOCAL_FILES = {'glue': ('train.tsv', 'dev.tsv'), 'csv': ('train.csv', 'test.csv')}
# glue/csv task -> its TFDS dataset (the fallback when the task has no local folder).
TFDS_NAMES = {
    'qqp': 'glue/qqp', 'mrpc': 'glue/mrpc', 'rte': 'glue/rte', 'sst2': 'glue/sst2',
    'ag_news': 'ag_news_subset', 'yelp': 'yelp_polarity_reviews',
}
# GLUE reports F1 of the positive class (label 1) beside accuracy for these.
F1_TASKS = ('mrpc', 'qqp')


def source_of(task):
  """'glue' or 'csv' for a task of those tables, else None."""
  return 'glue' if task in GLUE else 'csv' if task in CSV else None


def label_names(task):
  """Label names of a glue/csv task, in label order."""
  return GLUE[task].names if task in GLUE else CSV[task]


def has_f1(task):
  """Whether the task reports F1 beside accuracy."""
  return task in F1_TASKS


def folder_help(source: str, task: str, folder: Path | None = None) -> str:
  """How to give a glue/csv task as local files: the files a folder needs and the flag."""
  folder = folder or Path('DIR')
  files = ''.join(f'\n  {folder / f}' for f in LOCAL_FILES[source])
  kind = ('GLUE TSVs with their header row' if source == 'glue' else
          f'CSV rows label,title,text or label,text; labels 1-{len(CSV[task])}')
  return (f'put the files in a folder ({kind}):{files}\nand pass --config.data.path={folder} '
          f'(source {source}, task {task}): a data.path folder that exists is read instead of '
          'TFDS')


class LabelMismatch(ValueError):
  """A model evaluated on a dataset whose labels are not the model's labels."""


def is_generic(names):
  """Whether label names are placeholders ('0', '1', ... or HF's 'LABEL_0', ...)."""
  return all(n in (str(i), f'LABEL_{i}') for i, n in enumerate(names))


def labels_match(model_names, data_names):
  """Same count, and the same names in order (case aside) unless either side is generic.

  Generic names carry only a count: a model saved without names (or HF's default LABEL_i)
  cannot say what its labels mean, so refusing it would block every such checkpoint.
  """
  a, b = list(model_names), list(data_names)
  return len(a) == len(b) and (is_generic(a) or is_generic(b)
                               or [x.lower() for x in a] == [x.lower() for x in b])


def check_labels(model_names, data_names, model_where, data_where):
  """LabelMismatch naming both label lists unless `labels_match`."""
  if not labels_match(model_names, data_names):
    what = 'count' if len(model_names) != len(data_names) else 'names'
    raise LabelMismatch(
        f'the model ({model_where}) has {len(model_names)} labels {list(model_names)}, the '
        f'dataset ({data_where}) has {len(data_names)} labels {list(data_names)}: the label '
        f'{what} differ; evaluate on the task the model was trained on')

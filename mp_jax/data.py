"""Task loaders (GLUE TSV, CSV, mr, bbc, TFDS), seeded splits, encoding and bucketed batches.

Splits: sources with a held-out file (GLUE dev.tsv, CSV test.csv, TFDS validation/test) use it as
`test` (GLUE test labels are hidden) and carve `dev` from train by a seeded `dev_fraction` (if 0,
`dev` is the held-out file too); `mr` and `bbc` get seeded train/dev/test fractions after dropping
exact duplicate texts (first kept), so no text is in two splits.

Real files: a GLUE pair row with one empty sentence is kept (`[CLS] a [SEP] [SEP]`) and counted in
one warning per file; a CSV whose first row is a header (`Class Index,Title,Description`) has it
skipped with a note. glue/csv tasks whose `data.path` folder is missing load from TFDS if installed.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from absl import logging

from mp_jax import pairs

csv.field_size_limit(sys.maxsize)

SPLITS = ('train', 'dev', 'test')


class DataError(ValueError):
  """Bad or missing input data (message names the file and line)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled text or text pair."""
  text_a: str
  text_b: str | None
  label: int


class Dataset(dict):
  """Split name -> list[Example], plus `label_names`."""
  def __init__(self, splits: dict[str, list[Example]], label_names: Sequence[str]):
    super().__init__(splits)
    self.label_names = list(label_names)

  @property
  def num_labels(self) -> int:
    return len(self.label_names)


# The two files of a glue/csv folder: training data, then the held-out file (becomes `test`).
LOCAL_FILES = {'glue': ('train.tsv', 'dev.tsv'), 'csv': ('train.csv', 'test.csv')}
# GLUE TSV: (text_a column, text_b column or None, label column, raw label values, label names).
GLUE_LAYOUTS = {
    'qqp': ('question1', 'question2', 'is_duplicate', ('0', '1'), ('not_duplicate', 'duplicate')),
    'mrpc': ('#1 String', '#2 String', 'Quality', ('0', '1'), ('not_equivalent', 'equivalent')),
    'rte': ('sentence1', 'sentence2', 'label', ('entailment', 'not_entailment'),
            ('entailment', 'not_entailment')),
    'sst2': ('sentence', None, 'label', ('0', '1'), ('negative', 'positive')),
}
# CSV (an optional header row is skipped): 1-based integer labels -> label names.
CSV_LABELS = {
    'ag_news': ('World', 'Sports', 'Business', 'Sci/Tech'),
    'yelp': ('negative', 'positive'),
}


def _lines(path: Path) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, decoded line incl. newline); invalid UTF-8 -> DataError."""
  if not path.is_file():
    raise DataError(f'{path}: file not found')
  with open(path, 'rb') as f:
    offset = 0
    for lineno, raw in enumerate(f, 1):
      try:
        line = raw.decode('utf-8')
      except UnicodeDecodeError as e:
        raise DataError(
            f'{path}:{lineno}: invalid UTF-8 at byte offset {offset + e.start}') from None
      if lineno == 1:
        line = line.removeprefix('\ufeff')
      offset += len(raw)
      yield lineno, line


def _nonblank(path: Path) -> Iterator[tuple[int, list[str]]]:
  """Yields (line number, tab-separated fields) of non-blank lines (no quoting, as GLUE)."""
  for lineno, line in _lines(path):
    line = line.rstrip('\r\n')
    if line.strip():
      yield lineno, line.split('\t')


def _label(path: Path, lineno: int, raw: str, known: Sequence[str]) -> int:
  raw = raw.strip()
  if raw not in known:
    raise DataError(f'{path}:{lineno}: unknown label {raw!r}; known labels: {list(known)}')
  return known.index(raw)


def _text(path: Path, lineno: int, text: str, what: str = 'text') -> str:
  text = text.strip()
  if not text:
    raise DataError(f'{path}:{lineno}: empty {what}')
  return text


def read_glue_tsv(path: str | os.PathLike, task: str) -> list[Example]:
  """Reads a labelled GLUE TSV file, locating columns by header name."""
  path = Path(path)
  if task not in GLUE_LAYOUTS:
    raise DataError(f'unknown GLUE task {task!r}; known: {sorted(GLUE_LAYOUTS)}')
  col_a, col_b, col_y, known, _ = GLUE_LAYOUTS[task]
  rows = _nonblank(path)
  _, header = next(rows, (0, None))
  if header is None:
    raise DataError(f'{path}: empty file (no header)')
  header = [h.strip() for h in header]
  missing = [c for c in (col_a, col_b, col_y) if c is not None and c not in header]
  if missing:
    raise DataError(f'{path}:1: header lacks column(s) {missing} for task {task!r}: {header}')
  ia, iy = header.index(col_a), header.index(col_y)
  ib = header.index(col_b) if col_b is not None else None
  out, empty = [], []
  for lineno, fields in rows:
    if len(fields) != len(header):
      raise DataError(f'{path}:{lineno}: malformed row: {len(fields)} fields, header has '
                      f'{len(header)}')
    if ib is None:
      text_a, text_b = _text(path, lineno, fields[ia], col_a), None
    else:  # one empty side is a valid pair (QQP train has empty questions); both is no input
      text_a, text_b = fields[ia].strip(), fields[ib].strip()
      if not (text_a or text_b):
        raise DataError(f'{path}:{lineno}: empty {col_a} and {col_b}')
      if not (text_a and text_b):
        empty.append(lineno)
    out.append(Example(text_a, text_b, _label(path, lineno, fields[iy], known)))
  warn_empty_segments(path, empty, col_a, col_b, 'lines')
  return out


def warn_empty_segments(where: str | os.PathLike, rows: Sequence[int], col_a: str, col_b: str,
                        unit: str) -> None:
  """One warning for the pairs kept with one side empty (`rows`: their lines or record numbers)."""
  if rows:
    logging.warning('%s: kept %d row(s) with an empty %s or %s as an empty segment (%s %s%s)',
                    where, len(rows), col_a, col_b, unit, ', '.join(map(str, rows[:5])),
                    ', ...' if len(rows) > 5 else '')


def is_csv_header(fields: Sequence[str], known: Sequence[str],
                  label_names: Sequence[str] = ()) -> bool:
  """True if a CSV row looks like column names (`Class Index,Title,Description`, `label,text`).

  Every field must be a short name (1-3 words of letters, digits, `_`, `-`; no sentence
  punctuation) and the first field neither a label (`3`) nor a label's name (`Sports`), so a
  data row with a bad label still fails with its line instead of being skipped.
  """
  first = fields[0].strip() if fields else ''
  if first in known or first.lower() in {n.lower() for n in label_names}:
    return False
  return all(re.fullmatch(r'[A-Za-z][\w-]*( [\w-]+){0,2}', f.strip()) and len(f.strip()) <= 32
             for f in fields)


def read_label_csv(path: str | os.PathLike, task: str) -> list[Example]:
  """Reads a `label,title,text` or `label,text` CSV, 1-based labels; a header row is skipped."""
  path = Path(path)
  if task not in CSV_LABELS:
    raise DataError(f'unknown CSV task {task!r}; known: {sorted(CSV_LABELS)}')
  known = [str(i + 1) for i in range(len(CSV_LABELS[task]))]
  reader = csv.reader((line for _, line in _lines(path)), strict=True)
  out, prev, first = [], 0, True
  try:
    for fields in reader:
      lineno, prev = prev + 1, reader.line_num  # a quoted field may span several lines
      if not ''.join(fields).strip():
        continue
      header, first = first and is_csv_header(fields, known, CSV_LABELS[task]), False
      if header:
        logging.info('%s:%d: skipped header row %s', path, lineno, fields)
        continue
      if len(fields) not in (2, 3):
        raise DataError(f'{path}:{lineno}: malformed row: {len(fields)} fields, expected '
                        '2 (label,text) or 3 (label,title,text)')
      text = ' '.join(f.strip() for f in fields[1:] if f.strip()).replace('\\n', ' ')
      out.append(Example(_text(path, lineno, text), None, _label(path, lineno, fields[0], known)))
  except csv.Error as e:
    raise DataError(f'{path}:{reader.line_num}: malformed CSV row: {e}') from None
  return out


def read_mr(path: str | os.PathLike) -> list[Example]:
  """Reads movieReviewSnippets_GroundTruth.txt (id, valence, text); label = sign, 0 dropped."""
  path = Path(path)
  out = []
  for lineno, fields in _nonblank(path):
    if len(fields) != 3:
      raise DataError(f'{path}:{lineno}: malformed row: {len(fields)} fields, expected 3')
    try:
      valence = float(fields[1])
    except ValueError:
      valence = math.nan
    if not math.isfinite(valence):
      raise DataError(f'{path}:{lineno}: valence {fields[1]!r} is not a number')
    text = _text(path, lineno, fields[2])
    if valence != 0:
      out.append(Example(text, None, int(valence > 0)))
  return _dedup(out)


def read_bbc(path: str | os.PathLike) -> tuple[list[Example], list[str]]:
  """Reads `<label>/*.txt` folders (sorted); returns deduplicated examples and label names."""
  path = Path(path)
  if not path.is_dir():
    raise DataError(f'{path}: folder not found')
  labels = sorted(p.name for p in path.iterdir() if p.is_dir())
  if not labels:
    raise DataError(f'{path}: no label sub-folders')
  out = []
  for y, name in enumerate(labels):
    for f in sorted((path / name).glob('*.txt')):
      raw = f.read_bytes()
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError:
        text = raw.decode('cp1252', errors='replace')  # sport/199.txt has a Latin-1 pound sign.
      out.append(Example(_text(f, 1, text), None, y))
  return _dedup(out), labels


def _dedup(examples: list[Example]) -> list[Example]:
  """Drops examples whose (text_a, text_b) was seen before."""
  first = {}
  for ex in examples:
    first.setdefault((ex.text_a, ex.text_b), ex)
  return list(first.values())


def _rng(seed: int, *salt: str | int) -> np.random.Generator:
  keys = [zlib.crc32(s.encode()) if isinstance(s, str) else int(s) for s in salt]
  return np.random.default_rng([int(seed), *keys])


def split(examples: list[Example], *, seed: int, fractions: Sequence[float],
          names: Sequence[str] = SPLITS[1:]) -> dict[str, list[Example]]:
  """Seeded split: `names[i]` gets round(n * fractions[i]) examples, 'train' the rest."""
  if any(f < 0 for f in fractions) or sum(fractions) >= 1:
    raise ValueError(f'split fractions {list(fractions)} must be >= 0 and sum to < 1')
  n = len(examples)
  perm = _rng(seed, 'split').permutation(n)
  out, start = {}, 0
  for name, frac in zip(names, fractions, strict=True):
    k = int(round(n * frac))
    out[name] = [examples[i] for i in np.sort(perm[start:start + k])]
    start += k
  return {'train': [examples[i] for i in np.sort(perm[start:])], **out}


def subsample(ds: Dataset, max_examples: int, seed: int) -> Dataset:
  """Keeps at most `max_examples` per split (seeded, source order kept); 0 keeps all."""
  if max_examples <= 0:
    return ds
  out = {}
  for name, exs in ds.items():
    if len(exs) > max_examples:
      idx = np.sort(_rng(seed, 'subsample', name).permutation(len(exs))[:max_examples])
      exs = [exs[i] for i in idx]
    out[name] = exs
  return Dataset(out, ds.label_names)


def _with_heldout(train: list[Example], heldout: list[Example], seed: int,
                  dev_fraction: float) -> dict[str, list[Example]]:
  if dev_fraction <= 0:
    return {'train': train, 'dev': heldout, 'test': heldout}
  return {**split(train, seed=seed, fractions=[dev_fraction], names=['dev']), 'test': heldout}


def load_task(data_cfg) -> Dataset:
  """Loads the task described by `data_cfg` (source, path, task, seed, fractions, max_examples)."""
  source = data_cfg.source
  seed = int(data_cfg.get('seed', 0))
  dev_fraction = float(data_cfg.get('dev_fraction', 0.1))
  test_fraction = float(data_cfg.get('test_fraction', 0.1))
  path, task = data_cfg.get('path', None), data_cfg.get('task', None)
  if source in ('glue', 'csv'):
    glue = source == 'glue'
    table = GLUE_LAYOUTS if glue else CSV_LABELS
    if task not in table:
      raise DataError(f'unknown {source.upper()} task {task!r}; known: {sorted(table)}')
    folder = Path(path).expanduser() if path else None
    if folder and folder.exists() and not folder.is_dir():  # not "not found": not TFDS
      raise DataError(f'data.path {folder} is a file; expected a folder with '
                      f'{" and ".join(LOCAL_FILES[source])} (source {source}, task {task})')
    if folder and folder.is_dir():
      logging.info('data: %s task %r from folder %s', source, task, folder)
      read = read_glue_tsv if glue else read_label_csv
      train, heldout = (read(folder / f, task) for f in LOCAL_FILES[source])
      names = table[task][4] if glue else table[task]
      ds = Dataset(_with_heldout(train, heldout, seed, dev_fraction), names)
    else:
      ds = _from_tfds(source, task, folder, seed, dev_fraction)
  elif source in ('mr', 'bbc'):
    from mp_jax import fetch  # pylint: disable=g-import-not-at-top
    if source == 'mr':
      examples, names = read_mr(path or fetch.mr_file()), ('negative', 'positive')
    else:
      examples, names = read_bbc(path or fetch.bbc_dir())
    ds = Dataset(split(examples, seed=seed, fractions=[dev_fraction, test_fraction]), names)
  elif source == 'tfds':
    from mp_jax import data_tfds  # pylint: disable=g-import-not-at-top
    ds = data_tfds.load(path or task, seed, dev_fraction)
  else:
    raise DataError(f'unknown data source {source!r}; known: glue, csv, mr, bbc, tfds')
  return subsample(ds, int(data_cfg.get('max_examples', 0) or 0), seed)


def _from_tfds(source: str, task: str, folder: Path | None, seed: int,
               dev_fraction: float) -> Dataset:
  """The task from tensorflow-datasets when installed, else one error that says both ways."""
  from mp_jax import data_tfds  # pylint: disable=g-import-not-at-top
  name = data_tfds.TASK_NAMES.get(task)
  where = f'folder {folder} not found' if folder else 'data.path is not set'
  if name and data_tfds.available():
    logging.info('data: %s; %s task %r from TFDS %s', where, source, task, name)
    try:
      return data_tfds.load(name, seed, dev_fraction)
    except DataError as e:  # say which folder the config looked in first
      raise DataError(f'{e}\n(config data.path: {where})') from None
  msg = f'no data for task {task!r}: {where}. Either {folder_help(source, task, folder)}'
  raise DataError(msg + (f';\nor install TensorFlow Datasets, which then downloads {name}:\n'
                         '  pip install -r requirements-tfds.txt' if name else '.'))


def folder_help(source: str, task: str, folder: Path | None = None) -> str:
  """How to give a glue/csv task as local files: the files a folder needs and the flag."""
  folder = folder or Path('DIR')
  files = ''.join(f'\n  {folder / f}' for f in LOCAL_FILES[source])
  kind = ('GLUE TSVs with their header row' if source == 'glue' else
          f'CSV rows label,title,text or label,text; labels 1-{len(CSV_LABELS[task])}')
  return (f'put the files in a folder ({kind}):{files}\nand pass --config.data.path={folder} '
          f'(source {source}, task {task}): a data.path folder that exists is read instead of '
          'TFDS')


@dataclasses.dataclass
class Encoded:
  """Tokenized examples: per-row int32 id/type arrays, labels (N,), lengths (N,)."""

  ids: list[np.ndarray]
  type_ids: list[np.ndarray]
  labels: np.ndarray
  lengths: np.ndarray
  pad_id: int = 0

  def __len__(self) -> int:
    return len(self.ids)


def encode(tokenizer, examples: Sequence[Example], max_len: int) -> Encoded:
  """Tokenizes examples ([CLS] a [SEP] (b [SEP]), truncated to max_len)."""
  rows: list = [None] * len(examples)
  for is_pair in (False, True):
    idx = [i for i, ex in enumerate(examples) if (ex.text_b is not None) == is_pair]
    texts_b = [examples[i].text_b for i in idx] if is_pair else None
    encs = pairs.encode(tokenizer, [examples[i].text_a for i in idx], texts_b, max_len)
    for i, enc in zip(idx, encs, strict=True):
      rows[i] = enc
  return Encoded(
      ids=[r[0] for r in rows], type_ids=[r[1] for r in rows],
      labels=np.asarray([ex.label for ex in examples], np.int32),
      lengths=np.asarray([len(r[0]) for r in rows], np.int32),
      pad_id=int(getattr(tokenizer, 'pad_id', 0)))


def num_batches(n: int | Encoded, batch_size: int, drop_last: bool = False) -> int:
  """Number of batches per epoch."""
  n = len(n) if isinstance(n, Encoded) else int(n)
  return n // batch_size if drop_last else math.ceil(n / batch_size)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
  """Row order of one epoch: a permutation fixed by (seed, epoch), or 0..n-1."""
  return _rng(seed, 'epoch', epoch).permutation(n) if shuffle else np.arange(n)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= length."""
  for b in buckets:
    if b >= length:
      return int(b)
  raise ValueError(f'row of {length} tokens exceeds the largest bucket {buckets[-1]}')


def batches(encoded: Encoded, batch_size: int, *, buckets: Sequence[int], shuffle: bool = False,
            seed: int = 0, epoch: int = 0, start_batch: int = 0,
            drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields padded batch dicts (see docs/DESIGN.md) with static (batch_size, bucket) shapes.

  A short last batch (when not `drop_last`) is filled to `batch_size` with copies of its first
  row carrying weight 0, so padding rows are well-formed inputs that never count.
  """
  buckets = tuple(int(b) for b in buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or batch_size < 1:
    raise ValueError(f'need batch_size >= 1 and increasing buckets, got {batch_size}, {buckets}')
  if len(encoded) and int(encoded.lengths.max()) > buckets[-1]:
    raise ValueError(f'longest row ({int(encoded.lengths.max())} tokens) exceeds the largest '
                     f'bucket {buckets[-1]}')
  order = epoch_order(len(encoded), shuffle=shuffle, seed=seed, epoch=epoch)
  for b in range(max(start_batch, 0), num_batches(len(encoded), batch_size, drop_last)):
    yield _make_batch(encoded, order[b * batch_size:(b + 1) * batch_size], batch_size, buckets)


def _make_batch(enc: Encoded, rows: np.ndarray, batch_size: int,
                buckets: Sequence[int]) -> dict[str, np.ndarray]:
  t = bucket_length(int(enc.lengths[rows].max()), buckets)
  ids_BxT = np.full((batch_size, t), enc.pad_id, np.int32)
  types_BxT = np.zeros((batch_size, t), np.int32)
  mask_BxT = np.zeros((batch_size, t), np.int32)
  weights_B = np.zeros((batch_size,), np.float32)
  weights_B[:len(rows)] = 1.0
  rows_B = np.concatenate([rows, np.full(batch_size - len(rows), rows[0], rows.dtype)])
  for i, r in enumerate(rows_B):
    n = int(enc.lengths[r])
    ids_BxT[i, :n] = enc.ids[r]
    types_BxT[i, :n] = enc.type_ids[r]
    mask_BxT[i, :n] = 1
  return {'input_ids': ids_BxT, 'token_type_ids': types_BxT, 'attention_mask': mask_BxT,
          'labels': enc.labels[rows_B].astype(np.int32), 'weights': weights_B}

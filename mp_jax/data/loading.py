"""Where a task's data comes from: a local folder, else TFDS, else one error naming both ways."""

from __future__ import annotations

from pathlib import Path

from absl import logging

from mp_jax.data import sources, splits, tasks


def load_task(data_cfg) -> sources.Dataset:
  """Loads the task described by `data_cfg` (source, path, task, seed, fractions, max_examples)."""
  source = data_cfg.source
  seed = int(data_cfg.get('seed', 0))
  dev_fraction = float(data_cfg.get('dev_fraction', 0.1))
  test_fraction = float(data_cfg.get('test_fraction', 0.1))
  path, task = data_cfg.get('path', None), data_cfg.get('task', None)
  if source in ('glue', 'csv'):
    glue = source == 'glue'
    table = tasks.GLUE if glue else tasks.CSV
    if task not in table:
      raise sources.DataError(f'unknown {source.upper()} task {task!r}; known: {sorted(table)}')
    folder = Path(path).expanduser() if path else None
    if folder and folder.exists() and not folder.is_dir():  # not "not found": not TFDS
      raise sources.DataError(
          f'data.path {folder} is a file; expected a folder with '
          f'{" and ".join(tasks.LOCAL_FILES[source])} (source {source}, task {task})')
    if folder and folder.is_dir():
      logging.info('data: %s task %r from folder %s', source, task, folder)
      read = sources.read_glue_tsv if glue else sources.read_label_csv
      train, heldout = (read(folder / f, task) for f in tasks.LOCAL_FILES[source])
      ds = sources.Dataset(splits.with_heldout(train, heldout, seed, dev_fraction),
                           tasks.label_names(task))
    else:
      ds = _from_tfds(source, task, folder, seed, dev_fraction)
  elif source in ('mr', 'bbc'):
    from mp_jax.data import fetch  # pylint: disable=g-import-not-at-top  (only when used)
    if source == 'mr':
      examples, names = sources.read_mr(path or fetch.mr_file()), ('negative', 'positive')
    else:
      examples, names = sources.read_bbc(path or fetch.bbc_dir())
    parts = splits.split(examples, seed=seed, fractions=[dev_fraction, test_fraction])
    ds = sources.Dataset(parts, names)
  elif source == 'tfds':
    from mp_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    ds = tfds_source.load(path or task, seed, dev_fraction)
  else:
    raise sources.DataError(f'unknown data source {source!r}; known: {", ".join(tasks.SOURCES)}')
  return splits.subsample(ds, int(data_cfg.get('max_examples', 0) or 0), seed)


def _from_tfds(source: str, task: str, folder: Path | None, seed: int,
               dev_fraction: float) -> sources.Dataset:
  """The task from tensorflow-datasets when installed, else one error that says both ways."""
  from mp_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  name = tasks.TFDS_NAMES.get(task)
  where = f'folder {folder} not found' if folder else 'data.path is not set'
  if name and tfds_source.available():
    logging.info('data: %s; %s task %r from TFDS %s', where, source, task, name)
    try:
      return tfds_source.load(name, seed, dev_fraction)
    except sources.DataError as e:  # say which folder the config looked in first
      raise sources.DataError(f'{e}\n(config data.path: {where})') from None
  msg = f'no data for task {task!r}: {where}. Either {tasks.folder_help(source, task, folder)}'
  raise sources.DataError(
      msg + (f';\nor install TensorFlow Datasets, which then downloads {name}:\n'
             '  pip install -r requirements-tfds.txt' if name else '.'))

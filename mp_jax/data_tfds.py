"""`tensorflow-datasets` source for mp_jax.data (needs that package and a network)."""

from pathlib import Path

from mp_jax import data

# (text_a keys joined by a space, text_b key, label names, held-out split).
LAYOUTS = {
    'glue/qqp': (('question1',), 'question2', data.GLUE_LAYOUTS['qqp'][4], 'validation'),
    'glue/mrpc': (('sentence1',), 'sentence2', data.GLUE_LAYOUTS['mrpc'][4], 'validation'),
    'glue/rte': (('sentence1',), 'sentence2', data.GLUE_LAYOUTS['rte'][4], 'validation'),
    'glue/sst2': (('sentence',), None, data.GLUE_LAYOUTS['sst2'][4], 'validation'),
    'ag_news_subset': (('title', 'description'), None, data.CSV_LABELS['ag_news'], 'test'),
    'yelp_polarity_reviews': (('text',), None, data.CSV_LABELS['yelp'], 'test'),
}


def load(name: str, seed: int, dev_fraction: float) -> data.Dataset:
  """Loads a TFDS dataset named in LAYOUTS; its held-out split becomes `test`."""
  if name not in LAYOUTS:
    raise data.DataError(f'unknown TFDS dataset {name!r}; supported: {sorted(LAYOUTS)}')
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise data.DataError(f'source "tfds" ({name}) needs `pip install tensorflow-datasets '
                         f'tensorflow`: {e}') from None
  keys_a, key_b, label_names, heldout = LAYOUTS[name]

  def read(split_name: str) -> list[data.Example]:
    where = Path(f'tfds:{name}[{split_name}]')
    out = []
    for i, ex in enumerate(tfds.as_numpy(tfds.load(name, split=split_name)), 1):
      text_a = ' '.join(_decode(ex[k], where, i, k) for k in keys_a).strip()
      text_b = data._text(where, i, _decode(ex[key_b], where, i, key_b), key_b) if key_b else None
      label = int(ex['label'])
      if not 0 <= label < len(label_names):
        raise data.DataError(f'{where}:{i}: unknown label {label}; known labels: '
                             f'{list(range(len(label_names)))}')
      out.append(data.Example(data._text(where, i, text_a), text_b, label))
    return out

  splits = data._with_heldout(read('train'), read(heldout), seed, dev_fraction)
  return data.Dataset(splits, label_names)


def _decode(value, where: Path, i: int, key: str) -> str:
  try:
    return (value.decode('utf-8') if isinstance(value, bytes) else str(value)).strip()
  except UnicodeDecodeError as e:
    raise data.DataError(f'{where}:{i}: {key} is not valid UTF-8 (byte {e.start})') from None

"""TFDS source on TFDS's own mock data (`tfds.testing.mock_data`): no network, no TensorFlow."""

import logging
import sys
import tempfile

import ml_collections
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader
from tensorflow_datasets.testing import mocking

from mp_jax.data import loading, splits, tasks, tfds_source
from mp_jax.data.sources import DataError, Example

N = 8  # mock examples per split


def _cfg(**kw):
  base = dict(source='glue', path='', task='', seed=0, dev_fraction=0.25, test_fraction=0.1,
              max_examples=0)
  return ml_collections.ConfigDict({**base, **kw})


@pytest.fixture(name='tfds_dir')
def fixture_tfds_dir(tmp_path, monkeypatch):
  """An empty TFDS data dir; no GCS lookups; TFDS's temporary folders under tmp_path."""
  # TFDS reads $TFDS_DATA_DIR once, at import, into constants.DATA_DIR.
  monkeypatch.setattr('tensorflow_datasets.core.constants.DATA_DIR', str(tmp_path / 'tfds'))
  monkeypatch.setattr('tensorflow_datasets.core.utils.gcs_utils.exists', lambda path: False)
  # DatasetInfo.initialize_from_bucket leaves an empty mkdtemp folder per builder (tfds 4.9.10).
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  return tmp_path / 'tfds'


@pytest.fixture(name='mock_tfds')
def fixture_mock_tfds(monkeypatch, tfds_dir):
  """TFDS's random examples for any dataset, from the dataset's real features and serializer."""
  # tfds 4.9.10's mock sets the data source's `__getitems__` to a partial that is not bound to
  # the source (TypeError on any batched read); bind the keys where they belong.
  monkeypatch.setattr(mocking, '_getitems',
                      lambda keys, generator, serialized=False: [generator[k] for k in keys])
  with tfds.testing.mock_data(num_examples=N):
    yield


def _reference(name, split):
  """The split as TFDS itself decodes it (default deserialize-and-decode), one by one."""
  keys_a, key_b, _, _ = tfds_source.LAYOUTS[name]
  src = tfds.data_source(name, split=split, builder_kwargs={'file_format': 'array_record'})
  out = []
  for i in range(len(src)):
    ex = src[i]
    text_a = ' '.join(ex[k].strip() for k in keys_a if ex[k].strip())
    out.append(Example(text_a, ex[key_b].strip() if key_b else None, int(ex['label'])))
  return out


@pytest.mark.parametrize('task', sorted(tasks.TFDS_NAMES))
def test_missing_folder_falls_back_to_tfds(mock_tfds, tmp_path, task):
  name = tasks.TFDS_NAMES[task]
  source = 'glue' if task in tasks.GLUE else 'csv'
  ds = loading.load_task(_cfg(source=source, task=task, path=str(tmp_path / 'none')))
  heldout = tfds_source.LAYOUTS[name].heldout
  assert [len(ds[s]) for s in splits.SPLITS] == [N - N // 4, N // 4, N]
  assert ds['test'] == _reference(name, heldout)
  assert sorted(ds['train'] + ds['dev'], key=repr) == sorted(_reference(name, 'train'), key=repr)
  assert all((ex.text_b is not None) == (source == 'glue' and task != 'sst2') for ex in ds['test'])


def test_source_tfds_equals_fallback(mock_tfds, tmp_path):
  via_tfds = loading.load_task(_cfg(source='tfds', path='glue/qqp', seed=3))
  assert via_tfds == loading.load_task(_cfg(source='glue', task='qqp', path=str(tmp_path / 'no'),
                                            seed=3))
  assert via_tfds.label_names == ['not_duplicate', 'duplicate']
  assert loading.load_task(_cfg(source='tfds', task='ag_news_subset', dev_fraction=0.0))['dev'] == \
      _reference('ag_news_subset', 'test')
  with pytest.raises(DataError, match="unknown TFDS dataset 'mnist'"):
    loading.load_task(_cfg(source='tfds', path='mnist'))


@pytest.mark.parametrize('name', sorted(tfds_source.LAYOUTS))
def test_label_names_match_tfds(mock_tfds, name):
  ours = list(tfds_source.LAYOUTS[name].names)
  theirs = tfds.builder(name).info.features['label'].names
  # yelp_polarity_reviews names its classes by the CSV's 1-based labels.
  assert theirs in (ours, [str(i + 1) for i in range(len(ours))])


def _fixed_rows(monkeypatch, rows):
  """Makes every split of the mocked datasets these rows, serialized by the dataset's features."""

  class Rows(list):
    def __getitems__(self, keys):
      return [self[k] for k in keys]

  def as_data_source(builder, split, **unused_kw):
    feats = builder.info.features
    idx = lambda i: {'idx': i} if 'idx' in feats else {}
    return [Rows(feats.serialize_example({**idx(i), **r}) for i, r in enumerate(rows))
            for _ in split]

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'as_data_source', as_data_source)


def test_empty_segment_kept_and_warned_bad_rows_stop(mock_tfds, monkeypatch, caplog):
  rows = [dict(question1='What?', question2='', label=1), dict(question1='', question2='How?',
                                                              label=0),
          dict(question1='a', question2='b', label=0)]
  _fixed_rows(monkeypatch, rows)
  with caplog.at_level(logging.WARNING):
    ds = loading.load_task(_cfg(source='tfds', path='glue/qqp', dev_fraction=0.0))
  assert ds['test'] == [Example('What?', '', 1), Example('', 'How?', 0), Example('a', 'b', 0)]
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any('tfds:glue/qqp[train]: kept 2 row(s) with an empty question1 or question2' in m
             for m in warned)
  rows.append(dict(question1=' ', question2='', label=1))
  with pytest.raises(DataError, match=r'tfds:glue/qqp\[train\]:4: empty question1 and question2'):
    loading.load_task(_cfg(source='tfds', path='glue/qqp'))
  rows[-1] = dict(question1='q', question2='r', label=-1)  # GLUE test splits: hidden labels
  with pytest.raises(DataError, match=r'glue/qqp\[train\]:4: unknown label -1'):
    loading.load_task(_cfg(source='tfds', path='glue/qqp'))
  _fixed_rows(monkeypatch, [dict(text='', label=0)])
  with pytest.raises(DataError, match=r'yelp_polarity_reviews\[train\]:1: empty text'):
    loading.load_task(_cfg(source='csv', task='yelp', path=''))


def test_offline_is_one_clear_error_within_seconds(tfds_dir, monkeypatch):
  seen = []

  def offline(self, url_or_urls):
    seen.append(downloader.MAX_RETRIES)
    raise ConnectionError('Failed to resolve host (offline)')

  monkeypatch.setattr(tfds.download.DownloadManager, 'download_and_extract', offline)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', offline)
  before = downloader.MAX_RETRIES
  with pytest.raises(DataError) as e:
    loading.load_task(_cfg(source='glue', task='rte', path='data/glue/RTE_missing'))
  msg = str(e.value)
  assert 'could not download, prepare or open glue/rte (ConnectionError: Failed to resolve' in msg
  assert 'DIR/train.tsv\n  DIR/dev.tsv\n' in msg
  assert '--config.data.path=DIR (source glue, task rte)' in msg
  # TFDS's 10 backed-off retries took 204 s offline; capped while preparing, then restored.
  assert seen and seen[0] == 3 and before == downloader.MAX_RETRIES
  with pytest.raises(DataError, match=r'ag_news_subset .*\n.*\n  DIR/train\.csv\n  DIR/test\.csv'):
    tfds_source.load('ag_news_subset', 0, 0.1)


def test_without_the_package(monkeypatch):
  monkeypatch.setitem(sys.modules, 'tensorflow_datasets', None)  # import raises ImportError
  assert not tfds_source.available()
  with pytest.raises(DataError, match='pip install -r requirements-tfds.txt'):
    tfds_source.load('glue/qqp', 0, 0.1)

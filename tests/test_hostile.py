"""Hostile input (property tests): loaders and Predictor answer or name the bad place, no crash."""

import csv
import functools
import io
import pathlib
import re
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mp_jax.data import batching, sources, tokenization
from mp_jax.data.sources import DataError
from mp_jax.model import bert
from mp_jax.model import config as model_config
from mp_jax.serving import predictor
from mp_jax.training import trainer
from tests import tiny

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
WORDS = tiny.POS + tiny.NEG + tiny.FILL
WHITESPACE = ' \t\r\n\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u3000'
# Any code point except lone surrogates (a file cannot hold them), control characters included.
ANY_CHAR = st.characters(exclude_categories=('Cs',))


def _texts(alphabet=ANY_CHAR):
  """Hostile texts: arbitrary Unicode, whitespace-only, control-only, 100k characters, words."""
  return st.one_of(
      st.text(alphabet, max_size=40),
      st.text(st.sampled_from(WHITESPACE), max_size=5),
      st.text(st.characters(min_codepoint=0, max_codepoint=31), min_size=1, max_size=5),
      st.builds(lambda w, n: ' '.join([w] * n), st.sampled_from(WORDS), st.integers(20000, 25000)),
      st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(' '.join))


@functools.cache
def _tok():
  with tempfile.TemporaryDirectory() as d:
    return tokenization.Tokenizer.from_dir(tiny.write_vocab(pathlib.Path(d)))


# ----------------------------------------------------------------------------------- Predictor


@pytest.fixture(scope='module')
def pred():
  """A Predictor over a tiny random 2-layer model (pruning and exits on) and the tiny vocab."""
  tok = _tok()
  cfg = model_config.ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=2,
                                 num_heads=2, intermediate_size=32, max_position_embeddings=64,
                                 num_labels=3, max_seq_length=32, exit_width=8,
                                 final_threshold=0.05)
  return predictor.Predictor(cfg, bert.init_params(cfg, 0), tok, ['a', 'b', 'c'],
                             method='mp', tau=0.5, length_buckets=(8, 16, 32))


def _problem(x):
  """What is wrong with one text, or None (the oracle the errors must agree with)."""
  if not isinstance(x, str):
    return TypeError
  if re.search('[\ud800-\udfff]', x):
    return ValueError
  return None


_SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
_HOSTILE_ITEM = st.one_of(
    st.builds(lambda a, s, b: a + s + b, _texts(), _SURROGATE, _texts()),  # a str can hold them
    st.sampled_from([None, 3, 2.5, b'bytes', ('a',), ('a', 'b'), ('ok', None), ['x', 7], {}]))
_GOOD_TEXT = st.builds(lambda a, w, b: a + w + b, _texts(), st.sampled_from(WORDS), _texts())
_ITEM = st.one_of(_GOOD_TEXT, _GOOD_TEXT, _texts(), _HOSTILE_ITEM)
# Each example runs the compiled engine: few of them (CI time).
PREDICTOR_SETTINGS = settings(SETTINGS, max_examples=25)


def _check_answers(pred, out, n):
  assert len(out) == n
  for o in out:
    assert o['label'] in ('a', 'b', 'c') and 1 <= o['exit_layer'] <= pred.cfg.num_layers
    assert sum(o['probs'].values()) == pytest.approx(1.0, abs=1e-5)
    assert all(np.isfinite(list(o['probs'].values())))
    assert 1 <= o['tokens_kept'] <= o['tokens_in'] <= pred.cfg.max_seq_length


@PREDICTOR_SETTINGS
@given(texts=st.lists(_ITEM, max_size=6))
def test_predictor_answers_or_names_the_bad_text(pred, texts):
  problems = [_problem(x) for x in texts]  # a blank text is answered, flagged
  bad = [i for i, p in enumerate(problems) if p is not None]
  try:
    out = pred.predict(texts, batch_size=4)
  except (TypeError, ValueError) as e:
    assert bad, f'valid texts rejected: {e}'
    assert str(e).startswith(f'texts[{bad[0]}] '), str(e)
    assert isinstance(e, problems[bad[0]])
    return
  assert not bad, f'invalid texts {bad} accepted'
  _check_answers(pred, out, len(texts))
  assert all(o['empty_after_tokenizing'] for o, t in zip(out, texts, strict=True) if not t.strip())


@PREDICTOR_SETTINGS
@given(items=st.lists(st.tuples(_ITEM, _ITEM), max_size=5))
def test_predictor_answers_or_names_the_bad_pair(pred, items):
  firsts, seconds = [a for a, _ in items], [b for _, b in items]
  want = None  # (error type, message start) of the first bad pair
  for i, (a, b) in enumerate(items):
    for name, x in (('firsts', a), ('seconds', b)):
      if want is None and _problem(x):
        want = _problem(x), f'{name}[{i}] '
    if want is None and not (a.strip() or b.strip()):  # one empty side is valid, as in training
      want = ValueError, f'pair {i}: '
  try:
    out = pred.predict_pairs(firsts, seconds, batch_size=4)
  except (TypeError, ValueError) as e:
    assert want, f'valid pairs rejected: {e}'
    assert isinstance(e, want[0]) and str(e).startswith(want[1]), (str(e), want)
    return
  assert want is None, f'invalid pair accepted: {want}'
  _check_answers(pred, out, len(items))


# ------------------------------------------------------------------------------------- Loaders

_CELL = st.text(st.characters(exclude_categories=('Cs',), exclude_characters='\t\n'),
                max_size=30)
_GOOD_CELL = st.builds(lambda a, w, b: a + w + b, _CELL, st.sampled_from(WORDS), _CELL)
_GLUE_OK = st.tuples(st.just('ok'), _GOOD_CELL, st.sampled_from(['0', '1', ' 1 ']))
_GLUE_ROW = st.one_of(
    st.tuples(st.just('ok'), _CELL, st.sampled_from(['0', '1'])),  # may be empty
    st.tuples(st.just('label'), _GOOD_CELL, _CELL),  # may be unknown
    st.tuples(st.just('columns'), st.lists(_CELL, max_size=4), st.just('')),
    st.tuples(st.just('bytes'), st.binary(max_size=12), st.sampled_from(['0', '1'])),
    st.tuples(st.just('blank'), st.text(st.sampled_from(' \t\r'), max_size=3), st.just('')))


def _with_one(good, hostile):
  """Good rows with at most one hostile row somewhere among them."""
  return st.builds(lambda rows, bad, i: rows[:i] + [bad] + rows[i:] if bad else rows,
                   st.lists(good, max_size=8), st.one_of(hostile, st.none()),
                   st.integers(0, 8))


def _glue_file(rows):
  """(bytes, expected examples or (line, error pattern) of the first bad row)."""
  out, want, lineno = [b'sentence\tlabel'], [], 2
  for kind, a, b in rows:
    if kind == 'columns':
      line = '\t'.join(a).encode()
    elif kind == 'bytes':
      line = a + b'\t' + b.encode()
    elif kind == 'blank':
      line = a.encode()
    else:
      line = f'{a}\t{b}'.encode()
    out.append(line)
    for physical in line.split(b'\n'):  # raw bytes may hold a newline: the row is two lines
      if not isinstance(want, tuple):
        want = _expect_glue_row(lineno, physical, want)
      lineno += 1
  return b'\n'.join(out) + b'\n', want


def _read_or_bad_line(read, path, want):
  """read(path) returns `want`, or raises a DataError naming want = (line, error pattern)."""
  try:
    got = read(path)
  except DataError as e:
    assert isinstance(want, tuple), f'{e} but expected {want}'
    assert str(e).startswith(f'{path}:{want[0]}: {want[1]}'), (str(e), want)
    return
  assert got == want


def _expect_glue_row(lineno, raw, want):
  try:
    line = raw.decode('utf-8')
  except UnicodeDecodeError:
    return lineno, 'invalid UTF-8'
  line = line.rstrip('\r\n')
  if not line.strip():
    return want
  fields = line.split('\t')
  if len(fields) != 2:
    return lineno, 'malformed row'
  if not fields[0].strip():
    return lineno, 'empty sentence'
  if fields[1].strip() not in ('0', '1'):
    return lineno, 'unknown label'
  return [*want, sources.Example(fields[0].strip(), None, int(fields[1].strip()))]


@SETTINGS
@given(rows=_with_one(_GLUE_OK, _GLUE_ROW))
def test_glue_loader_reads_or_names_the_first_bad_line(tmp_path, rows):
  body, want = _glue_file(rows)
  path = tmp_path / 'train.tsv'
  path.write_bytes(body)
  _read_or_bad_line(lambda p: sources.read_glue_tsv(p, 'sst2'), path, want)


@pytest.mark.parametrize('row, where', [
    ('0\t\t \x0b\t0', 'empty question1 and question2'), ('2\tq1\tq2', 'malformed'),
    ('3\tq1\tq2\tyes', "unknown label 'yes'")])
def test_bad_pair_rows_name_the_line(tmp_path, row, where):  # one empty side is kept (test_data)
  path = tmp_path / 'train.tsv'
  path.write_text(f'id\tquestion1\tquestion2\tis_duplicate\n9\ta\tb\t1\n{row}\n')
  with pytest.raises(DataError, match=rf'train\.tsv:3: .*{where}'):
    sources.read_glue_tsv(path, 'qqp')


def test_empty_dev_split_stops_training_with_a_clear_error(tmp_path):
  c = tiny.config(tmp_path, 'method=bert,smoke')
  (pathlib.Path(c.data.path) / 'dev.tsv').write_text('sentence\tlabel\n\n')
  with pytest.raises(DataError, match='the dev split is empty'):
    trainer.run(c, tmp_path / 'w')


_CSV_OK = st.tuples(st.sampled_from(['1', '2', '3', '4', ' 2']), _GOOD_CELL, _CELL)
_CSV_ROW = st.one_of(
    st.tuples(st.sampled_from(['1', '2']), _CELL),
    st.tuples(_CELL, _GOOD_CELL),
    st.lists(_CELL, min_size=1, max_size=5).map(tuple))


def _expect_csv(rows):
  """Expected examples, or (first line of the first bad record, error pattern)."""
  out, line = [], 1
  for row in rows:
    buf = io.StringIO()
    csv.writer(buf).writerow(row)
    start, line = line, line + buf.getvalue().count('\n')
    if not ''.join(row).strip():
      continue
    if len(row) not in (2, 3):
      return start, 'malformed row'
    text = ' '.join(f.strip() for f in row[1:] if f.strip()).replace('\\n', ' ')
    if not text.strip():
      return start, 'empty text'
    if row[0].strip() not in ('1', '2', '3', '4'):
      return start, 'unknown label'
    out.append(sources.Example(text.strip(), None, int(row[0]) - 1))
  return out


@SETTINGS
@given(rows=_with_one(_CSV_OK, _CSV_ROW), bad_bytes=st.booleans())
def test_csv_loader_reads_or_names_the_first_bad_record(tmp_path, rows, bad_bytes):
  buf = io.StringIO()
  csv.writer(buf).writerows(rows)
  body = buf.getvalue().encode()
  path = tmp_path / 'train.csv'
  path.write_bytes(body + (b'4,"caf\xe9"\r\n' if bad_bytes else b''))
  want = _expect_csv(rows)
  if bad_bytes and not isinstance(want, tuple):
    want = (body.count(b'\n') + 1, 'invalid UTF-8')
  _read_or_bad_line(lambda p: sources.read_label_csv(p, 'ag_news'), path, want)


@SETTINGS
@given(valence=st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(str),
                         st.text(max_size=5)),
       text=_CELL)
def test_mr_loader_rejects_junk_valence_and_empty_text(tmp_path, valence, text):
  path = tmp_path / 'mr.txt'
  path.write_text(f'1\t0.5\tfine\n2\t{valence}\t{text}\n', encoding='utf-8')
  try:
    got = sources.read_mr(path)
  except DataError as e:
    assert str(e).startswith(f'{path}:2: '), str(e)
    return
  v = float(valence)
  assert np.isfinite(v) and text.strip()
  assert got[0] == sources.Example('fine', None, 1)
  assert len(got) == (2 if v != 0 and text.strip() != 'fine' else 1)


@SETTINGS
@given(files=st.lists(st.binary(max_size=40), min_size=1, max_size=4))
def test_bbc_loader_decodes_any_bytes_or_names_the_empty_file(tmp_path, files):
  root = tmp_path / 'bbc'
  for i, raw in enumerate(files):
    (root / ('sport' if i % 2 else 'tech')).mkdir(parents=True, exist_ok=True)
    (root / ('sport' if i % 2 else 'tech') / f'{i}.txt').write_bytes(raw)
  try:
    got, labels = sources.read_bbc(root)
  except DataError as e:
    assert re.match(rf'{re.escape(str(root))}/(sport|tech)/\d+\.txt:1: empty text', str(e))
    return
  assert labels in (['tech'], ['sport', 'tech']) and got
  assert all(ex.text_a.strip() and 0 <= ex.label < len(labels) for ex in got)


@SETTINGS
@given(texts=st.lists(_texts().filter(str.strip), min_size=1, max_size=5), pair=st.booleans())
def test_encode_truncates_anything_to_max_len(texts, pair):
  tok = _tok()
  examples = [sources.Example(t, t[::-1] if pair else None, 0) for t in texts]
  enc = batching.encode(tok, examples, max_len=24)
  assert len(enc) == len(texts) and enc.lengths.max() <= 24
  for ids in enc.ids:
    assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and len(ids) >= 2


@SETTINGS
@given(a=st.lists(st.sampled_from(WORDS + ['zzz', '\x00', 'caf\xe9']), min_size=1, max_size=60),
       b=st.lists(st.sampled_from(WORDS + ['qq']), min_size=1, max_size=60),
       max_len=st.integers(5, 70))
def test_pair_encoding_equals_the_tokenizers_own(a, b, max_len):
  tok = _tok()
  a, b = ' '.join(a), ' '.join(b)
  want = tok.encode([a], [b], max_len=max_len)[0]
  got = tokenization.encode_pairs(tok, [a], [b], max_len)[0]
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def test_two_long_sides_of_a_pair_cost_linear_memory():
  """`tokenizers` alone needs tens of GB here (every pair of overflow pieces)."""
  long_a, long_b = 'good ' * 20000, 'bad plot ' * 12000
  ids, types = tokenization.encode_pairs(_tok(), [long_a], [long_b], 24)[0]
  assert len(ids) == 24 and types.sum() == 12  # 10 + 11 tokens + [CLS] [SEP] [SEP]

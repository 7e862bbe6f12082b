"""The strict serving API: what predict / predict_pairs accept, refuse, cap and flag."""

import functools
import json
import pathlib
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mp_jax.data import tokenization
from mp_jax.model import bert, checks, hf
from mp_jax.model import config as model_config
from mp_jax.serving import predictor
from tests import tiny

# Few examples: each runs the compiled engine (CI time).
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
MAX_LEN, MAX_CHARS = 32, 400
WORDS = tiny.POS + tiny.NEG + tiny.FILL
# Characters the tokenizer drops: control, format (zero-width, BOM, bidi), C1 controls.
INVISIBLE = '\x00\x07\x7f\u200b\u200c\u200d\u2060\ufeff\u202e\x9f'


@functools.cache
def _tok():
  with tempfile.TemporaryDirectory() as d:
    return tokenization.Tokenizer.from_dir(tiny.write_vocab(pathlib.Path(d)))


def _cfg():
  return model_config.ModelConfig(vocab_size=_tok().vocab_size, hidden_size=16, num_layers=2,
                                  num_heads=2, intermediate_size=32, max_position_embeddings=64,
                                  num_labels=3, max_seq_length=MAX_LEN, exit_width=8,
                                  final_threshold=0.05)


@pytest.fixture(scope='module')
def pred():
  """A tiny random 2-layer model (pruning and exits on), no training; a 400-character cap."""
  cfg = _cfg()
  return predictor.Predictor(cfg, bert.init_params(cfg, 0), _tok(), ['a', 'b', 'c'],
                             method='mp', tau=0.5, length_buckets=(8, 16, 32),
                             max_chars=MAX_CHARS)


def _full_len(a, b=None):
  """Tokens of a text (or pair) with no cap and no truncation."""
  rows = tokenization.encode_pairs(_tok(), [a], None if b is None else [b], tokenization.NO_LIMIT)
  return len(rows[0][0])


# ------------------------------------------------------------------------------------- misuse

@pytest.mark.parametrize('texts, err, match', [
    ({'text': 'good film'}, TypeError, r'texts must be a list of str, got a dict of 1: '
                                    r'.*d\["text"\]'),
    (('good', 'film'), TypeError, r'got a tuple of 2: .*sentence pair; use predict_pairs\(\[a\]'),
    (('a', 'b', 'c'), TypeError, r'got a tuple of 3: pass list\(texts\)'),
    ('good film', TypeError, r"got str 'good film': for one text pass \[text\]"),
    (b'good film', TypeError, r"got bytes b'good film': decode it first \(e\.g\. b\.decode"),
    (None, TypeError, r'texts must be a list of str, got None$'),
    (np.array(['good']), TypeError, r'got ndarray .*: pass texts\.tolist\(\)'),
    (['ok', b'good film'], TypeError, r'texts\[1\] must be a str, got bytes .*decode it first'),
    (['ok', None], TypeError, r'texts\[1\] must be a str, got None$'),
    ([('good', 'film')], TypeError, r'texts\[0\] must be a str, got a tuple of 2: .*predict_pairs'),
    ([['good']], TypeError, r'texts\[0\] must be a str, got a list of 1$'),
    ([3.5], TypeError, r'texts\[0\] must be a str, got float 3\.5'),
    (['fine \ud800'], ValueError, r"texts\[0\] is not valid Unicode \(lone surrogate '\\ud800' "
                                  r'at character 5\)'),
])
def test_predict_names_what_was_passed_and_what_fits(pred, texts, err, match):
  with pytest.raises(err, match=match):
    pred.predict(texts)


@pytest.mark.parametrize('firsts, seconds, err, match', [
    (['a'], ['b', 'c'], ValueError, r'firsts has 1 texts but seconds has 2'),
    ('good', 'bad', TypeError, r"firsts must be a list of str, got str 'good': pass lists"),
    (['good'], ('bad',), TypeError, r'seconds must be a list of str, got a tuple of 1'),
    (['good'], [3], TypeError, r'seconds\[0\] must be a str, got int 3'),
    ([b'good'], ['bad'], TypeError, r'firsts\[0\] must be a str, got bytes .*decode'),
    (['good', ' '], ['bad', '\t'], ValueError, r'pair 1: firsts\[1\] and seconds\[1\] are both'),
])
def test_predict_pairs_names_what_was_passed_and_what_fits(pred, firsts, seconds, err, match):
  with pytest.raises(err, match=match):
    pred.predict_pairs(firsts, seconds)


@pytest.mark.parametrize('kw, match', [
    ({'tau': float('inf')}, r'tau must be a finite number in \[0, 1\] .*got inf'),
    ({'tau': float('nan')}, 'tau.*got nan'), ({'tau': -0.1}, 'tau.*got -0.1'),
    ({'tau': 1.5}, 'tau.*got 1.5'), ({'tau': 'high'}, "tau.*got 'high'"),
    ({'tau': True}, 'tau.*got True'),
    ({'batch_size': 0}, 'batch_size must be a positive int, got 0'),
    ({'batch_size': 2.5}, 'batch_size.*got 2.5'), ({'batch_size': True}, 'batch_size.*got True'),
])
def test_bad_options_are_refused(pred, kw, match):
  with pytest.raises(ValueError, match=match):
    pred.predict(['good film'], **kw)
  with pytest.raises(ValueError, match=match):
    pred.predict_pairs(['good film'], ['bad'], **kw)


@pytest.mark.parametrize('kw, match', [
    ({'tau': float('inf')}, 'tau must be a finite number'), ({'max_chars': 0}, 'max_chars'),
    ({'max_chars': 1.5}, 'max_chars must be a positive int, got 1.5')])
def test_bad_constructor_options_are_refused(kw, match):
  cfg = _cfg()
  with pytest.raises(ValueError, match=match):
    predictor.Predictor(cfg, {}, _tok(), ['a', 'b', 'c'], **kw)


def test_tau_bounds_are_valid(pred):
  assert all(o['exit_layer'] == pred.cfg.num_layers for o in pred.predict(['good'], tau=0))
  assert len(pred.predict(['good'], tau=1)) == 1


# ------------------------------------------------------------------------- answers and flags

def test_flags_truncated_and_empty_after_tokenizing(pred):
  texts = ['good film', INVISIBLE, 'good ' * (MAX_LEN - 2), 'good ' * (MAX_LEN - 1),
           'good ' * 79 + 'bad', '  ' * 1000 + 'good film' + '\n' * 1000, INVISIBLE * 100]
  out = pred.predict(texts, batch_size=4)
  assert [o['tokens_in'] for o in out] == [4, 2, MAX_LEN, MAX_LEN, MAX_LEN, 4, 2]
  assert [o['truncated'] for o in out] == [False, False, False, True, True, False, True]
  assert [o['empty_after_tokenizing'] for o in out] == [False, True, False, False, False, False,
                                                        True]
  # One empty side is a valid pair (as in the training data); both sides invisible is empty.
  out = pred.predict_pairs(['good', '', INVISIBLE, 'good ' * 20], ['bad plot', 'bad', '\x00',
                                                                  'bad ' * 20])
  assert [o['tokens_in'] for o in out] == [6, 4, 3, MAX_LEN]
  assert [o['truncated'] for o in out] == [False, False, False, True]
  assert [o['empty_after_tokenizing'] for o in out] == [False, False, True, False]


def test_blank_texts_are_answered_and_flagged_like_invisible_ones(pred):
  out = pred.predict(['good film', '', ' \t\n', INVISIBLE, '\u3000 \x85'], batch_size=4)
  assert [(o['tokens_in'], o['empty_after_tokenizing']) for o in out] == [
      (4, False), (2, True), (2, True), (2, True), (2, True)]
  assert out[1]['probs'] == out[2]['probs'] == out[3]['probs']  # the same `[CLS] [SEP]` row
  assert pred.encode(['', ' '])[0][0].tolist() == [_tok().cls_id, _tok().sep_id]
  # A pair needs text on one side (the training data's rule); one blank side is a pair.
  assert [o['tokens_in'] for o in pred.predict_pairs(['', 'good'], ['bad', ' '])] == [4, 4]
  with pytest.raises(ValueError, match=r'^pair 0: firsts\[0\] and seconds\[0\] are both'):
    pred.predict_pairs(['', 'good'], [' ', ''])


def test_answers_equal_the_engine_on_the_tokenizers_own_encoding(pred):
  firsts, seconds = ['good film', 'the plot was dull ' * 9, 'fine'], ['bad', 'lovely', '']
  enc = _tok().encode(firsts, seconds, max_len=MAX_LEN)
  want = pred.engine(4).predict(enc)
  got = pred.predict_pairs(firsts, seconds, batch_size=4)
  assert [g['label'] for g in got] == [pred.label_names[i] for i in want['labels']]
  assert [g['exit_layer'] for g in got] == want['exit_layer'].tolist()
  assert [g['tokens_in'] for g in got] == [len(e[0]) for e in enc]
  single = pred.predict(firsts, batch_size=4)
  assert [g['tokens_in'] for g in single] == [len(e[0]) for e in _tok().encode(firsts,
                                                                               max_len=MAX_LEN)]


def test_a_30mb_text_is_cut_in_characters_before_tokenizing(pred, monkeypatch):
  seen = []
  tok = pred.tokenizer
  original = tok.encode

  def counting(texts_a, texts_b=None, **kw):
    seen.extend(len(t) for t in [*texts_a, *(texts_b or [])])
    return original(texts_a, texts_b, **kw)

  monkeypatch.setattr(tok, 'encode', counting)
  huge = 'good ' * 6_000_000  # 30 MB
  out = pred.predict([huge, 'fine'])
  out += pred.predict_pairs([huge], [huge])
  assert seen and max(seen) <= MAX_CHARS
  assert [(o['truncated'], o['tokens_in']) for o in out] == [(True, MAX_LEN), (False, 3),
                                                              (True, MAX_LEN)]


def test_the_default_cap_is_128_characters_per_token_position():
  p = predictor.Predictor(_cfg(), {}, _tok(), ['a', 'b', 'c'])
  assert p.max_chars == predictor.CHARS_PER_TOKEN * MAX_LEN == 4096


def test_a_cut_in_characters_is_flagged_even_when_the_tokens_fit():
  cfg = _cfg()
  p = predictor.Predictor(cfg, bert.init_params(cfg, 0), _tok(), ['a', 'b', 'c'],
                          length_buckets=(8, 16, 32), max_chars=12)
  out = p.predict(['good film bad plot', '   good film   ', 'good film is'], batch_size=8)
  assert [(o['truncated'], o['tokens_in']) for o in out] == [(True, 5), (False, 4), (False, 5)]


def test_non_finite_weights_are_an_error_naming_the_inputs(tmp_path):
  cfg = _cfg()
  params = bert.init_params(cfg, 0)
  fine = int(_tok().encode(['fine'], max_len=8)[0][0][1])
  emb = np.array(params['embeddings']['word_embeddings']['embedding'])
  emb[fine] = np.nan  # only inputs holding the word 'fine' go through NaN
  params['embeddings']['word_embeddings']['embedding'] = emb
  hf.save(tmp_path / 'w' / 'final', cfg, params, _tok(), ['x', 'y', 'z'])
  tiny.save_exit_plan(tmp_path / 'w' / 'final', cfg)
  (tmp_path / 'w' / 'config.json').write_text(json.dumps(
      {'method': 'mp', 'eval': {'tau': 0.5, 'length_buckets': [8, 16, 32]}}))
  p = predictor.Predictor.from_workdir(tmp_path / 'w')
  with pytest.raises(checks.NonFiniteOutput, match=r'^texts\[2\], texts\[4\]: the model '
                                                     r'returned non-finite logits \(2 of 5 '
                                                     r'inputs\); the weights hold NaN'):
    p.predict(['good', 'bad plot', 'fine', 'good film ' * 5, 'bad fine'], batch_size=4)
  with pytest.raises(checks.NonFiniteOutput, match=r'^pair 1: .* \(1 of 3 inputs\)'):
    p.predict_pairs(['good', 'bad', ''], ['a', 'so fine', 'plot'])
  assert len(p.predict(['good', 'bad plot'])) == 2  # the other inputs still answer


def test_the_engine_cache_is_bounded(pred):
  assert pred.engine(10**6) is pred.engine(predictor.MAX_BATCH_SIZE)
  # The platform's batch buckets (1, 8, 32) below the batch size, plus it (data.batching.upto).
  assert pred.engine(10**6).batch_buckets == (1, 8, 32, predictor.MAX_BATCH_SIZE)
  for b in range(1, 12):
    pred.engine(b)
  assert len(pred._engines) == predictor.MAX_ENGINES
  assert pred.engine(11) is pred.engine(11)  # the most recent ones stay
  out = pred.predict(['good', 'bad plot'], batch_size=10**6)
  assert len(out) == 2 and len(pred._engines) == predictor.MAX_ENGINES


def test_from_workdir_serves_with_flags_and_a_cap(tmp_path):
  cfg = _cfg()
  hf.save(tmp_path / 'w' / 'final', cfg, bert.init_params(cfg, 0), _tok(), ['x', 'y', 'z'])
  tiny.save_exit_plan(tmp_path / 'w' / 'final', cfg)
  (tmp_path / 'w' / 'config.json').write_text(json.dumps(
      {'method': 'mp', 'eval': {'tau': 0.5, 'length_buckets': [8, 16, 32]}}))
  p = predictor.Predictor.from_workdir(tmp_path / 'w', max_chars=50)
  assert (p.tau, p.max_chars) == (0.5, 50)
  out = p.predict(['good film', 'good ' * 20])
  assert [o['label'] in ('x', 'y', 'z') for o in out] == [True, True]
  assert [o['truncated'] for o in out] == [False, True]
  with pytest.raises(ValueError, match='tau must be a finite number'):
    predictor.Predictor.from_workdir(tmp_path / 'w', tau=float('inf'))


# ------------------------------------------------------------------------ property tests

_TEXT = st.one_of(
    st.builds(lambda a, w, b: a + w + b, st.text(max_size=30), st.sampled_from(WORDS),
              st.text(max_size=30)),
    st.text(st.sampled_from(INVISIBLE), min_size=1, max_size=8),  # nothing for the tokenizer
    st.builds(lambda w, n, s: s.join([w] * n), st.sampled_from(WORDS), st.integers(1, 120),
              st.sampled_from([' ', '  \u200b', '\t\x00'])),  # around both caps
    st.text(st.characters(exclude_categories=('Cs',)), min_size=1, max_size=40)
    .filter(str.strip))


def _check(pred, got, texts, seconds=None):
  """One answer per input, in order, with the flags the uncapped tokenization implies."""
  assert len(got) == len(texts)
  for i, (o, a) in enumerate(zip(got, texts, strict=True)):
    b = None if seconds is None else seconds[i]
    assert o['label'] in pred.label_names and 1 <= o['exit_layer'] <= pred.cfg.num_layers
    probs = list(o['probs'].values())
    assert np.isfinite(probs).all() and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert 1 <= o['tokens_kept'] <= o['tokens_in'] <= MAX_LEN
    cut = any(len(t.strip()) > MAX_CHARS for t in (a, b) if t is not None)
    full = _full_len(a, b)
    assert o['truncated'] == (cut or full > MAX_LEN), (a, b, o)
    if not cut:
      assert o['tokens_in'] == min(full, MAX_LEN)
    assert o['empty_after_tokenizing'] == (o['tokens_in'] == (2 if b is None else 3))


@SETTINGS
@given(texts=st.lists(_TEXT, max_size=6))
def test_any_list_of_texts_gets_one_flagged_answer_each(pred, texts):
  got = pred.predict(texts, batch_size=4)
  _check(pred, got, texts)
  assert [g['label'] for g in pred.predict(texts[::-1], batch_size=4)[::-1]] == [
      g['label'] for g in got]


@SETTINGS
@given(pairs_=st.lists(st.tuples(_TEXT, st.one_of(_TEXT, st.just(''), st.just(' \n'))),
                       max_size=5), swap=st.booleans())
def test_any_list_of_pairs_gets_one_flagged_answer_each(pred, pairs_, swap):
  firsts, seconds = [p[swap] for p in pairs_], [p[1 - swap] for p in pairs_]
  _check(pred, pred.predict_pairs(firsts, seconds, batch_size=4), firsts, seconds)

"""A model is bound to its tokenizer and labels; a NaN is an error, not an answer; our files are
written atomically and, when unreadable, named (or, for a cached report, recomputed)."""

import dataclasses
import functools
import json
import pathlib
import types

import jax
import numpy as np
import pytest
from flax import traverse_util

from experiments import selection
from mp_jax import fsio
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, tasks, tokenization
from mp_jax.evaluation import benchmark, reference, report
from mp_jax.model import bert, checks, exit_plan, hf
from mp_jax.model import config as model_config
from mp_jax.serving import engine
from mp_jax.training import runs, trainer
from tests import tiny

CFG = model_config.ModelConfig(vocab_size=len(tiny.SPECIAL + tiny.POS + tiny.NEG + tiny.FILL),
                               hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                               max_position_embeddings=64, num_labels=2, max_seq_length=16,
                               exit_width=8)
SST2_NAMES = ['negative', 'positive']


@functools.cache
def _params(cfg=CFG):
  return jax.tree.map(np.asarray, bert.init_params(cfg, 0))


def _tokenizer(tmp_path):
  return tokenization.Tokenizer.from_dir(tiny.write_vocab(tmp_path / 'vocab'))


def _workdir(tmp_path, cfg=CFG, names=SST2_NAMES, params=None):
  """A trained-looking workdir: final/ (hf.save) and config.json; no training."""
  wd = tmp_path / 'wd'
  hf.save(wd / 'final', cfg, _params(cfg) if params is None else params, _tokenizer(tmp_path),
          names)
  fsio.write_json(wd / 'config.json', {'method': 'bert', 'eval': {'tau': 0.0}})
  return wd


def _flat(params):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep='/')


# --- tokenizer vs the model's vocabulary ------------------------------------------------------

def test_a_tokenizer_with_ids_beyond_the_vocabulary_is_refused_at_load(tmp_path):
  small = dataclasses.replace(CFG, vocab_size=CFG.vocab_size - 4)
  wd = _workdir(tmp_path, small)
  want = (rf'tokenizer has token ids up to {CFG.vocab_size - 1}, but the model has '
          rf'vocab_size={small.vocab_size}')
  with pytest.raises(hf.CheckpointError, match=want) as e:
    hf.load(wd / 'final')
  assert str(wd / 'final') in str(e.value)
  with pytest.raises(hf.CheckpointError, match=want):  # eval.py, benchmark.py and the Predictor
    workdir_lib.load(wd)
  # The same model with a vocabulary that fits loads, and its params round-trip.
  cfg, params, tok = hf.load(_workdir(tmp_path / 'ok').joinpath('final'))
  assert cfg == CFG and tok.max_id == CFG.vocab_size - 1
  for k, v in _flat(_params()).items():
    np.testing.assert_array_equal(_flat(params)[k], v, err_msg=k)


def test_random_init_gives_every_token_id_an_embedding_row(tmp_path):
  """A vocab.txt with a duplicate line has a gap in its ids: its largest id is its count."""
  c = tiny.config(tmp_path, 'method=bert,smoke')
  pathlib.Path(c.model.tokenizer, 'vocab.txt').write_text(
      '\n'.join(tiny.SPECIAL + ['good'] + tiny.POS + tiny.NEG + tiny.FILL) + '\n')
  _, cfg, params, tok = trainer.build(c)
  assert tok.max_id == tok.vocab_size  # one more than the count: the old vocab_size was short
  assert cfg.vocab_size == tok.max_id + 1 == params['embeddings']['word_embeddings'][
      'embedding'].shape[0]


# --- token ids and non-finite outputs in the engine and the reference path --------------------

def _encoded(ids):
  ids = [np.asarray(r, np.int32) for r in ids]
  return batching.Encoded(ids=ids, type_ids=[np.zeros_like(r) for r in ids],
                          labels=np.zeros(len(ids), np.int32),
                          lengths=np.asarray([len(r) for r in ids]))


@functools.cache
def _engine():
  return engine.Engine(CFG, _params(), prune=False, exits=False, length_buckets=(8,),
                       batch_buckets=(2,))


ROWS = [[2, 5, 6, 3], [2, 7, 3]]
KW = dict(pruning='none', exits=False, batch_size=2, length_buckets=(8,))


def test_token_ids_beyond_the_vocabulary_are_an_error_in_engine_and_reference():
  bad = [ROWS[0], [2, 7, CFG.vocab_size, 3]]
  want = rf'example 1 has token id {CFG.vocab_size}, outside .*\[0, {CFG.vocab_size}\)'
  with pytest.raises(ValueError, match='Engine.predict: ' + want):
    _engine().predict(bad)
  with pytest.raises(ValueError, match=want):
    reference.run(_params(), CFG, _encoded(bad), **KW)
  assert np.isfinite(_engine().predict(ROWS)['logits']).all()  # in range: an answer


def test_non_finite_logits_are_an_error_not_an_answer():
  res = reference.run(_params(), CFG, _encoded(ROWS), **KW)
  assert reference.metrics(res, CFG)[0]['num_examples'] == 2
  res['logits'][1, 0] = np.nan
  with pytest.raises(checks.NonFiniteOutput, match=r'1 of 2 examples \(indices \[1\]\)'):
    reference.metrics(res, CFG)
  nan = jax.tree.map(np.copy, _params())
  nan['classifier']['bias'][:] = np.inf  # "diverged weights"
  with pytest.raises(checks.NonFiniteOutput, match=r'2 of 2 examples.*non-finite weights'):
    reference.run(nan, CFG, _encoded(ROWS), **KW)
  eng = _engine()
  try:
    eng.set_params(nan)  # same shapes: no recompile
    with pytest.raises(checks.NonFiniteOutput, match=r'Engine.predict: .*2 of 2 examples'):
      eng.predict(ROWS)
  finally:
    eng.set_params(_params())


# --- dataset labels vs the model's labels -----------------------------------------------------

def _ag_news(d):
  """A 4-label CSV task (ag_news layout: label,title,text with labels 1-4)."""
  d.mkdir(parents=True)
  for name in ('train.csv', 'test.csv'):
    (d / name).write_text(''.join(f'{i % 4 + 1},title {i},good film {i}\n' for i in range(8)))
  return d


@pytest.mark.parametrize('evaluate_fn', [report.build, benchmark.run], ids=['report', 'bench'])
def test_a_two_label_model_on_a_four_label_dataset_is_an_error(tmp_path, evaluate_fn):
  wd = _workdir(tmp_path)
  c = tiny.config(tmp_path, 'method=bert,smoke', **{
      'data.source': 'csv', 'data.task': 'ag_news', 'data.path': str(_ag_news(tmp_path / 'ag'))})
  with pytest.raises(tasks.LabelMismatch) as e:
    evaluate_fn(c, wd)
  msg = str(e.value)
  assert str(wd / 'final') in msg and "task='ag_news'" in msg
  assert "2 labels ['negative', 'positive']" in msg
  assert "4 labels ['World', 'Sports', 'Business', 'Sci/Tech']" in msg
  assert 'label count differ' in msg


def test_label_names_must_agree_unless_generic():
  with pytest.raises(tasks.LabelMismatch, match='label names differ'):
    tasks.check_labels(SST2_NAMES, ['not_equivalent', 'equivalent'], 'm', 'd')
  for names in (['NEGATIVE', 'Positive'], ['0', '1'], ['LABEL_0', 'LABEL_1']):
    tasks.check_labels(names, SST2_NAMES, 'm', 'd')  # case aside; generic: count only
    tasks.check_labels(SST2_NAMES, names, 'm', 'd')
  with pytest.raises(tasks.LabelMismatch, match='label count differ'):
    tasks.check_labels(['0', '1'], ['0', '1', '2'], 'm', 'd')


def test_a_checkpoint_for_other_labels_gets_new_heads_when_training_from_it(tmp_path):
  """A fine-tuned final/ reused as init: its classifier and exit heads are kept only for the
  same labels; other names or another count start new ones (of the right shapes)."""
  trained = jax.tree.map(lambda x: x + 0.5, _params())  # unlike a fresh init's heads
  final = _workdir(tmp_path, params=trained).joinpath('final')
  saved = _flat(trained)
  heads = [k for k in saved if k.startswith(('classifier/', 'exit_'))]
  assert any(k.startswith('exit_') for k in heads)
  for names, kept in ((SST2_NAMES, True), (['NEGATIVE', 'POSITIVE'], True),
                      (['not_equivalent', 'equivalent'], False),
                      (['World', 'Sports', 'Business', 'Sci/Tech'], False)):
    cfg, params, _ = hf.load(final, label_names=names)
    got = _flat(params)
    assert cfg.num_labels == len(names)
    want = _flat(bert.init_params(cfg, 0))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    for k in heads:
      assert np.array_equal(got[k], saved[k]) == kept, (names, k)
    np.testing.assert_array_equal(got['embeddings/word_embeddings/embedding'],
                                  saved['embeddings/word_embeddings/embedding'])


# --- our own files: unreadable ones are named; a cached report is recomputed ------------------

def test_a_garbage_config_json_is_an_error_naming_the_file(tmp_path):
  wd = _workdir(tmp_path)
  (wd / 'config.json').write_text('garbage')
  with pytest.raises(fsio.UnreadableFile, match=rf'{wd / "config.json"}: not valid JSON'):
    workdir_lib.load(wd)
  fsio.write_json(wd / 'config.json', {'method': 'bert'})
  for name in ('config.json', hf.META_FILE):
    good = (wd / 'final' / name).read_text()
    (wd / 'final' / name).write_text(good[:len(good) // 2])  # a truncated write
    with pytest.raises(hf.CheckpointError, match=rf'{wd / "final" / name}: not valid JSON'):
      workdir_lib.load(wd)
    (wd / 'final' / name).write_text(good)
  workdir_lib.load(wd)


def test_a_truncated_report_is_evaluated_again(tmp_path, monkeypatch):
  built = []
  rep = lambda tau: {'tau': tau, 'tau_sweep': [{'tau': tau}],
                     'head_weight': exit_plan.DEFAULT_WEIGHT}  # report.build's, for exits
  monkeypatch.setattr(report, 'build',
                      lambda c, wd, tau, extra_taus: built.append(tau) or rep(tau))
  monkeypatch.setattr(report, 'write', lambda r, d: fsio.write_json(d / 'report.json', r))
  monkeypatch.setattr(report, 'load_predictions', lambda d: {'tau': np.asarray([0.25])})
  c = types.SimpleNamespace(method='mp', eval=types.SimpleNamespace(head_weight=None))
  path = tmp_path / 'eval' / 'report.json'
  path.parent.mkdir()
  path.write_text('{"accuracy": 0.')  # a kill mid-write by a non-atomic writer
  assert selection.evaluate_once(c, tmp_path, 0.25) == (
      {**rep(0.25), 'stages': None, 'format': runs.FINAL_FORMAT}, True)
  assert selection.evaluate_once(c, tmp_path, 0.25)[1] is False  # now reused
  assert built == [0.25]
  c.eval.head_weight = 2.0  # another exit plan's heads: evaluated again, not reused
  assert selection.evaluate_once(c, tmp_path, 0.25)[1] is True and built == [0.25, 0.25]


def test_hf_save_writes_every_file_through_fsio(tmp_path, monkeypatch):
  """No file of a saved model is written in place (a kill leaves the old file or the new)."""
  written = []
  real = fsio.write_bytes
  monkeypatch.setattr(fsio, 'write_bytes', lambda p, b: written.append(p.name) or real(p, b))
  d = hf.save(tmp_path / 'm', CFG, _params(), _tokenizer(tmp_path), SST2_NAMES)
  assert sorted(written) == sorted(p.name for p in d.iterdir())
  assert written[-1] == 'config.json'  # last: a directory with a config.json is complete
  assert 'tokenizer.json' in written and 'model.safetensors' in written
  assert json.loads((d / 'config.json').read_text())['id2label'] == {'0': 'negative',
                                                                     '1': 'positive'}

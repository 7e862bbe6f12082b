"""Parameters stay on the device: evaluation, the engine and the Predictor move no host data
implicitly once set up (jax.transfer_guard); only the per-batch inputs move (Engine.predict hands
them to its program in a scope that allows it, and refuses host params at set_params)."""

import dataclasses
import functools
import pathlib
import tempfile

import jax
import numpy as np
import pytest

from mp_jax.data import batching, tokenization
from mp_jax.evaluation import reference
from mp_jax.model import bert
from mp_jax.model import config as model_config
from mp_jax.serving import engine, predictor
from mp_jax.training import distributed, trainer
from tests import tiny

CFG = model_config.ModelConfig(vocab_size=34, hidden_size=16, num_layers=2, num_heads=2,
                               intermediate_size=32, max_position_embeddings=64, num_labels=3,
                               max_seq_length=32, exit_width=8, final_threshold=0.05)
KW = dict(pruning='hard', exits=True, batch_size=4, length_buckets=(8, 16, 32))


@functools.cache
def _params():
  return bert.init_params(CFG, 0)


def _encoded(n=11, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, CFG.max_seq_length + 1, n)
  ids = [np.concatenate([[2], rng.integers(5, CFG.vocab_size, m - 1)]).astype(np.int32)
         for m in lengths]
  return batching.Encoded(ids=ids, type_ids=[np.zeros_like(i) for i in ids],
                          labels=rng.integers(0, 3, n), lengths=lengths)


def _guarded(fn):
  with jax.transfer_guard_host_to_device('disallow'):
    return fn()


def test_the_guard_catches_host_params_per_batch():
  """What evaluation used to do (host numpy params into the jitted forward each batch) fails
  under the guard, so the tests below would catch it."""
  enc = _encoded()
  host = jax.tree.map(np.asarray, _params())
  reference.run(host, CFG, enc, **KW)  # compiles
  fwd = reference._forward(CFG, KW['pruning'], KW['exits'])
  batch = next(batching.batches(enc, 4, buckets=(8, 16, 32)))
  batch = jax.device_put({k: batch[k] for k in reference.INPUTS})
  with pytest.raises(Exception, match='Disallowed host-to-device transfer'):
    _guarded(lambda: fwd(host, batch))
  eng = engine.Engine(CFG, _params(), length_buckets=(8, 16, 32), batch_buckets=(1, 4))
  ids, types, mask = (np.ones((4, 8), np.int32) for _ in range(3))
  eng.run(ids, types, mask)
  with pytest.raises(Exception, match='Disallowed host-to-device transfer'):  # implicit inputs
    _guarded(lambda: eng.program(4, 8)(eng.operands(4, 8), ids, types, mask,
                                       np.zeros(CFG.num_layers, np.float32)))


def test_reference_evaluation_moves_no_host_data_implicitly():
  enc = _encoded()
  want = reference.run(_params(), CFG, enc, **KW)  # host params: one explicit copy a call
  reference.metrics(want, CFG, tau=0.5)
  dev = jax.device_put(_params())
  got = _guarded(lambda: reference.run(dev, CFG, enc, **KW))
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  _guarded(lambda: reference.run(_params(), CFG, enc, **KW))  # explicit copies only
  m, exit_layer, _ = _guarded(lambda: reference.metrics(got, CFG, tau=0.5))  # the tau sweep
  assert m == reference.metrics(want, CFG, tau=0.5)[0] and exit_layer.min() >= 1


def test_dev_evaluation_during_training_uses_the_replicated_state(tmp_path):
  """run_stage evaluates the replicated device state (no round trip through the host)."""
  c = tiny.config(tmp_path, 'method=mp,smoke')
  enc = _encoded()
  want = trainer.evaluate_split(_params(), CFG, c, enc, 'mp')
  state = distributed.replicate(_params(), distributed.mesh())
  got = _guarded(lambda: trainer.evaluate_split(state, CFG, c, enc, 'mp'))
  assert got == want


def test_engine_and_predictor_keep_params_on_the_device():
  with tempfile.TemporaryDirectory() as d:
    tok = tokenization.Tokenizer.from_dir(tiny.write_vocab(pathlib.Path(d)))
  cfg = dataclasses.replace(CFG, vocab_size=tok.vocab_size)
  pred = predictor.Predictor(cfg, bert.init_params(cfg, 0), tok, ['a', 'b', 'c'],
                             method='mp', tau=0.5, length_buckets=(8, 16, 32))
  texts = ['the movie was good', 'a plot, very dull and cold', 'fine ' * 20]
  want = pred.predict(texts, batch_size=4)  # compiles
  assert _guarded(lambda: pred.predict(texts, batch_size=4)) == want
  pred.predict(texts, batch_size=2)
  # Every batch size's engine runs on one device copy of the params.
  for a, b in zip(*(jax.tree.leaves(pred.engine(n).params) for n in (4, 2)), strict=True):
    assert a is b
  eng = pred.engine(4)
  rows = pred.encode(texts)
  out = _guarded(lambda: eng.predict(rows))
  assert [pred.label_names[i] for i in out['labels']] == [w['label'] for w in want]


def test_an_engine_refuses_params_left_on_the_host():
  """Engine.predict allows its inputs' transfer around the program call; params on the host
  would ride along at every call, unseen by the guard, so set_params (and assigning `params`)
  refuses them by name."""
  host = engine.Prepared(jax.tree.map(np.asarray, engine.prepare(CFG, _params()).tree))
  with pytest.raises(ValueError, match='host leaves: classifier/bias, '):
    engine.Engine(CFG, host, length_buckets=(8, 16, 32), batch_buckets=(1, 4))
  eng = engine.Engine(CFG, engine.prepare(CFG, _params()), length_buckets=(8, 16, 32),
                      batch_buckets=(1, 4))
  with pytest.raises(ValueError, match='must be on the device'):
    eng.set_params(host)
  with pytest.raises(ValueError, match='must be on the device'):  # assigned: the same check
    eng.params = host
  eng.params = jax.tree.map(np.asarray, _params())  # a model's tree: prepared, on the device
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(eng.params))


def test_an_engine_refuses_params_of_another_shape_by_name():
  """Its programs are compiled for its params' shapes: another model's are refused at
  set_params, naming the leaf (a packed matrix by its path inside the layer), and nothing
  changes."""
  eng = engine.Engine(CFG, engine.prepare(CFG, _params()), length_buckets=(8, 16, 32),
                      batch_buckets=(1, 4))
  before = eng.params
  wide = jax.tree.map(np.asarray, _params())
  kernel = wide['layer_1']['intermediate']['dense']['kernel']
  wide['layer_1']['intermediate']['dense']['kernel'] = np.zeros(
      (kernel.shape[0], kernel.shape[1] + 2), kernel.dtype)
  with pytest.raises(ValueError, match="params to pack do not match the model's: "
                     r"intermediate/dense/kernel is \(\d+, \d+\) float32"):
    eng.set_params(wide)  # a model's tree: packing it against the model's template fails
  other = engine.prepare(CFG, _params())
  other.tree['per_layer'][1]['[\'intermediate\'][\'dense\'][\'kernel\']'] = jax.device_put(
      wide['layer_1']['intermediate']['dense']['kernel'])
  with pytest.raises(ValueError, match="params do not match the engine's .*: "
                     "per_layer/1/intermediate/dense/kernel is "):
    eng.set_params(other)  # prepared elsewhere: checked against the engine's own
  assert eng.params is before
  # A dense engine reads the per-layer weights only: built on a stacked copy, it takes a
  # model's tree, prepared without the stacked ones.
  dense = engine.DenseEngine(CFG, engine.prepare(CFG, _params()), length_buckets=(8, 16, 32),
                             batch_buckets=(1, 4))
  assert 'layers' in dense.params
  dense.set_params(_params())
  assert 'layers' not in dense.params

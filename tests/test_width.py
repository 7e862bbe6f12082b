"""Width pruning (mp_jax.model.width): config, Taylor scores, slicing == masking, SVD, engine."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mp_jax.data import batching
from mp_jax.evaluation import reference
from mp_jax.model import bert, width
from mp_jax.model import config as model_config
from mp_jax.model import exits as exits_lib
from mp_jax.serving import engine as engine_lib
from tests import test_engine
from tests.conftest import make_batch, tiny_config

CFG = tiny_config()  # 3 layers, d = 32, 4 heads of 8, FFN 37, n = 16
BATCH = make_batch((11, 4, 7, 16), 16)
LABELS = np.asarray([0, 2, 1, 1])
NEW = ('head_size', 'embedding_rank', 'unpruned_heads', 'unpruned_intermediate_size')


@pytest.fixture(scope='module')
def params():
  return test_engine.random_params(CFG, seed=1)


def _apply(cfg, params, pruning='none', batch=BATCH):
  return bert.MagicPyramid(cfg).apply({'params': params}, *batch, pruning=pruning, exits=True)


def _alive_quantile_thresholds(cfg, params, q):
  """Per-layer thresholds at the q-quantile of the alive tokens' scores (unpruned run)."""
  _, aux = _apply(cfg, params)
  scores_LxBxT = np.asarray(aux['scores'])
  real = BATCH[2].astype(bool)
  return np.asarray([np.quantile(s[real], q) for s in scores_LxBxT], np.float32)


# -- config -------------------------------------------------------------------------------------

def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match='embedding_rank'):
    tiny_config(embedding_rank=-1)
  with pytest.raises(ValueError, match='embedding_rank'):
    tiny_config(embedding_rank=32)
  with pytest.raises(ValueError, match='head_size'):
    tiny_config(head_size=-2)
  with pytest.raises(ValueError, match='unpruned_heads'):
    tiny_config(num_heads=4, unpruned_heads=3)
  with pytest.raises(ValueError, match='unpruned_intermediate_size'):
    tiny_config(unpruned_intermediate_size=36)
  with pytest.raises(ValueError, match='num_heads'):
    tiny_config(num_heads=0)
  odd = tiny_config(num_heads=5)  # 32 % 5: only a head size can say how wide a head is
  with pytest.raises(ValueError, match=r'hidden_size=32 is not divisible by model.num_heads=5'):
    _ = odd.head_dim
  assert tiny_config(num_heads=5, head_size=4).attention_size == 20


def test_config_widths_unpruned_and_old_json():
  assert (CFG.head_dim, CFG.attention_size, CFG.unpruned()) == (8, 32, CFG)
  slim = CFG.replace(num_heads=2, head_size=8, intermediate_size=18, unpruned_heads=4,
                     unpruned_intermediate_size=37, embedding_rank=5)
  assert (slim.head_dim, slim.attention_size) == (8, 16)
  assert slim.unpruned() == CFG  # full widths, default head size written 0, no factorisation
  # A saved model_config from before these fields loads as the plain model; a slim one round trips.
  old = {k: v for k, v in dataclasses.asdict(CFG).items() if k not in NEW}
  assert model_config.ModelConfig(**old) == CFG
  assert model_config.ModelConfig(**dataclasses.asdict(slim)) == slim


# -- importance and selection -------------------------------------------------------------------

def _loss(params, cfg, batch=BATCH, labels=LABELS):
  """COST-EFF's L: the final classifier's loss plus every exit's (the caller's choice)."""
  logits, aux = _apply(cfg, params, batch=batch)
  all_logits = jnp.concatenate([aux['exit_logits'], logits[None]])
  ce = optax.softmax_cross_entropy_with_integer_labels
  return ce(all_logits, jnp.broadcast_to(labels, all_logits.shape[:2])).mean(-1).sum()


def test_taylor_scores_match_finite_differences(params):
  loss = jax.jit(lambda p: _loss(p, CFG))
  grads = jax.tree.map(np.asarray, jax.jit(jax.grad(lambda p: _loss(p, CFG)))(params))
  eps, dh = 1e-2, CFG.head_dim

  def fd(scale):  # central difference of L(alpha) at alpha = 1, alpha scaling one weight group
    hi, lo = (float(loss(scale(jax.tree.map(np.copy, params), 1 + s * eps))) for s in (1, -1))
    return (hi - lo) / (2 * eps)

  # The gradient itself: a directional derivative along a random direction of one kernel.
  v = np.random.default_rng(0).normal(size=params['layer_1']['output']['dense']['kernel'].shape)

  def along(p, a):
    p['layer_1']['output']['dense']['kernel'] = p['layer_1']['output']['dense']['kernel'] + (
        a - 1) * v.astype(np.float32)
    return p
  np.testing.assert_allclose(fd(along), (grads['layer_1']['output']['dense']['kernel'] * v).sum(),
                             rtol=2e-3, atol=5e-5)

  signed_LxH = width.head_scores(params, grads, CFG, signed=True)
  abs_LxH = width.head_scores(params, grads, CFG)
  assert signed_LxH.shape == (3, 4)
  for l in range(3):
    for h in range(4):
      rows = slice(h * dh, (h + 1) * dh)

      def head(p, a, l=l, rows=rows):
        p[f'layer_{l}']['attention']['output']['dense']['kernel'][rows] *= a
        return p
      np.testing.assert_allclose(signed_LxH[l, h], fd(head), rtol=2e-3, atol=5e-5,
                                 err_msg=f'layer {l} head {h}')
      w, g = (t[f'layer_{l}']['attention']['output']['dense']['kernel'][rows]
              for t in (params, grads))
      np.testing.assert_allclose(abs_LxH[l, h], np.abs(w * g).sum(), rtol=1e-6)
  assert np.all(abs_LxH >= np.abs(signed_LxH))
  assert np.ptp(abs_LxH) > 0.1 * abs_LxH.max()  # heads differ: the check could tell them apart

  signed_LxF = width.ffn_scores(params, grads, CFG, signed=True)
  assert signed_LxF.shape == (3, 37)
  for l, j in ((0, 0), (0, 36), (1, 5), (2, 17), (2, 30)):

    def neuron(p, a, l=l, j=j):
      layer = p[f'layer_{l}']
      layer['intermediate']['dense']['kernel'][:, j] *= a
      layer['intermediate']['dense']['bias'][j] *= a
      layer['output']['dense']['kernel'][j] *= a
      return p
    np.testing.assert_allclose(signed_LxF[l, j], fd(neuron), rtol=2e-3, atol=5e-5,
                               err_msg=f'layer {l} neuron {j}')
  abs_LxF = width.ffn_scores(params, grads, CFG)
  up, g_up = params['layer_2']['intermediate']['dense'], grads['layer_2']['intermediate']['dense']
  down, g_down = params['layer_2']['output']['dense']['kernel'], grads['layer_2']['output'][
      'dense']['kernel']
  want = (np.abs(up['kernel'][:, 4] * g_up['kernel'][:, 4]).sum()
          + abs(up['bias'][4] * g_up['bias'][4]) + np.abs(down[4] * g_down[4]).sum())
  np.testing.assert_allclose(abs_LxF[2, 4], want, rtol=1e-6)


def test_select_keeps_the_best_m_in_every_layer():
  s_LxK = np.asarray([[0.1, 0.9, 0.5, 0.7], [0.8, 0.2, 0.3, 0.1], [0.0, 0.0, 1.0, 0.5]])
  np.testing.assert_array_equal(width.select(s_LxK, 0.5), [[1, 3], [0, 2], [2, 3]])
  np.testing.assert_array_equal(width.select(s_LxK, 0.1), [[1], [0], [2]])  # at least one
  assert width.select(np.zeros((2, 37)), 0.5).shape == (2, 18)  # round(18.5): even
  assert width.select(s_LxK, 1.0).tolist() == [[0, 1, 2, 3]] * 3
  with pytest.raises(ValueError, match='keep'):
    width.select(s_LxK, 0.0)


# -- slicing, masking, factorising --------------------------------------------------------------

HEADS = np.asarray([[0, 2], [1, 3], [0, 3]])
NEURONS = width.select(np.random.default_rng(3).normal(size=(3, 37)), 0.5)


def test_slice_shapes_config_and_index_checks(params):
  p, cfg = width.slice_params(params, CFG, HEADS, NEURONS)
  assert (cfg.num_heads, cfg.head_size, cfg.intermediate_size) == (2, 8, 18)
  assert (cfg.unpruned_heads, cfg.unpruned_intermediate_size, cfg.unpruned()) == (4, 37, CFG)
  att = p['layer_1']['attention']
  assert att['query']['kernel'].shape == (32, 16) and att['value']['bias'].shape == (16,)
  assert att['output']['dense']['kernel'].shape == (16, 32)
  np.testing.assert_array_equal(att['key']['kernel'][:, 8:],
                                params['layer_1']['attention']['key']['kernel'][:, 24:])
  assert p['layer_0']['intermediate']['dense']['kernel'].shape == (32, 18)
  assert p['layer_0']['output']['dense']['kernel'].shape == (18, 32)
  assert params['layer_1']['attention']['query']['kernel'].shape == (32, 32)  # input untouched
  # Slicing again counts against the original widths.
  _, cfg2 = width.slice_params(p, cfg, [[1]] * 3, None)
  assert (cfg2.num_heads, cfg2.unpruned_heads, cfg2.intermediate_size) == (1, 4, 18)
  with pytest.raises(ValueError, match='same M'):
    width.slice_params(params, CFG, [[0, 1], [2, 3]], None)
  with pytest.raises(ValueError, match='repeated'):
    width.slice_params(params, CFG, [[0, 0]] * 3, None)
  with pytest.raises(ValueError, match=r'\[0, 37\)'):
    width.slice_params(params, CFG, None, [[37]] * 3)


@pytest.mark.parametrize('pruning', ['none', 'hard'])
def test_sliced_model_equals_masked_unpruned_model(params, pruning):
  slim_p, slim_cfg = width.slice_params(params, CFG, HEADS, NEURONS)
  if pruning == 'hard':
    slim_p['thresholds'] = _alive_quantile_thresholds(slim_cfg, slim_p, 0.3)
  masked_p = width.mask_params(params | {'thresholds': slim_p['thresholds']}, CFG, HEADS, NEURONS)
  logits, aux = _apply(slim_cfg, slim_p, pruning)
  want, want_aux = _apply(CFG, masked_p, pruning)
  np.testing.assert_allclose(logits, want, atol=1e-5, rtol=0)
  np.testing.assert_allclose(aux['exit_logits'], want_aux['exit_logits'], atol=1e-5, rtol=0)
  for k in ('n_attn', 'n_ffn', 'masks'):
    np.testing.assert_array_equal(aux[k], want_aux[k], err_msg=k)
  if pruning == 'hard':
    assert (np.asarray(aux['n_ffn']) < np.asarray(aux['n_attn'])).any()  # tokens were dropped
  # The same masking of other heads is another model: the comparison can fail.
  other = width.mask_params(params, CFG, 3 - HEADS, NEURONS)
  assert np.abs(np.asarray(_apply(CFG, other)[0]) - np.asarray(_apply(slim_cfg, slim_p)[0])).max(
      ) > 1e-3


def test_factorised_embedding(params):
  rng = np.random.default_rng(4)
  p = jax.tree.map(np.copy, params)
  table_VxD = (rng.normal(size=(40, 6)) @ rng.normal(size=(6, 32)) / 4).astype(np.float32)
  p['embeddings']['word_embeddings']['embedding'] = table_VxD
  fp, fcfg = width.factorise_embedding(p, CFG, 6)  # the table has rank 6: exact
  assert fcfg.embedding_rank == 6
  assert fp['embeddings']['word_embeddings']['embedding'].shape == (40, 6)
  assert fp['embeddings']['word_projection']['kernel'].shape == (6, 32)
  np.testing.assert_allclose(width.word_table(fp, fcfg), table_VxD, atol=1e-5)
  np.testing.assert_allclose(_apply(fcfg, fp)[0], _apply(CFG, p)[0], atol=1e-5, rtol=0)
  # A lower rank is the truncated SVD: its error is the dropped singular values'.
  lp, lcfg = width.factorise_embedding(p, CFG, 4)
  s = np.linalg.svd(table_VxD.astype(np.float64), compute_uv=False)
  err = np.linalg.norm(width.word_table(lp, lcfg) - table_VxD)
  np.testing.assert_allclose(err, np.sqrt((s[4:] ** 2).sum()), rtol=1e-4)
  with pytest.raises(ValueError, match='rank'):
    width.factorise_embedding(p, CFG, 32)


# -- the engine on a slim model -----------------------------------------------------------------

def test_engine_on_a_slim_model_matches_reference():
  cfg = test_engine.CFG  # 4 layers, d = 32, 4 heads, FFN 64, n = 64
  rng = np.random.default_rng(5)
  p, slim = width.slice_params(test_engine.random_params(cfg, seed=2), cfg,
                               width.select(rng.normal(size=(4, 4)), 0.5),
                               width.select(rng.normal(size=(4, 64)), 0.25))
  p, slim = width.factorise_embedding(p, slim, 8)
  assert (slim.attention_size, slim.intermediate_size, slim.embedding_rank) == (16, 16, 8)
  rows = test_engine.make_rows(17, 8, min_len=17)  # one (8, 64) program
  enc = batching.Encoded(ids=[r[0] for r in rows], type_ids=[r[1] for r in rows],
                         labels=np.zeros(len(rows), np.int32),
                         lengths=np.asarray([len(r[0]) for r in rows]))
  # Thresholds at a fifth of the alive tokens' scores in every layer (of the unpruned run).
  ids, types, mask = test_engine.pad(rows, b=8)
  _, aux = bert.MagicPyramid(slim).apply({'params': p}, ids, types, mask, exits=True)
  p['thresholds'] = np.asarray([np.quantile(s[mask.astype(bool)], 0.2)
                                for s in np.asarray(aux['scores'])], np.float32)
  res = reference.run(p, slim, enc, pruning='hard', exits=True, batch_size=8,
                      length_buckets=test_engine.LENGTHS)
  tau = test_engine.pick_tau(np.asarray(exits_lib.uncertainty(res['exit_logits'])), 0.4)
  exit_N, logits_NxC = reference.decide(res, tau, slim.num_layers)
  eng = engine_lib.Engine(slim, p, prune=True, exits=True, length_buckets=test_engine.LENGTHS,
                          batch_buckets=(8,), compiler_options=test_engine.FAST_COMPILE)
  out = eng.predict(enc, tau=tau)
  ran_NxL = np.arange(4)[None] < exit_N[:, None]  # the engine counts executed layers only
  test_engine.assert_same(out, {'labels': logits_NxC.argmax(-1), 'logits': logits_NxC,
                                'exit_layer': exit_N, 'n_attn': res['n_attn'] * ran_NxL,
                                'n_ffn': res['n_ffn'] * ran_NxL})
  assert (out['n_ffn'] < out['n_attn']).any() and len(set(out['exit_layer'].tolist())) >= 2

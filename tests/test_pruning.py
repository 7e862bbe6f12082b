"""Learned token pruning (SPEC §2): gradients, cumulative hard masks, [CLS], padding, invariance."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mp_jax.model import bert, pruning
from tests.conftest import make_batch, peaky_params, tiny_config

LENGTHS = (11, 6, 9)
T = 11
N = 16  # tiny_config's max_seq_length


@pytest.fixture(scope='module')
def setup():
  cfg = tiny_config()
  params = peaky_params(cfg)
  params['thresholds'] = np.full((cfg.num_layers,), 0.9 / N, np.float32)
  return cfg, params, make_batch(LENGTHS, T)


def _apply(cfg, params, batch, **kw):
  return bert.MagicPyramid(cfg).apply({'params': params}, *batch, **kw)


def _with_thresholds(params, values):
  return {**params, 'thresholds': np.asarray(values, np.float32)}


def test_threshold_init_is_linear_in_depth():
  np.testing.assert_allclose(pruning.init_thresholds(4, 0.08), [0.02, 0.04, 0.06, 0.08],
                             rtol=1e-6)
  cfg = tiny_config(final_threshold=0.03)
  np.testing.assert_allclose(bert.init_params(cfg)['thresholds'], [0.01, 0.02, 0.03],
                             rtol=1e-6)


def test_threshold_gradients_soft_nonzero_hard_zero(setup):
  cfg, params, batch = setup
  cfg = cfg.replace(temperature=0.02)
  real = jnp.asarray(batch[2])
  w_BxC = jax.random.normal(jax.random.PRNGKey(0), (len(LENGTHS), cfg.num_labels))

  def losses(thresholds, mode):
    """(a loss through the logits, the soft keep)."""
    logits, aux = _apply(cfg, {**params, 'thresholds': thresholds}, batch, pruning=mode)
    return jnp.stack([(logits * w_BxC).sum(), pruning.soft_keep(aux['masks'], real)])

  theta = jnp.asarray(params['thresholds'])
  jac = jax.jit(jax.jacrev(losses), static_argnums=1)  # one compile beats eager autodiff here
  g_logits, g_pen = np.asarray(jac(theta, 'soft'))
  assert np.all(np.isfinite(g_logits)) and np.all(np.isfinite(g_pen))
  # Every layer but the last moves the logits (the pooler reads only [CLS] of the last layer,
  # and [CLS] is always kept), and raising any threshold lowers the keep.
  assert np.all(np.abs(g_logits[:-1]) > 1e-6) and g_logits[-1] == 0.0, g_logits
  assert np.all(g_pen < -1e-6), g_pen
  g_hard = np.asarray(jac(theta, 'hard'))
  np.testing.assert_array_equal(g_hard, np.zeros_like(g_hard))


def test_hard_masks_are_cumulative(setup):
  cfg, params, batch = setup
  # Layer 2's threshold is below every score (scores >= 0): a non-cumulative rule would bring
  # back everything layer 1 pruned.
  p = _with_thresholds(params, [0.9 / N, -1.0, 0.9 / N])
  _, aux = _apply(cfg, p, batch, pruning='hard')
  m = np.asarray(aux['masks'])
  assert (batch[2] - m[0]).sum() > 0  # layer 1 pruned something
  np.testing.assert_array_equal(m[1], m[0])
  assert np.all(m[2] <= m[1]) and m[2].sum() < m[1].sum()
  # The pure function: an alive token below threshold goes, a dead one above stays dead.
  keep = pruning.hard_keep(jnp.asarray([[0.0, 0.5, 0.1, 0.9]]), 0.2,
                           jnp.asarray([[True, True, True, False]]))
  np.testing.assert_array_equal(keep, [[True, True, False, False]])


@pytest.mark.parametrize('mode', ['hard', 'soft'])
def test_cls_survives_any_threshold(setup, mode):
  cfg, params, batch = setup
  logits, aux = _apply(cfg, _with_thresholds(params, [1e9] * 3), batch, pruning=mode,
                       exits=True)
  m = np.asarray(aux['masks'])
  np.testing.assert_array_equal(m[:, :, 0], 1.0)
  np.testing.assert_array_equal(m[:, :, 1:], 0.0)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(aux['exit_logits']))
  if mode == 'hard':
    np.testing.assert_array_equal(aux['n_ffn'], 1)
    np.testing.assert_array_equal(aux['n_attn'][1:], 1)


def test_padding_never_counted(setup):
  cfg, params, batch = setup
  real = batch[2].astype(bool)
  lengths = np.asarray(LENGTHS)
  for mode in ('none', 'soft', 'hard'):
    for theta in (-1.0, 0.9 / N):
      _, aux = _apply(cfg, _with_thresholds(params, [theta] * 3), batch, pruning=mode)
      m = np.asarray(aux['masks'])
      assert np.all(m[:, ~real] == 0), (mode, theta)
      assert np.all(np.asarray(aux['scores'])[:, ~real] == 0)
      np.testing.assert_array_equal(aux['n_attn'][0], lengths)
      assert np.all(aux['n_ffn'] <= lengths)
      if mode != 'hard' or theta < 0:  # nothing pruned: exactly the real lengths
        np.testing.assert_array_equal(aux['n_ffn'], np.tile(lengths, (3, 1)))


def test_scores_follow_the_formula(setup):
  cfg, params, batch = setup
  _, aux = _apply(cfg, params, batch, pruning='hard', return_attention=True)
  a = np.asarray(aux['attention'], np.float64)  # (L, B, H, T, T)
  alive = np.concatenate([batch[2][None], np.asarray(aux['masks'])[:-1]]).astype(np.float64)
  want = np.einsum('lbhij,lbi->lbj', a, alive) / (cfg.num_heads * N)
  np.testing.assert_allclose(aux['scores'], want, atol=1e-7)
  # Rows of the attention over kept keys sum to 1, so real scores average 1/n per layer.
  s = np.asarray(aux['scores'])[0]
  np.testing.assert_allclose(s.sum(-1), np.asarray(LENGTHS) / N, rtol=1e-5)


@pytest.mark.parametrize('mode', ['soft', 'hard'])
def test_scores_do_not_depend_on_padded_length(setup, mode):
  cfg, params, batch = setup
  longer = tuple(np.pad(x, ((0, 0), (0, N - T))) for x in batch)
  short_logits, short = _apply(cfg, params, batch, pruning=mode)
  long_logits, long = _apply(cfg, params, longer, pruning=mode)
  np.testing.assert_allclose(long['scores'][:, :, :T], short['scores'], atol=1e-7, rtol=1e-6)
  np.testing.assert_array_equal(long['scores'][:, :, T:], 0.0)
  np.testing.assert_allclose(long['masks'][:, :, :T], short['masks'], atol=1e-6)
  np.testing.assert_array_equal(long['n_ffn'], short['n_ffn'])
  np.testing.assert_allclose(long_logits, short_logits, atol=1e-5)


def _perturb_inputs(name, method, where_BxT, noise_BxTxD):
  """An interceptor adding noise to the hidden states that `name.method` gets, where `where`."""

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == method and context.module.name == name:
      args = (args[0] + jnp.where(where_BxT[..., None], noise_BxTxD, 0.0), *args[1:])
    return next_fun(*args, **kwargs)

  return interceptor


def test_pruned_tokens_cannot_change_any_output(setup):
  """A token pruned at layer l took part in layer l's attention, but after that nothing it
  holds may matter: not its input to later layers, not its FFN at layer l, not the exit heads."""
  cfg, params, batch = setup
  real = batch[2].astype(bool)
  outputs = lambda: _apply(cfg, params, batch, pruning='hard', exits=True)
  logits, aux = outputs()
  gone_LxBxT = np.asarray(aux['masks']) == 0  # pruned at layers <= l, or padding
  noise = 50.0 * jax.random.normal(jax.random.PRNGKey(3), (len(LENGTHS), T, cfg.hidden_size))
  cases = [(f'layer_{l}', '__call__', gone_LxBxT[l - 1]) for l in range(1, cfg.num_layers)]
  cases += [(f'layer_{l}', 'ffn', gone_LxBxT[l]) for l in range(cfg.num_layers)]
  cases += [(f'exit_{l}', '__call__', gone_LxBxT[l]) for l in range(cfg.num_layers - 1)]
  for name, method, gone_BxT in cases:
    assert (gone_BxT & real).any()
    with nn.intercept_methods(_perturb_inputs(name, method, gone_BxT, noise)):
      logits2, aux2 = outputs()
    np.testing.assert_array_equal(logits2, logits, err_msg=f'{name}.{method}')
    np.testing.assert_array_equal(aux2['exit_logits'], aux['exit_logits'])
    np.testing.assert_array_equal(aux2['scores'], aux['scores'])
    np.testing.assert_array_equal(aux2['masks'], aux['masks'])
    # The same noise on the tokens still there does change the answers.
    with nn.intercept_methods(_perturb_inputs(name, method, ~gone_BxT, noise)):
      logits3, aux3 = outputs()
    changed = max(np.abs(np.asarray(logits3 - logits)).max(),
                  np.abs(np.asarray(aux3['exit_logits'] - aux['exit_logits'])).max())
    assert changed > 1e-3, f'{name}.{method}'


def test_soft_mask_multiplies_layer_output(setup):
  cfg, params, batch = setup
  cfg = cfg.replace(temperature=0.02)
  _, plain = _apply(cfg, params, batch, return_hidden=True)
  _, soft = _apply(cfg, params, batch, pruning='soft', return_hidden=True)
  m_BxT = np.asarray(soft['masks'][0])
  assert 0.05 < m_BxT[batch[2] == 1].mean() < 0.95  # genuinely soft
  np.testing.assert_allclose(soft['hidden'][1], plain['hidden'][1] * m_BxT[..., None],
                             atol=1e-6)
  want = 1 / (1 + np.exp(-(np.asarray(soft['scores'][0]) - 0.9 / N) / 0.02))
  want[:, 0] = 1.0
  np.testing.assert_allclose(m_BxT, want * batch[2], atol=1e-6)


def test_soft_keep_is_cumulative_over_real_tokens_and_equals_token_keep_on_hard_masks():
  real_BxT = jnp.asarray([[1, 0, 0, 0], [1, 1, 1, 0]])
  ones = jnp.ones((2, 2, 4))
  np.testing.assert_allclose(pruning.soft_keep(ones, real_BxT), 1.0)
  np.testing.assert_allclose(pruning.soft_keep(0.5 * ones, real_BxT), (0.5 + 0.25) / 2)
  # Layer 1 keeps tokens 0, 1 of row 2; layer 2's mask revives token 2, which stays out.
  m = jnp.asarray([[[1, 9, 9, 9], [1, 1, 0, 9]], [[1, 9, 9, 9], [1, 0, 1, 9]]], jnp.float32)
  np.testing.assert_allclose(pruning.soft_keep(m, real_BxT), (3 / 4 + 2 / 4) / 2, rtol=1e-6)
  n_ffn_NxL = np.asarray([[1, 1], [2, 1]])  # what hard masks with the same decisions count
  assert pruning.token_keep(n_ffn_NxL, [1, 3]) == pytest.approx((3 / 4 + 2 / 4) / 2)
  g = jax.grad(lambda x: pruning.soft_keep(x, real_BxT))(m)
  assert float(g[0, 0, 1]) == 0.0 and float(g[0, 1, 3]) == 0.0  # padding: no gradient
  assert float(g[1, 1, 2]) == 0.0  # cut by layer 1: layer 2's mask cannot bring it back
  assert float(g[0, 1, 1]) > 0 and float(g[1, 1, 1]) > 0


@pytest.mark.parametrize('target', [0.9, 0.5, 0.2])
def test_calibrate_finds_the_threshold_that_meets_the_target(target):
  keep_of = lambda f: 1.0 / (1.0 + (f / 0.01) ** 2)  # decreasing; keep 0.5 at f = 0.01
  f, k = pruning.calibrate(keep_of, target)
  assert k == pytest.approx(target, abs=2e-3) and keep_of(f) == k
  assert pruning.calibrate(keep_of, 1.0)[0] == 1e-6  # beyond reach: the nearer end
  assert pruning.calibrate(keep_of, 1e-9)[0] == 1.0

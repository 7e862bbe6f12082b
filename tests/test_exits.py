"""Early exits (SPEC §3): uncertainty, the exit rule, distillation directions, the exit head."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mp_jax.model import exits

SETTINGS = settings(max_examples=60, deadline=None)
FINITE = st.floats(allow_nan=False, allow_infinity=False, width=32)
MODERATE = st.floats(-30, 30, allow_nan=False, width=32)


def _logits(elements):
  # Few distinct shapes: each new shape costs an eager compile.
  return st.sampled_from([(3, 2), (3, 3), (3, 5)]).flatmap(
      lambda shape: hnp.arrays(np.float32, shape, elements=elements))


@SETTINGS
@given(_logits(FINITE))
@example(np.asarray([[3e38, -3e38], [-3e38, 3e38], [0, 0]], np.float32))  # gaps overflow to inf
@example(np.asarray([[3e38, -3e38, 0.0]] * 3, np.float32))
def test_uncertainty_in_unit_interval(logits_BxC):
  u = np.asarray(exits.uncertainty(jnp.asarray(logits_BxC)))
  assert u.shape == logits_BxC.shape[:1]
  assert np.all(np.isfinite(u)) and np.all((u >= 0) & (u <= 1)), (logits_BxC, u)


def test_uncertainty_extremes():
  u = exits.uncertainty(jnp.asarray([[0.0, 0.0, 0.0], [7.0, 7.0, 7.0], [-1e30, -1e30, -1e30],
                                     [40.0, 0.0, 0.0], [1e30, -1e30, 0.0], [0.0, 0.0, -1e4]]))
  np.testing.assert_allclose(u[:3], 1.0, atol=1e-6)
  assert np.all(np.asarray(u[3:5]) < 1e-10)
  np.testing.assert_allclose(u[5], np.log(2) / np.log(3), rtol=1e-5)  # two equal, one gone
  p = np.asarray([0.7, 0.2, 0.1])
  np.testing.assert_allclose(exits.uncertainty(jnp.log(jnp.asarray([p]))),
                             [-(p * np.log(p)).sum() / np.log(3)], rtol=1e-5)


def _stack(l, b, c, seed):
  rng = np.random.default_rng(seed)
  scale = rng.uniform(0, 8, (l, b, 1))  # from near-uniform to confident
  return jnp.asarray(rng.normal(size=(l, b, c)) * scale, jnp.float32)


def test_tau_zero_never_exits_early():
  all_LxBxC = _stack(4, 16, 3, 0)
  # Even exits that are certain to fp32 precision (u == 0) must not answer at tau = 0.
  all_LxBxC = all_LxBxC.at[0, :3].set(jnp.asarray([1e4, 0.0, 0.0]))
  assert np.all(np.asarray(exits.uncertainty(all_LxBxC[0, :3])) == 0.0)
  layer_B, logits_BxC = exits.exit_layers(all_LxBxC[:-1], all_LxBxC[-1], 0.0)
  np.testing.assert_array_equal(layer_B, 4)
  np.testing.assert_array_equal(logits_BxC, all_LxBxC[-1])


def test_tau_one_exits_at_layer_one():
  all_LxBxC = _stack(4, 16, 3, 1)
  layer_B, logits_BxC = exits.exit_layers(all_LxBxC[:-1], all_LxBxC[-1], 1.0)
  np.testing.assert_array_equal(layer_B, 1)
  np.testing.assert_array_equal(logits_BxC, all_LxBxC[0])


def test_exit_at_first_confident_layer():
  conf, unsure = [9.0, 0.0], [0.1, 0.0]
  exit_ExBxC = jnp.asarray([[unsure, conf, unsure], [conf, conf, unsure]])  # (2, 3, 2)
  teacher_BxC = jnp.asarray([[0.0, 3.0]] * 3)
  layer_B, logits_BxC = exits.exit_layers(exit_ExBxC, teacher_BxC, 0.1)
  np.testing.assert_array_equal(layer_B, [2, 1, 3])
  np.testing.assert_array_equal(logits_BxC, [conf, conf, [0.0, 3.0]])


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.floats(0, 1), st.floats(0, 1))
def test_larger_tau_never_exits_later(seed, tau_a, tau_b):
  lo, hi = min(tau_a, tau_b), max(tau_a, tau_b)
  all_LxBxC = _stack(4, 16, 3, seed)
  layer_lo, _ = exits.exit_layers(all_LxBxC[:-1], all_LxBxC[-1], lo)
  layer_hi, _ = exits.exit_layers(all_LxBxC[:-1], all_LxBxC[-1], hi)
  assert np.all(np.asarray(layer_hi) <= np.asarray(layer_lo))


def _np_kl(p_logits, q_logits):
  """KL(p || q) along the last axis, float64."""
  lp = p_logits - np.log(np.exp(p_logits).sum(-1, keepdims=True))
  lq = q_logits - np.log(np.exp(q_logits).sum(-1, keepdims=True))
  return (np.exp(lp) * (lp - lq)).sum(-1)


def test_distill_loss_directions():
  rng = np.random.default_rng(0)
  exit_ExBxC = rng.normal(size=(2, 4, 3)) * 2
  teacher_BxC = rng.normal(size=(4, 3)) * 2
  w_B = np.asarray([1.0, 1.0, 0.0, 1.0])  # row 2 only pads the batch
  fwd = _np_kl(teacher_BxC[None], exit_ExBxC)  # KL(teacher || exit)
  rev = _np_kl(exit_ExBxC, teacher_BxC[None])  # KL(exit || teacher)
  assert np.abs(fwd - rev).max() > 1e-2  # the two directions differ on this data
  args = (jnp.asarray(exit_ExBxC, jnp.float32), jnp.asarray(teacher_BxC, jnp.float32),
          jnp.asarray(w_B, jnp.float32))
  np.testing.assert_allclose(exits.distill_loss(*args), (fwd * w_B).sum() / 3, rtol=1e-5)
  np.testing.assert_allclose(exits.distill_loss(*args, direction='reverse'),
                             (rev * w_B).sum() / 3, rtol=1e-5)
  with pytest.raises(ValueError, match='forward|reverse'):
    exits.distill_loss(*args, direction='sideways')
  # No gradient reaches the (frozen) teacher.
  g = jax.jit(jax.grad(lambda t: exits.distill_loss(args[0], t, args[2])))(args[1])
  np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize('direction', ['forward', 'reverse'])
def test_distill_loss_zero_when_exit_equals_teacher(direction):
  teacher_BxC = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4)) * 3, jnp.float32)
  same_ExBxC = jnp.stack([teacher_BxC, teacher_BxC + 2.0])  # a shift: same probabilities
  loss = exits.distill_loss(same_ExBxC, teacher_BxC, jnp.ones(5), direction=direction)
  assert abs(float(loss)) < 1e-6
  grad = jax.jit(jax.grad(lambda e: exits.distill_loss(e, teacher_BxC, jnp.ones(5), direction)))
  g = grad(same_ExBxC)
  assert np.abs(np.asarray(g)).max() < 1e-6


@pytest.mark.parametrize('nh', [2, 4])
def test_exit_head_is_the_cls_row_of_full_attention(nh):
  """ExitHead's shortcut (query for [CLS] only) and the engine's merged form of it (exits.merge)
  equal full nh-head self-attention's [CLS] row, biases included, and tokens that are not kept
  change neither."""
  b, t, d, w, c = 3, 6, 32, 8, 3  # tiny_config's exit shapes
  head = exits.ExitHead(c, w, nh)
  rng = np.random.default_rng(0)
  h_BxTxD = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  keep_BxT = jnp.asarray([[1, 1, 0, 1, 0, 0], [1, 0, 1, 1, 1, 1], [1] * 6], bool)
  params = head.init(jax.random.PRNGKey(0), h_BxTxD, keep_BxT)['params']
  # nn.Dense's names and shapes (what checkpoints hold); then every value redrawn, biases too
  assert {n: (v['kernel'].shape, v['bias'].shape) for n, v in params.items()} == {
      'down': ((d, w), (w,)), 'query': ((w, w), (w,)), 'key': ((w, w), (w,)),
      'value': ((w, w), (w,)), 'out': ((w, w), (w,)), 'dense': ((w, w), (w,)),
      'logits': ((w, c), (c,))}
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.5, jnp.float32),
                        params)
  merged = exits.merge(params, nh)
  assert merged['query_key']['kernel'].shape == (w, nh * w)
  assert merged['value_out']['kernel'].shape == (nh * w, w)
  forms = {'ExitHead': lambda h: head.apply({'params': params}, h, keep_BxT),
           'merged': lambda h: exits.merged_logits(merged, h, keep_BxT, nh)}
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  dense = lambda x, n: x @ p[n]['kernel'] + p[n]['bias']
  x = np.tanh(dense(np.asarray(h_BxTxD, np.float64), 'down'))
  q, k, v = (dense(x, n).reshape(b, t, nh, w // nh) for n in ('query', 'key', 'value'))
  s = np.einsum('bihk,bjhk->bhij', q, k) / np.sqrt(w // nh)
  s = np.where(np.asarray(keep_BxT)[:, None, None, :], s, -np.inf)
  a = np.exp(s - s.max(-1, keepdims=True))
  a /= a.sum(-1, keepdims=True)
  ctx = np.einsum('bhij,bjhk->bihk', a, v).reshape(b, t, w)[:, 0]
  want = dense(np.tanh(dense(dense(ctx, 'out'), 'dense')), 'logits')
  junk = jnp.where(keep_BxT[..., None], h_BxTxD, 1e3)
  for name, fn in forms.items():
    out_BxC = np.asarray(fn(h_BxTxD))
    np.testing.assert_allclose(out_BxC, want, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(fn(junk), out_BxC, err_msg=name)

"""Stage losses and optimizers: the soft target term, relative threshold steps, static KD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mp_jax.model import bert, flops
from mp_jax.training import stages, trainer
from tests.conftest import make_batch, peaky_params, tiny_config


class _TC:
  mask_lambda, distill_direction = 1e4, 'forward'


def _batch(cfg):
  ids, types, mask = make_batch([16, 9, 5, 12], 16, cfg.vocab_size)
  return {'input_ids': ids, 'token_type_ids': types, 'attention_mask': mask,
          'labels': np.asarray([0, 1, 2, 1]), 'weights': np.ones(4, np.float32)}


@pytest.mark.parametrize('target, sign', [(0.99, 1.0), (0.01, -1.0)])
def test_soft_loss_pulls_thresholds_toward_the_target_keep(target, sign):
  """Keep below the target: lowering thresholds lowers the loss (gradient > 0); above: < 0."""
  cfg = tiny_config(temperature=0.05)
  params = peaky_params(cfg)
  params['thresholds'] = np.full(3, 1.0 / 16, np.float32)  # keep near the middle
  train, frozen = stages.split(params, 'soft')
  loss = lambda p: stages.loss_fn(p, frozen, _batch(cfg), jax.random.PRNGKey(0),
                                  model=bert.MagicPyramid(cfg), method='ltp', stage='soft',
                                  tc=_TC, target=target)[0]
  g = np.asarray(jax.grad(loss)(train)['thresholds'])
  assert np.all(sign * g > 0), g  # every layer's mask is in the keep, the last's too


def test_threshold_steps_are_relative_to_the_calibrated_start():
  class tc:  # noqa: N801  (a config stand-in)
    lr, threshold_lr, warmup_frac, weight_decay, clip_norm = 1e-3, 0.1, 0.0, 0.0, 1.0
  theta0 = np.asarray([1e-4, 1e-2], np.float32)
  params = {'thresholds': jnp.asarray(theta0), 'w': {'kernel': jnp.ones((2, 2))}}
  tx = stages.optimizer('soft', params, 10, tc)  # relative to params' thresholds
  grads = {'thresholds': jnp.ones(2), 'w': {'kernel': jnp.ones((2, 2))}}
  _, state = tx.update(grads, tx.init(params), params)  # step 0: warm-up starts at lr 0
  updates, _ = tx.update(grads, state, params)
  step = -np.asarray(updates['thresholds'])
  np.testing.assert_allclose(step / theta0, step[0] / theta0[0], rtol=1e-5)  # same fraction
  assert 0 < step[0] / theta0[0] <= 0.1 + 1e-6


def test_static_student_is_the_first_half_and_learns_from_the_frozen_teacher():
  cfg = tiny_config(num_layers=4)
  params = bert.init_params(cfg, 0)
  s_cfg, s_params = trainer.static_student(cfg, params)
  assert s_cfg.num_layers == 2 and s_cfg.unpruned() == cfg  # counted against the 4-layer model
  lengths = np.array([5, 9])
  full = np.full((2, 4), lengths[:, None])
  np.testing.assert_allclose(flops.dense_flops(s_cfg, lengths), flops.dense_flops(cfg, lengths))
  assert flops.summarize(s_cfg, full[:, :2], full[:, :2])['flops_speedup'] == pytest.approx(2.0)
  assert sorted(k for k in s_params if k.startswith(('layer_', 'exit_'))) == [
      'exit_0', 'layer_0', 'layer_1']
  np.testing.assert_array_equal(s_params['layer_1']['output']['dense']['kernel'],
                                params['layer_1']['output']['dense']['kernel'])
  train, frozen = stages.split(s_params, 'static')
  flat = traverse_util.flatten_dict(train)
  assert not any(k[0].startswith('exit_') or k[0] == 'thresholds' for k in flat)
  frozen = dict(frozen, **{stages.TEACHER: params})

  def loss(p, teacher_params):
    fz = dict(frozen, **{stages.TEACHER: teacher_params})
    return stages.loss_fn(p, fz, _batch(cfg), jax.random.PRNGKey(0),
                          model=bert.MagicPyramid(s_cfg), method='static', stage='static',
                          tc=_TC, teacher=bert.MagicPyramid(cfg))
  (val, m), (g_s, g_t) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(train, params)
  assert np.isfinite(val) and m['kd'] > 0
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(g_t))  # teacher: no gradient
  assert float(jnp.abs(g_s['classifier']['kernel']).sum()) > 0


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
  z = jnp.asarray([[1.0, -2.0, 0.5], [0.0, 0.0, 3.0]])
  w = jnp.ones(2)
  assert float(stages.kd_loss(z, z, w)) == pytest.approx(0.0, abs=1e-6)
  assert float(stages.kd_loss(z, z[::-1], w)) > 0.1

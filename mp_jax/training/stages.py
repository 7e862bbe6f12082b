"""The training stages (SPEC §4): what each trains, with which optimizer and loss.

`calibrate` trains nothing (training/calibration.py); the others are optimizer stages here
(`width` adds unit masks, importance and cuts to its step: training/slim.py).

Which stages a method runs, in which pruning mode: mp_jax.methods.
"""

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from mp_jax import methods
from mp_jax.model import exits as exits_lib
from mp_jax.model import pruning as pruning_lib


def is_trainable(stage, path):
  """Which parameters a stage trains; everything else is frozen (not in the optimizer)."""
  is_exit, is_theta = path[0].startswith('exit_'), path[0] == 'thresholds'
  if stage == 'exits':
    return is_exit
  if stage == 'soft':
    return not is_exit
  if stage == 'width':  # COST-EFF: backbone and every exit head together
    return not is_theta
  return not (is_exit or is_theta)


def split(params, stage):
  """(trainable, frozen) sub-trees of `params` for `stage`."""
  flat = traverse_util.flatten_dict(params)
  train = {k: v for k, v in flat.items() if is_trainable(stage, k)}
  frozen = {k: v for k, v in flat.items() if not is_trainable(stage, k)}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge(a, b):
  """Union of two disjoint parameter sub-trees."""
  flat = traverse_util.flatten_dict(a)
  flat.update(traverse_util.flatten_dict(b))
  return traverse_util.unflatten_dict(flat)


def schedule(lr, total_steps, warmup_frac, restarts=()):
  """Linear warmup then linear decay to 0; started afresh at each step in `restarts`.

  With restarts s_1 < ... < s_C, segment [s_k, s_{k+1}) (s_0 = 0, s_{C+1} = total) is its own
  warmup-then-decay of s_{k+1} - s_k steps (the width stage's cuts).
  """
  edges = sorted({s for s in restarts if 0 < s < total_steps})
  if edges:
    bounds = [0, *edges, total_steps]
    return optax.join_schedules([schedule(lr, b - a, warmup_frac)
                                 for a, b in zip(bounds, bounds[1:])], edges)
  warm = max(1, int(total_steps * warmup_frac))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warm),
       optax.linear_schedule(lr, 0.0, max(1, total_steps - warm))], [warm])


def _adamw(lr, total, tc, restarts=()):
  decay = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key in ('kernel', 'embedding'), p)
  return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                     optax.adamw(schedule(lr, total, tc.warmup_frac, restarts),
                                 weight_decay=tc.weight_decay, mask=decay))


def scale_by_start():
  """Multiplies each update by its parameter's value at init (kept in the state): relative steps."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.asarray, params),
      lambda u, start, p=None: (jax.tree.map(lambda x, s: x * s, u, start), start))


def optimizer(stage, train_params, total_steps, tc, restarts=()):
  """AdamW per stage; in the soft stage thresholds get their own Adam (own lr, no decay).

  width: the backbone at `train.width_lr`, the exit heads at `train.exit_lr`, both schedules
  started afresh at `restarts` (its cuts).

  Threshold steps are relative: theta_l moves by about threshold_lr * theta0_l per step (Adam's
  normalised step times its value when the optimizer state was made: calibrate's), so thresholds
  that differ 100-fold across layers and tasks move by the same fraction of themselves.
  """
  if stage in ('finetune', 'static'):
    return _adamw(tc.lr, total_steps, tc)
  if stage == 'hard':
    return _adamw(tc.hard_lr, total_steps, tc)
  if stage == 'exits':
    return _adamw(tc.exit_lr, total_steps, tc)
  if stage == 'width':
    labels = {k: jax.tree.map(lambda _, k=k: 'exit' if k.startswith('exit_') else 'backbone', v)
              for k, v in train_params.items()}
    return optax.multi_transform(
        {'backbone': _adamw(tc.width_lr, total_steps, tc, restarts),
         'exit': _adamw(tc.exit_lr, total_steps, tc, restarts)}, labels)
  labels = {k: jax.tree.map(lambda _, k=k: 'theta' if k == 'thresholds' else 'backbone', v)
            for k, v in train_params.items()}
  return optax.multi_transform(
      {'backbone': _adamw(tc.lr, total_steps, tc),
       'theta': optax.chain(optax.adam(schedule(tc.threshold_lr, total_steps, tc.warmup_frac)),
                            scale_by_start())}, labels)


TEACHER = '_teacher'  # key of the teacher's parameters in `frozen` (static, width stages)
KD_TEMPERATURE, KD_WEIGHT = 2.0, 0.5


def kd_loss(student_BxC, teacher_BxC, w_B, temperature=KD_TEMPERATURE):
  """T^2 * KL(softmax(t / T) || softmax(s / T)), weighted mean over the batch."""
  p_BxC = jax.nn.softmax(teacher_BxC / temperature)
  kl_B = (p_BxC * (jax.nn.log_softmax(teacher_BxC / temperature)
                   - jax.nn.log_softmax(student_BxC / temperature))).sum(-1)
  return temperature ** 2 * (kl_B * w_B).sum() / jnp.maximum(w_B.sum(), 1.0)


def loss_fn(train_params, frozen, batch, rng, *, model, method, stage, tc, target=None,
            teacher=None):
  """Stage loss and metrics; gradients flow only into `train_params`.

  target: the soft stage's token keep (calibrate's); teacher: the fine-tuned model the static
  stage (and the width stage when train.width_kd > 0) distils from, whose parameters ride in
  `frozen[TEACHER]`.
  """
  frozen = dict(frozen)
  teacher_params = frozen.pop(TEACHER, None)
  params = merge(train_params, frozen)
  mode = methods.pruning_mode(method, stage)
  logits_BxC, aux = model.apply(
      {'params': params}, batch['input_ids'], batch['token_type_ids'], batch['attention_mask'],
      pruning=mode, exits=stage in methods.EXIT_STAGES, train=stage != 'exits',
      rngs={'dropout': rng})
  w_B = batch['weights']
  denom = jnp.maximum(w_B.sum(), 1.0)
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch['labels'])
  metrics = {'ce': (ce_B * w_B).sum() / denom,
             'acc': ((logits_BxC.argmax(-1) == batch['labels']) * w_B).sum() / denom}
  real_BxT = batch['attention_mask'].astype(bool)
  metrics['kept_frac'] = (aux['n_ffn'][-1] * w_B).sum() / jnp.maximum((real_BxT.sum(-1) * w_B)
                                                                      .sum(), 1.0)
  if stage == 'exits':
    loss = exits_lib.distill_loss(aux['exit_logits'], logits_BxC, w_B, tc.distill_direction)
    metrics['kl'] = loss
  elif stage == 'soft':
    # Held at the target both ways: the thresholds and the attention that makes the scores
    # both move the keep, and an L1 pull (LTP's) has no floor, so it drifts with the lr.
    keep = pruning_lib.soft_keep(aux['masks'], real_BxT)
    metrics['soft_keep'] = keep
    loss = metrics['ce'] + tc.mask_lambda * (keep - target) ** 2
  elif stage == 'static':
    metrics['kd'] = kd_loss(logits_BxC, _teacher_logits(teacher, teacher_params, batch), w_B)
    loss = (1 - KD_WEIGHT) * metrics['ce'] + KD_WEIGHT * metrics['kd']
  elif stage == 'width':
    # COST-EFF's joint loss: the L-1 exits and the classifier alike, mean over the L of them.
    all_LxBxC = jnp.concatenate([aux['exit_logits'], logits_BxC[None]])
    ce_L = jax.vmap(lambda z: (optax.softmax_cross_entropy_with_integer_labels(
        z, batch['labels']) * w_B).sum() / denom)(all_LxBxC)
    metrics['exit_ce'] = ce_L.mean()
    loss = metrics['exit_ce']
    if teacher is not None:  # each of them distilled from the fine-tuned model's logits
      t_BxC = _teacher_logits(teacher, teacher_params, batch)
      metrics['kd'] = jax.vmap(lambda z: kd_loss(z, t_BxC, w_B))(all_LxBxC).mean()
      loss = (1 - tc.width_kd) * loss + tc.width_kd * metrics['kd']
  else:
    loss = metrics['ce']
  metrics['loss'] = loss
  return loss, metrics


def _teacher_logits(teacher, teacher_params, batch):
  """The frozen teacher's logits (no dropout, no gradient)."""
  t_BxC, _ = teacher.apply({'params': teacher_params}, batch['input_ids'],
                           batch['token_type_ids'], batch['attention_mask'])
  return jax.lax.stop_gradient(t_BxC)


def train_step(state, frozen, batch, rng, *, tx, **loss_kw):
  """One pure optimizer step; `state` = {'params', 'opt_state', 'step'} (donated by the caller)."""
  rng = jax.random.fold_in(rng, state['step'])
  grads, metrics = jax.grad(loss_fn, has_aux=True)(state['params'], frozen, batch, rng,
                                                   **loss_kw)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  metrics['grad_norm'] = optax.global_norm(grads)
  return {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
          'step': state['step'] + 1}, metrics

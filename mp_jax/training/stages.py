"""The four training stages (SPEC §4): what each trains, with which optimizer and loss.

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


def schedule(lr, total_steps, warmup_frac):
  """Linear warmup then linear decay to 0."""
  warm = max(1, int(total_steps * warmup_frac))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warm),
       optax.linear_schedule(lr, 0.0, max(1, total_steps - warm))], [warm])


def _adamw(lr, total, tc):
  decay = lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key in ('kernel', 'embedding'), p)
  return optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                     optax.adamw(schedule(lr, total, tc.warmup_frac),
                                 weight_decay=tc.weight_decay, mask=decay))


def optimizer(stage, train_params, total_steps, tc):
  """AdamW per stage; in the soft stage thresholds get their own Adam (own lr, no decay)."""
  if stage == 'finetune':
    return _adamw(tc.lr, total_steps, tc)
  if stage == 'hard':
    return _adamw(tc.hard_lr, total_steps, tc)
  if stage == 'exits':
    return _adamw(tc.exit_lr, total_steps, tc)
  labels = {k: jax.tree.map(lambda _, k=k: 'theta' if k == 'thresholds' else 'backbone', v)
            for k, v in train_params.items()}
  return optax.multi_transform(
      {'backbone': _adamw(tc.lr, total_steps, tc),
       'theta': optax.adam(schedule(tc.threshold_lr, total_steps, tc.warmup_frac))}, labels)


def loss_fn(train_params, frozen, batch, rng, *, model, method, stage, tc):
  """Stage loss and metrics; gradients flow only into `train_params`."""
  params = merge(train_params, frozen)
  mode = methods.pruning_mode(method, stage)
  logits_BxC, aux = model.apply(
      {'params': params}, batch['input_ids'], batch['token_type_ids'], batch['attention_mask'],
      pruning=mode, exits=stage == 'exits', train=stage != 'exits', rngs={'dropout': rng})
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
    penalty = pruning_lib.mask_penalty(aux['masks'], real_BxT)
    metrics['mask_mean'] = penalty / aux['masks'].shape[0]
    loss = metrics['ce'] + tc.mask_lambda * penalty
  else:
    loss = metrics['ce']
  metrics['loss'] = loss
  return loss, metrics


def train_step(state, frozen, batch, rng, *, tx, **loss_kw):
  """One pure optimizer step; `state` = {'params', 'opt_state', 'step'} (donated by the caller)."""
  rng = jax.random.fold_in(rng, state['step'])
  grads, metrics = jax.grad(loss_fn, has_aux=True)(state['params'], frozen, batch, rng,
                                                   **loss_kw)
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  metrics['grad_norm'] = optax.global_norm(grads)
  return {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
          'step': state['step'] + 1}, metrics

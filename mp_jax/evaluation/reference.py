"""Reference evaluation: the masked full-shape model, exit decisions per tau, metrics and FLOPs.

This path defines the semantics the compiled engine reproduces (SPEC §6); training evaluates its
dev split with it, eval.py checks the engine against it.
"""

import functools

import jax
import numpy as np

from mp_jax.data import batching
from mp_jax.model import bert, checks, exit_plan
from mp_jax.model import exits as exits_lib
from mp_jax.model import flops as flops_lib
from mp_jax.model import pruning as pruning_lib
from mp_jax.serving import engine as engine_lib


@functools.lru_cache(maxsize=32)
def _forward(cfg, pruning, exits):
  """Jitted reference forward returning per-example arrays."""
  model = bert.MagicPyramid(cfg)

  @jax.jit
  def fwd(params, batch):
    logits, aux = model.apply({'params': params}, batch['input_ids'], batch['token_type_ids'],
                              batch['attention_mask'], pruning=pruning, exits=exits)
    out = {'logits': logits, 'n_attn': aux['n_attn'].T, 'n_ffn': aux['n_ffn'].T}
    if exits:
      out['exit_logits'] = aux['exit_logits'].transpose(1, 0, 2)  # (B, L-1, C)
    return out

  return fwd


def clear_programs():
  """Drops the cached reference forwards (and so their compiled programs)."""
  _forward.cache_clear()


INPUTS = ('input_ids', 'token_type_ids', 'attention_mask')
GROUPS = ('short', 'middle', 'long')  # by input length (paper Figure 1)


def run(params, cfg, encoded, *, pruning, exits, batch_size, length_buckets):
  """Runs the reference model over `encoded`; numpy outputs in the input order.

  `params` (host or device arrays) go to the device once; each batch is copied there
  explicitly, so no implicit host-to-device transfer happens per batch.
  """
  checks.check_token_ids(encoded.ids, cfg.vocab_size, 'reference evaluation')
  fwd = _forward(cfg, pruning, exits)
  buckets = batching.upto(length_buckets, cfg.max_seq_length)
  device = jax.local_devices()[0]
  params = engine_lib.on_device(params, device)
  chunks = []
  for batch in batching.batches(encoded, batch_size, buckets=buckets):
    out = jax.device_get(fwd(params, jax.device_put({k: batch[k] for k in INPUTS}, device)))
    real = batch['weights'] > 0
    chunks.append({k: v[real] for k, v in out.items()})
  res = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
  for k in ('logits', 'exit_logits'):
    if k in res:
      checks.check_finite(res[k], f'reference evaluation ({k})')
  res['labels'] = np.asarray(encoded.labels)
  res['lengths'] = np.asarray(encoded.lengths)
  return res


# Jitted so that tau and every constant stay on the device (no implicit transfer per call).
_exit_layers = jax.jit(exits_lib.exit_layers)


def decide(res, tau, num_layers, plan=None):
  """(exit_layer_N (1-based), logits_NxC) of each example for halt value tau (SPEC §3): only
  the heads `plan` runs at tau can answer (every head without a plan)."""
  if 'exit_logits' not in res:
    return np.full(len(res['logits']), num_layers, np.int32), res['logits']
  args = jax.device_put((res['exit_logits'].transpose(1, 0, 2), res['logits'],
                         exit_plan.halts_of(plan, tau, num_layers)))
  layer, logits = _exit_layers(*args)
  return np.asarray(layer, np.int32), np.asarray(logits)


def length_groups(lengths, edges):
  """Paper Figure 1 groups by real token count: short <= e0 < middle <= e1 < long."""
  return np.where(lengths <= edges[0], 0, np.where(lengths <= edges[1], 1, 2))


def group_labels(edges):
  """{group: 'short (1-35)' ...}: each GROUPS name with its token range for these edges."""
  e0, e1 = (int(e) for e in edges)
  return dict(zip(GROUPS, (f'short (1-{e0})', f'middle ({e0 + 1}-{e1})', f'long (>{e1})')))


def f1_binary(pred, labels):
  """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
  tp = np.sum((pred == 1) & (labels == 1))
  fp, fn = np.sum((pred == 1) & (labels != 1)), np.sum((pred != 1) & (labels == 1))
  return float(2 * tp / max(2 * tp + fp + fn, 1))


def metrics(res, cfg, tau=0.0, with_f1=False, plan=None):
  """Accuracy (+F1), exit layers, tokens kept and FLOPs of one evaluation at halt value tau;
  `plan` (mp_jax.model.exit_plan) says which heads run, else all do."""
  exit_layer, logits = decide(res, tau, cfg.num_layers, plan)
  checks.check_finite(logits, f'evaluation at tau={tau:g}')
  pred = logits.argmax(-1)
  out = {'accuracy': float(np.mean(pred == res['labels'])), 'tau': float(tau),
         'num_examples': int(len(pred))}
  if with_f1:
    out['f1'] = f1_binary(pred, res['labels'])
  has_exits = 'exit_logits' in res
  # A head runs where its halt value is > 0 (at tau <= 0 none can fire, so none runs).
  heads = exit_plan.heads_at(exit_plan.halts_of(plan, tau, cfg.num_layers)) & has_exits
  out.update(flops_lib.summarize(cfg, res['n_attn'], res['n_ffn'], res['lengths'],
                                 exit_layer_N=exit_layer if has_exits else None, exits=heads))
  if has_exits:
    out['heads'] = heads.astype(int).tolist()  # after layers 1..L-1: 1 where the head ran
  out['token_keep'] = pruning_lib.token_keep(res['n_ffn'], res['lengths'])  # SPEC §2
  out['mean_exit_layer'] = float(exit_layer.mean())
  out['exit_layer_histogram'] = np.bincount(exit_layer, minlength=cfg.num_layers + 1)[1:].tolist()
  return out, exit_layer, pred

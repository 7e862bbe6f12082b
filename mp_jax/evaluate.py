"""Reference evaluation: the masked full-shape model, exit decisions per tau, metrics and FLOPs.

This path defines the semantics the compiled engine reproduces (SPEC §6).
"""

import functools

import jax
import numpy as np

from mp_jax import data as data_lib
from mp_jax import distributed
from mp_jax import exits as exits_lib
from mp_jax import flops as flops_lib
from mp_jax import model as model_lib


class NonFiniteOutput(ValueError):
  """NaN/inf logits: an error, never an answer (the message names the examples)."""

  def __init__(self, message, indices=()):
    super().__init__(message)
    self.indices = list(indices)  # every bad example, for callers that name them their own way


class LabelMismatch(ValueError):
  """A model evaluated on a dataset whose labels are not the model's labels."""


def is_generic(names):
  """Whether label names are placeholders ('0', '1', ... or HF's 'LABEL_0', ...)."""
  return all(n in (str(i), f'LABEL_{i}') for i, n in enumerate(names))


def labels_match(model_names, data_names):
  """Same count, and the same names in order (case aside) unless either side is generic.

  Generic names carry only a count: a model saved without names (or HF's default LABEL_i)
  cannot say what its labels mean, so refusing it would block every such checkpoint.
  """
  a, b = list(model_names), list(data_names)
  return len(a) == len(b) and (is_generic(a) or is_generic(b)
                               or [x.lower() for x in a] == [x.lower() for x in b])


def check_labels(model_names, data_names, model_where, data_where):
  """LabelMismatch naming both label lists unless `labels_match`."""
  if not labels_match(model_names, data_names):
    what = 'count' if len(model_names) != len(data_names) else 'names'
    raise LabelMismatch(
        f'the model ({model_where}) has {len(model_names)} labels {list(model_names)}, the '
        f'dataset ({data_where}) has {len(data_names)} labels {list(data_names)}: the label '
        f'{what} differ; evaluate on the task the model was trained on')


def check_token_ids(ids, vocab_size, where):
  """ValueError naming the first example whose ids fall outside [0, vocab_size)."""
  if not len(ids):
    return
  flat = np.concatenate([np.ravel(r) for r in ids])
  bad = np.flatnonzero((flat < 0) | (flat >= vocab_size))
  if len(bad):
    row = int(np.searchsorted(np.cumsum([np.size(r) for r in ids]), bad[0], side='right'))
    raise ValueError(f'{where}: example {row} has token id {int(flat[bad[0]])}, outside the '
                     f"model's vocabulary [0, {vocab_size}) (a tokenizer from another model?)")


def check_finite(logits_NxC, where):
  """NonFiniteOutput naming how many and which examples have a NaN/inf logit."""
  logits_NxC = np.asarray(logits_NxC)
  bad = np.flatnonzero(~np.isfinite(logits_NxC.reshape(len(logits_NxC), -1)).all(-1))
  if len(bad):
    raise NonFiniteOutput(
        f'{where}: non-finite logits for {len(bad)} of {len(logits_NxC)} examples (indices '
        f'{bad[:5].tolist()}{" ..." if len(bad) > 5 else ""}); likely non-finite weights (a '
        'diverged or damaged checkpoint) or token ids beyond the vocabulary', bad.tolist())


def buckets_for(max_len, length_buckets):
  """Configured buckets up to max_len, and max_len itself."""
  return tuple(sorted({int(b) for b in length_buckets if b < max_len} | {int(max_len)}))


@functools.lru_cache(maxsize=32)
def _forward(cfg, pruning, exits):
  """Jitted reference forward returning per-example arrays."""
  model = model_lib.MagicPyramid(cfg)

  @jax.jit
  def fwd(params, batch):
    logits, aux = model.apply({'params': params}, batch['input_ids'], batch['token_type_ids'],
                              batch['attention_mask'], pruning=pruning, exits=exits)
    out = {'logits': logits, 'n_attn': aux['n_attn'].T, 'n_ffn': aux['n_ffn'].T}
    if exits:
      out['exit_logits'] = aux['exit_logits'].transpose(1, 0, 2)  # (B, L-1, C)
    return out

  return fwd


INPUTS = ('input_ids', 'token_type_ids', 'attention_mask')


def reference(params, cfg, encoded, *, pruning, exits, batch_size, length_buckets):
  """Runs the reference model over `encoded`; numpy outputs in the input order.

  `params` (host or device arrays) go to the device once; each batch is copied there
  explicitly, so no implicit host-to-device transfer happens per batch.
  """
  check_token_ids(encoded.ids, cfg.vocab_size, 'reference evaluation')
  fwd = _forward(cfg, pruning, exits)
  buckets = buckets_for(cfg.max_seq_length, length_buckets)
  device = jax.local_devices()[0]
  params = distributed.on_device(params, device)
  chunks = []
  for batch in data_lib.batches(encoded, batch_size, buckets=buckets):
    out = jax.device_get(fwd(params, jax.device_put({k: batch[k] for k in INPUTS}, device)))
    real = batch['weights'] > 0
    chunks.append({k: v[real] for k, v in out.items()})
  res = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}
  for k in ('logits', 'exit_logits'):
    if k in res:
      check_finite(res[k], f'reference evaluation ({k})')
  res['labels'] = np.asarray(encoded.labels)
  res['lengths'] = np.asarray(encoded.lengths)
  return res


# Jitted so that tau and every constant stay on the device (no implicit transfer per call).
_exit_layers = jax.jit(exits_lib.exit_layers)


def decide(res, tau, num_layers):
  """(exit_layer_N (1-based), logits_NxC) of each example for halt value tau."""
  if 'exit_logits' not in res:
    return np.full(len(res['logits']), num_layers, np.int32), res['logits']
  args = jax.device_put((res['exit_logits'].transpose(1, 0, 2), res['logits'], np.float32(tau)))
  layer, logits = _exit_layers(*args)
  return np.asarray(layer, np.int32), np.asarray(logits)


def f1_binary(pred, labels):
  """F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
  tp = np.sum((pred == 1) & (labels == 1))
  fp, fn = np.sum((pred == 1) & (labels != 1)), np.sum((pred != 1) & (labels == 1))
  return float(2 * tp / max(2 * tp + fp + fn, 1))


def metrics(res, cfg, tau=0.0, with_f1=False):
  """Accuracy (+F1), exit layers, tokens kept and FLOPs of one evaluation at halt value tau."""
  exit_layer, logits = decide(res, tau, cfg.num_layers)
  check_finite(logits, f'evaluation at tau={tau:g}')
  pred = logits.argmax(-1)
  out = {'accuracy': float(np.mean(pred == res['labels'])), 'tau': float(tau),
         'num_examples': int(len(pred))}
  if with_f1:
    out['f1'] = f1_binary(pred, res['labels'])
  has_exits = 'exit_logits' in res
  # At tau <= 0 no head can fire (exits.should_exit), so the engine does not run them.
  out.update(flops_lib.summarize(cfg, res['n_attn'], res['n_ffn'], res['lengths'],
                                 exit_layer_N=exit_layer if has_exits else None,
                                 exits=has_exits and tau > 0))
  out['mean_exit_layer'] = float(exit_layer.mean())
  out['exit_layer_histogram'] = np.bincount(exit_layer, minlength=cfg.num_layers + 1)[1:].tolist()
  return out, exit_layer, pred

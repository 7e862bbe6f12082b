"""The calibrate stage (SPEC §4): thresholds from the fine-tuned model's scores, for a target.

`model.target_token_keep` is task-independent (a fraction of the token-layer work); the
thresholds that meet it are not (they scale like 1/n and with how peaked a task's attention
is: mr needed 0.01, bbc 0.006 by hand). So the stage measures: hard masks with LTP's schedule
theta_l = f * l / L on the dev split, f found by bisection until the kept fraction meets the
target (model.pruning.calibrate). An explicit `model.final_threshold` skips the search and
only measures. The result, `<stage>/done.json`, is the soft stage's starting point and target.
"""

import dataclasses
import pathlib

import numpy as np
from absl import logging

from mp_jax import fsio
from mp_jax.evaluation import reference
from mp_jax.model import pruning as pruning_lib
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import shapes
from mp_jax.training import checkpoint, distributed, runs

# Each bisection step is a hard-mask pass over the subset: a budget in real tokens (mr: ~630
# sentences, bbc: ~65 documents) keeps the stage at ~15 passes of a few seconds, and a kept
# fraction over 16k tokens is stable to about a percent.
MAX_TOKENS = 16384
STEPS = 12  # log2(1e6) = 19.9 bits / 2^12: final_threshold to within 0.3%


def _subset(encoded, max_tokens, seed=0):
  """Rows of an encoded split up to `max_tokens` real tokens (a fixed random subset, in order)."""
  lengths = np.asarray(encoded.lengths)
  if lengths.sum() <= max_tokens:
    return encoded
  perm = np.random.default_rng(seed).permutation(len(lengths))
  n = max(1, int(np.searchsorted(np.cumsum(lengths[perm]), max_tokens, side='right')))
  idx = np.sort(perm[:n])
  return dataclasses.replace(encoded, ids=[encoded.ids[i] for i in idx],
                             type_ids=[encoded.type_ids[i] for i in idx],
                             labels=np.asarray(encoded.labels)[idx],
                             lengths=np.asarray(encoded.lengths)[idx])


def measure(params, cfg, encoded, final_threshold, config):
  """Hard-mask evaluation of LTP's schedule for `final_threshold`: (token keep, metrics)."""
  theta_L = pruning_lib.init_thresholds(cfg.num_layers, final_threshold)
  res = reference.run(dict(params, thresholds=theta_L), cfg, encoded, pruning='hard',
                      exits=False, batch_size=config.train.eval_batch_size,
                      length_buckets=shapes.train_lengths(config.data))
  m, _, _ = reference.metrics(res, cfg)
  return pruning_lib.token_keep(res['n_ffn'], res['lengths']), m


def run(config, workdir, cfg, params, encoded, fp=None, log=None):
  """Calibrates (or reads a finished calibration); returns its record (SPEC §2).

  Every process computes the same record from the same data; only process 0 writes it.
  """
  d = pathlib.Path(workdir) / 'calibrate'
  done = d / checkpoint.DONE
  if done.exists():
    try:
      rec = fsio.read_json(done)
      logging.info('stage calibrate already finished (final_threshold %.3g); skipped',
                   rec['final_threshold'])
      if {'final_threshold', 'thresholds', 'token_keep'} <= set(rec):
        return rec
      logging.warning('%s: incomplete record; calibrating again', done)
    except fsio.UnreadableFile as e:
      logging.warning('%s; calibrating again', e)
  if fp is not None and distributed.is_main():
    runs.record(d, fp)
  m = config.model
  enc = _subset(encoded, MAX_TOKENS)
  on_dev = engine_lib.on_device(params)
  keep_of = lambda f: measure(on_dev, cfg, enc, f, config)[0]
  if m.final_threshold is None:
    final, _ = pruning_lib.calibrate(keep_of, m.target_token_keep, steps=STEPS)
  else:
    final = float(m.final_threshold)
  keep, metrics = measure(on_dev, cfg, enc, final, config)
  if m.final_threshold is None and abs(keep - m.target_token_keep) > 0.05:
    logging.warning('calibrate: the closest keep to target_token_keep=%g is %.3f (at '
                    'final_threshold %.3g)', m.target_token_keep, keep, final)
  rec = {'final_threshold': final,
         'thresholds': pruning_lib.init_thresholds(cfg.num_layers, final).tolist(),
         'target_token_keep': m.target_token_keep, 'calibrated': m.final_threshold is None,
         'token_keep': keep, 'num_examples': len(enc.lengths), **metrics}
  if distributed.is_main():
    fsio.write_json(done, rec, indent=2)  # last: done.json marks the stage finished
  if log is not None:
    log.write(stage='calibrate', split='dev', **rec)
  logging.info('calibrate: final_threshold %.4g keeps %.3f of the token-layer work (target '
               '%g); dev accuracy %.4f, FLOPs speedup %.2fx before retraining', final, keep,
               m.target_token_keep, metrics['accuracy'], metrics['flops_speedup'])
  return rec


def apply(cfg, params, rec):
  """(cfg, params) with the calibrated thresholds (cfg records their final_threshold)."""
  return (cfg.replace(final_threshold=float(rec['final_threshold'])),
          dict(params, thresholds=np.asarray(rec['thresholds'], np.float32)))

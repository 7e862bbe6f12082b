"""What does a `final_threshold` prune? Hard masks on a fine-tuned model, before any retraining.

  python experiments/calibrate.py --config=configs/bbc.py --workdir=runs/paper/bbc/mp \
      --thresholds=0.002,0.004,0.008

Prints dev accuracy, FLOPs speedup, token keep (SPEC §2) and tokens kept per layer for each
candidate (the pruning stages then retrain the backbone to win accuracy back). Score quantiles per
layer are printed too. Training does not need this: its calibrate stage finds the final_threshold
that meets `model.target_token_keep` by itself (mp_jax/training/calibration.py).
"""

import sys

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

sys.path.insert(0, __file__.rsplit('/', 2)[0])

from mp_jax import cli
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading
from mp_jax.evaluation import reference, report
from mp_jax.model import bert
from mp_jax.model import pruning as pruning_lib
from mp_jax.serving import shapes

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A workdir with a trained `final/`.')
_THRESHOLDS = flags.DEFINE_list('thresholds', ['0.005', '0.01', '0.02'], 'final_threshold values.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  _, cfg, params, tok, names, _ = workdir_lib.load(_WORKDIR.value)
  ds = loading.load_task(config.data)
  report.check_labels(names, ds, config, _WORKDIR.value)
  enc = batching.encode(tok, ds['dev'], cfg.max_seq_length)
  batch = next(batching.batches(enc, 64, buckets=(cfg.max_seq_length,)))
  _, aux = bert.MagicPyramid(cfg).apply(
      {'params': params}, batch['input_ids'], batch['token_type_ids'], batch['attention_mask'])
  real = batch['attention_mask'].astype(bool)
  print('score quantiles (10/50/90%) per layer, real tokens of 64 dev examples:')
  for l, s in enumerate(np.asarray(aux['scores'])):
    print(f'  layer {l + 1}: ' + ' '.join(f'{q:.4f}' for q in np.quantile(s[real], [.1, .5, .9])))
  print('final_threshold | dev acc | FLOPs speedup | token keep | tokens kept per layer (mean)')
  for thr in map(float, _THRESHOLDS.value):
    p = dict(params, thresholds=pruning_lib.init_thresholds(cfg.num_layers, thr))
    res = reference.run(p, cfg, enc, pruning='hard', exits=False, batch_size=64,
                        length_buckets=shapes.train_lengths(config.data))
    m, _, _ = reference.metrics(res, cfg)
    kept = ' '.join(f'{k:.1f}' for k in res['n_ffn'].mean(0))
    print(f'{thr:g} | {100 * m["accuracy"]:.1f} | {m["flops_speedup"]:.2f}x | '
          f'{m["token_keep"]:.3f} | {res["lengths"].mean():.1f} -> {kept}')


if __name__ == '__main__':
  cli.run(main)

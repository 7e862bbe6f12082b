"""Wall-clock benchmark of a trained workdir -> WORKDIR/bench/bench.json."""

import json

from absl import flags, logging
from ml_collections import config_flags

from mp_jax import cli
from mp_jax.evaluation import benchmark

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Trained workdir (default: as train.py).')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Throughput batch size.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved repeats (median reported).')
_LATENCY_ROWS = flags.DEFINE_integer('latency_rows', 64, 'Single requests for batch-1 latency.')
_WORKERS = flags.DEFINE_integer(
    'workers', 1, 'Also time engine and dense in this many single-threaded per-core worker '
    'processes (> 1).')
_TORCH = flags.DEFINE_bool('torch', True, 'Also time HF PyTorch (if installed).')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  out = benchmark.run(_CONFIG.value, cli.workdir(_WORKDIR.value), batch_size=_BATCH.value,
                      repeats=_REPEATS.value, latency_rows=_LATENCY_ROWS.value,
                      torch=_TORCH.value, num_workers=_WORKERS.value)
  print(json.dumps(out, indent=2))


if __name__ == '__main__':
  cli.run(main)

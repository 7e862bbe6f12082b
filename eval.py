"""Evaluate a trained workdir: accuracy, GFLOPs and measured speed -> WORKDIR/eval/."""

from absl import flags, logging
from ml_collections import config_flags

from mp_jax import cli
from mp_jax.evaluation import report

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (as for '
                                          'train.py).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Trained workdir (default: as train.py).')
_TAU = flags.DEFINE_float('tau', None, 'Halt value (default: config.eval.tau).')
_TIMING = flags.DEFINE_bool('timing', True, 'Measure wall-clock speed (engine vs dense).')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  workdir = cli.workdir(_WORKDIR.value)
  rep = report.build(_CONFIG.value, workdir, tau=_TAU.value, measure=_TIMING.value)
  print(report.write(rep, f'{workdir}/eval'))


if __name__ == '__main__':
  cli.run(main)

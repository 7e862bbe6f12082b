"""Staged training: train.py --config=configs/mr.py[:variant] [--workdir] [--restart_from]."""

from absl import flags, logging
from ml_collections import config_flags

from mp_jax import cli, methods
from mp_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs (default: '
                               'runs/<config stem>[_<variant items>]).')
_RESTART = flags.DEFINE_enum(
    'restart_from', None, list(methods.ORDER),
    'Train again from this stage: it, the later stages, final/, eval/ and config.json are moved to '
    '<workdir>/replaced-<time>/ (never deleted). Needed when the config changed.')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  trainer.run(_CONFIG.value, cli.workdir(_WORKDIR.value), _RESTART.value or '')


if __name__ == '__main__':
  cli.run(main)

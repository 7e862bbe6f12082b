"""Shared entry-point plumbing: default workdir; user errors become one clear line."""

import logging as py_logging
import pathlib
import re
import sys
import zlib

from absl import app, flags
from ml_collections import config_flags

from mp_jax import data, fetch, hf

# Not KeyError: a missing key inside the code is a bug and keeps its traceback.
USER_ERRORS = (data.DataError, hf.CheckpointError, fetch.FetchError, FileNotFoundError,
               ValueError, FloatingPointError)


RUNS = 'runs'


def default_workdir(config_arg):
  """`runs/<config stem>[_<variant items>]` for a raw --config value (`configs/x.py:a,b`)."""
  # --config.key=value overrides do not count: the name stays what the user typed as --config.
  path, _, variant = str(config_arg).partition(':')  # as ml_collections splits it
  items = [i.strip() for i in variant.split(',') if i.strip()]
  name = '_'.join([pathlib.Path(path).stem or 'config', *items])
  name = re.sub(r'[^\w.=+,-]', '-', name)  # '/', ':', spaces ... -> one safe path component
  if len(name) > 120:  # file systems cap a component at 255 bytes; keep two long ones apart
    name = f'{name[:110]}-{zlib.crc32(name.encode()):08x}'
  return str(pathlib.Path(RUNS) / name)


def workdir(flag_value):
  """--workdir if given, else the default for the raw --config value; printed at start."""
  out = flag_value or default_workdir(config_flags.get_config_filename(flags.FLAGS['config']))
  print(f'workdir: {out}', file=sys.stderr, flush=True)
  return out


class _Quiet(py_logging.Filter):
  """Drops INFO chatter of libraries (orbax logs every save step by step)."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or 'mp_jax' in record.pathname or (
        record.pathname.endswith(('train.py', 'eval.py', 'bench.py')))


def run(main):
  """absl app.run, printing `error: ...` and exiting 2 on bad input or config."""

  def wrapped(argv):
    for handler in py_logging.getLogger().handlers + py_logging.getLogger('absl').handlers:
      handler.addFilter(_Quiet())
    try:
      return main(argv)
    except USER_ERRORS as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  app.run(wrapped)

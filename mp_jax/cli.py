"""Shared entry-point plumbing: user errors become one clear line, not a traceback."""

import logging as py_logging
import sys

from absl import app

from mp_jax import data, fetch, hf

# Not KeyError: a missing key inside the code is a bug and keeps its traceback.
USER_ERRORS = (data.DataError, hf.CheckpointError, fetch.FetchError, FileNotFoundError,
               ValueError, FloatingPointError)


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

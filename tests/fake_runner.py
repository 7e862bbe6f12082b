"""A stand-in runner for WorkerPool fault tests: instant numpy answers, scripted faults, and no
JAX unless asked (a worker that imports only this starts in a fraction of a second)."""

import os
import pathlib
import time

import numpy as np

# A row whose first id is one of these makes the worker fail that way.
HANG, HANG_ONCE, EXIT, RAISE, COMPILE = -1, -2, -3, -4, -5


def answer(rows) -> dict:
  """What the runner returns for fault-free rows (the in-process reference)."""
  return {'total': np.array([int(np.sum(ids)) for ids, _ in rows], np.int64),
          'length': np.array([len(ids) for ids, _ in rows], np.int32)}


class Runner:

  def __init__(self, flag_dir: str, gap: float):
    self.flag_dir, self.gap = pathlib.Path(flag_dir), gap

  def predict(self, rows) -> dict:
    for ids, _ in rows:
      if ids[0] == HANG:
        time.sleep(3600)
      if ids[0] == HANG_ONCE:  # the first worker to see it hangs; its replacement answers
        flag = self.flag_dir / 'hung_once'
        if not flag.exists():
          flag.touch()
          time.sleep(3600)
      if ids[0] == EXIT:
        os._exit(3)
      if ids[0] == RAISE:
        raise ValueError('row starts with RAISE')
      if ids[0] == COMPILE:  # busy past the timeout, but compiling every `gap` seconds
        import jax  # pylint: disable=g-import-not-at-top
        for k in range(3):
          time.sleep(self.gap)
          jax.jit(lambda x, k=k: x + k)(np.float32(ids[1]))
    return answer(rows)


def build(flag_dir: str, gap: float = 0.0, use_jax: bool = False) -> dict:
  if use_jax:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update('jax_enable_compilation_cache', False)  # every jit a real compile
    jax.device_put(0).block_until_ready()  # backend start-up here, not inside a timed call
  # Every worker ever started leaves its pid: the tests check that none outlives the pool.
  (pathlib.Path(flag_dir) / f'pid_{os.getpid()}').touch()
  return {'fake': Runner(flag_dir, gap)}

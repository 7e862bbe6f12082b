"""Orbax checkpoints per training stage: periodic saves, resume, fall back past a corrupt step."""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

DONE = 'done.json'


class Stage:
  """Checkpoints of one stage under `<workdir>/<stage>/ckpt`, and its done marker."""

  def __init__(self, directory, keep=2):
    self.dir = pathlib.Path(directory).absolute()
    self.mngr = ocp.CheckpointManager(
        self.dir / 'ckpt',
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def save(self, step, state):
    """Synchronous save (so a kill right after returns leaves a complete step)."""
    self.mngr.save(int(step), args=ocp.args.StandardSave(state), force=True)
    self.mngr.wait_until_finished()

  def restore(self, target):
    """(step, state) of the newest readable checkpoint, or (None, None); skips corrupt ones."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    for step in sorted(self.mngr.all_steps(), reverse=True):
      try:
        state = self.mngr.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # a partial or corrupt step: warn and try the previous one
        logging.warning('checkpoint %s/ckpt/%d unreadable (%s: %s); trying an older one',
                        self.dir, step, type(e).__name__, str(e)[:200])
        continue
      return step, jax.tree.map(np.asarray, state)
    return None, None

  @property
  def done(self):
    return (self.dir / DONE).exists()

  def mark_done(self, summary):
    tmp = self.dir / (DONE + '.tmp')
    tmp.write_text(json.dumps(summary, indent=2, default=float))
    tmp.replace(self.dir / DONE)

  def summary(self):
    return json.loads((self.dir / DONE).read_text())

  def close(self):
    self.mngr.close()

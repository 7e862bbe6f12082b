"""Orbax checkpoints per training stage: periodic saves, resume, fall back past a corrupt step.

Saves are asynchronous: `Stage.save` returns once the state has been copied off the devices,
and the files are written in the background while training goes on. Each finished step
directory also holds `mp_jax_digest.json`, a sha256 of the saved state, so a step whose files
are damaged but still parse is caught too. Steps without a digest (older runs, or a kill between
a step's write and its digest) are trusted.
"""

import concurrent.futures
import hashlib
import pathlib
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mp_jax import fsio
from mp_jax.training import distributed

DONE = 'done.json'
DIGEST = 'mp_jax_digest.json'


class CorruptCheckpoint(Exception):
  """A checkpoint step whose contents do not match its digest."""


def digest(state):
  """sha256 over every leaf's path, dtype, shape and bytes (host values)."""
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    x = np.ascontiguousarray(x)
    h.update(f'{jax.tree_util.keystr(path)}|{x.dtype}|{x.shape}|'.encode())
    h.update(x.tobytes())
  return h.hexdigest()


class Stage:
  """Checkpoints of one stage under `<workdir>/<stage>/ckpt`, and its done marker."""

  def __init__(self, directory, keep=2):
    self.dir = pathlib.Path(directory).absolute()
    # A kill mid-write leaves only `<step>.orbax-checkpoint-tmp-*` (orbax renames it into place
    # once complete); the next run's manager deletes it (cleanup_tmp_directories).
    self.mngr = ocp.CheckpointManager(
        self.dir / 'ckpt',
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True))
    self.bad = set()  # steps that failed to restore
    self._pending = None  # (step, digest future or None) of the save in flight
    self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='mp_jax_digest')

  def save(self, step, state):
    """Starts saving `state` as `step`; the caller may overwrite (donate) `state` on return.

    The previous save is finished first (its digest written). A readable step that already
    exists is kept: it was saved by an earlier run of the same command and, training being
    deterministic, holds the same state. An unreadable one is moved to `<stage>/corrupt/` first.
    """
    step = int(step)
    self.wait()
    if step in self.bad:
      self._set_aside(step)
    elif step in self.mngr.all_steps():
      logging.info('checkpoint %s/ckpt/%d exists; kept', self.dir, step)
      return
    # Donation safety (orbax 0.12.8): CheckpointManager.save -> AsyncCheckpointer.save runs the
    # handler's async_save to completion in this thread (asyncio_utils.run_sync) and only the
    # commit futures go to the background. Without a device-to-host byte limit every jax.Array
    # is "prioritized" (jax_array_handlers._serialize_arrays), and replica_slices.
    # transfer_arrays_to_host "Blocks until completion" (np.asarray of each shard). So the
    # values are on the host when save returns. On CPU those are zero-copy views; XLA then
    # refuses to donate a buffer that has a live external reference, and copies instead.
    host = distributed.to_host(state) if distributed.is_main() else None
    self.mngr.save(step, args=ocp.args.StandardSave(state), force=True)
    # The digest is hashed in the background too (hashlib releases the GIL on large buffers).
    self._pending = (step, self._hasher.submit(digest, host) if host is not None else None)

  def wait(self):
    """Blocks until the save in flight is complete on disk, then writes its digest."""
    self.mngr.wait_until_finished()
    if self._pending is None:
      return
    step, hashed = self._pending
    self._pending = None
    if distributed.is_main():
      if not self._step_dir(step).exists():  # orbax logs a failed background write and goes on
        raise OSError(f'checkpoint {self._step_dir(step)} was not written (see the log above)')
      fsio.write_json(self._step_dir(step) / DIGEST, {'sha256': hashed.result()})
    distributed.barrier(f'checkpoint-digest-{self.dir}-{step}')

  def _step_dir(self, step):
    return self.dir / 'ckpt' / str(step)

  def _restore_step(self, step, abstract):
    state = distributed.to_host(self.mngr.restore(step, args=ocp.args.StandardRestore(abstract)))
    path = self._step_dir(step) / DIGEST
    if path.exists():
      want, got = fsio.read_json(path)['sha256'], digest(state)
      if want != got:
        raise CorruptCheckpoint(f'contents do not match {DIGEST} (sha256 {got[:12]}... vs '
                                f'{want[:12]}...)')
    return state

  def restore(self, target, sharding=None):
    """(step, host state) of the newest readable checkpoint, or (None, None).

    An unreadable or corrupt step is skipped with a warning and the previous one is tried; it
    stays in place (nothing is lost if the cause was elsewhere) until this stage saves that step
    again. Arrays are placed with `sharding` (default: replicated over all devices), so a run
    can resume on a different number of devices.
    """
    self.wait()
    sharding = sharding or distributed.replicated(distributed.mesh())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding),
        target)
    for step in sorted(self.mngr.all_steps(), reverse=True):
      try:
        return step, self._restore_step(step, abstract)
      except Exception as e:  # partial or corrupt: warn and try the previous one
        logging.warning('checkpoint %s unreadable (%s: %s); falling back to an older one',
                        self._step_dir(step), type(e).__name__, str(e)[:300])
        self.bad.add(step)
    return None, None

  def _set_aside(self, step):
    if distributed.is_main():
      dest = self.dir / 'corrupt' / f'{step}-{time.time_ns()}'
      dest.parent.mkdir(parents=True, exist_ok=True)
      self._step_dir(step).rename(dest)
      logging.warning('moved the unreadable checkpoint %s to %s', self._step_dir(step), dest)
    distributed.barrier(f'checkpoint-aside-{self.dir}-{step}')
    self.bad.discard(step)
    self.mngr.reload()

  @property
  def done(self):
    return (self.dir / DONE).exists()

  def mark_done(self, summary):
    """Writes the done marker once every save of this stage is complete on disk."""
    self.wait()
    if distributed.is_main():
      fsio.write_json(self.dir / DONE, summary, indent=2, default=float)
    distributed.barrier(f'checkpoint-done-{self.dir}')

  def summary(self):
    return fsio.read_json(self.dir / DONE)

  def close(self):
    """Finishes the save in flight (and its digest); the manager cannot be used afterwards."""
    self.wait()
    self.mngr.close()
    self._hasher.shutdown()

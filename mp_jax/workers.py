"""Serving with one single-threaded worker process per CPU core.

XLA:CPU splits each op of a program across the cores. The engine's work is many smaller ops
(importance scores, compaction, exit decisions, narrow late layers) that split badly, so on 2
cores it gains less from the second core than the dense model does. Whole requests in
parallel, one process pinned to each core with its own compiled programs, keep both cores busy
for any model (docs/RESULTS.md, "Per-core workers").
"""

import contextlib
import multiprocessing
import os
import traceback
from collections.abc import Callable, Sequence

import numpy as np


def build_engines(cfg, params, *, prune: bool, exits: bool, tau: float, engine_kw: dict):
  """{'engine': pruned/early-exit Engine, 'dense': DenseEngine} on the same params."""
  from mp_jax import engine as engine_lib  # pylint: disable=g-import-not-at-top
  return {'engine': engine_lib.Engine(cfg, params, prune=prune, exits=exits, tau=tau,
                                      **engine_kw),
          'dense': engine_lib.DenseEngine(cfg, params, **engine_kw)}


def _serve(core: int, conn, build: Callable, build_kw: dict) -> None:
  """Worker loop: pin to `core`, build the runners, answer (name, rows) until None."""
  # Before JAX starts: XLA sizes its intra-op thread pool from the CPU affinity.
  os.sched_setaffinity(0, {core})
  try:
    runners = build(**build_kw)
    conn.send(('ok', sorted(runners)))
  except Exception:  # pylint: disable=broad-except
    conn.send(('error', traceback.format_exc()))
    return
  while (msg := conn.recv()) is not None:
    name, rows = msg
    try:
      conn.send(('ok', runners[name].predict(rows)))
    except Exception:  # pylint: disable=broad-except
      conn.send(('error', traceback.format_exc()))


class WorkerPool:
  """Runners (objects with `.predict(rows) -> dict of arrays`) in one process per core.

  `build(**build_kw)` runs in each worker and returns {name: runner}; it and its arguments
  must pickle. `predict(name, rows)` deals length-sorted blocks of `block` rows round-robin
  to the workers (so each gets long and short requests alike, in whole batches) and returns
  the outputs in the caller's order.
  """

  def __init__(self, build: Callable, build_kw: dict, cores: Sequence[int] | None = None,
               block: int = 32):
    self.cores = list(cores) if cores is not None else sorted(os.sched_getaffinity(0))
    if not self.cores:
      raise ValueError('WorkerPool needs at least one core')
    self.block = int(block)
    ctx = multiprocessing.get_context('spawn')  # a fresh interpreter: no forked JAX state
    self._conns, self._procs = [], []
    for core in self.cores:
      parent, child = ctx.Pipe()
      proc = ctx.Process(target=_serve, args=(core, child, build, build_kw), daemon=True)
      proc.start()
      child.close()
      self._conns.append(parent)
      self._procs.append(proc)
    try:
      self.names = self._replies(range(len(self.cores)), 'starting')[0]
    except Exception:
      self.close()
      raise

  def _recv(self, i: int, what: str):
    """(status, value) from worker i; a RuntimeError naming the core if it died."""
    try:
      return self._conns[i].recv()
    except EOFError:
      raise RuntimeError(f'worker on core {self.cores[i]} died while {what} '
                         f'(exit code {self._procs[i].exitcode})') from None

  def _replies(self, workers_: Sequence[int], what: str) -> dict:
    """Every listed worker's answer (all read first, so no reply is left in a pipe)."""
    got = {i: self._recv(i, what) for i in workers_}
    for i, (status, value) in got.items():
      if status != 'ok':
        raise RuntimeError(f'worker on core {self.cores[i]} failed while {what}:\n{value}')
    return {i: value for i, (_, value) in got.items()}

  def split(self, lengths: Sequence[int]) -> list[np.ndarray]:
    """Row indices per worker: length-sorted blocks of `block` rows dealt round-robin; the last
    round (fewer than `block` rows per worker) is shared evenly, so the workers finish together."""
    order = np.argsort(-np.asarray(lengths), kind='stable')
    n = len(self.cores)
    full = len(order) // (self.block * n) * self.block * n
    parts = [[] for _ in range(n)]
    for k, s in enumerate(range(0, full, self.block)):
      parts[k % n].append(order[s:s + self.block])
    for i, rest in enumerate(np.array_split(order[full:], n)):
      parts[i].append(rest)
    return [np.concatenate(p) for p in parts]

  def predict(self, name: str, rows: Sequence) -> dict[str, np.ndarray]:
    """The runner `name` on `rows` (sequence of (ids, type_ids)), split across the workers."""
    if name not in self.names:
      raise KeyError(f'no runner {name!r}; have {self.names}')
    if not len(rows):
      raise ValueError('no rows to predict')
    parts = self.split([len(r[0]) for r in rows])
    busy = [i for i, idx in enumerate(parts) if len(idx)]
    for i in busy:  # send all, then wait: the workers run concurrently
      self._conns[i].send((name, [rows[j] for j in parts[i]]))
    outs = self._replies(busy, f'running {name!r}')
    first = outs[busy[0]]
    merged = {k: np.zeros((len(rows), *v.shape[1:]), v.dtype) for k, v in first.items()}
    for i in busy:
      for k, v in outs[i].items():
        merged[k][parts[i]] = v
    return merged

  def close(self) -> None:
    for conn, proc in zip(self._conns, self._procs):
      with contextlib.suppress(BrokenPipeError, OSError):
        conn.send(None)
      proc.join(timeout=10)
      if proc.is_alive():
        proc.terminate()
    self._conns, self._procs = [], []

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

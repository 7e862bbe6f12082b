"""Serving with one single-threaded worker process per CPU core.

XLA:CPU splits each op of a program across the cores. The engine's work is many smaller ops
(importance scores, compaction, exit decisions, narrow late layers) that split badly, so on 2
cores it gains less from the second core than the dense model does. Whole requests in
parallel, one process pinned to each core with its own compiled programs, keep both cores busy
for any model (docs/RESULTS.md, "Per-core workers").

A worker that dies or stays silent past the pool's timeout is stopped and replaced by a fresh
one on the same core, which reruns its share of the call once; no worker outlives the pool.
"""

import contextlib
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'  # one XLA compilation


def build_engines(cfg, params, *, prune: bool, exits: bool, tau: float, engine_kw: dict,
                  plan=None):
  """{'engine': pruned/early-exit Engine (exit plan `plan`), 'dense': the unpruned model's
  DenseEngine}."""
  from mp_jax.serving import engine as engine_lib  # pylint: disable=g-import-not-at-top
  return {'engine': engine_lib.Engine(cfg, params, prune=prune, exits=exits, tau=tau, plan=plan,
                                      **engine_kw),
          'dense': engine_lib.unpruned_dense(cfg, params, **engine_kw)}


def _locked_send(conn) -> Callable:
  """conn.send for several threads: JAX calls the compile listener on whichever thread compiles."""
  lock = threading.Lock()

  def send(msg):
    with lock:  # two writers at once would interleave their bytes in the pipe
      conn.send(msg)

  return send


def _report_compiles(send: Callable) -> None:
  """Sends ('compiled', seconds) after each XLA compile.

  The pool's sign that a worker whose first call of a shape takes long is compiling, not hung.
  """
  import jax  # pylint: disable=g-import-not-at-top

  def beat(event, secs, **_):
    if event == COMPILE_EVENT:
      send(('compiled', secs))

  jax.monitoring.register_event_duration_secs_listener(beat)


def _serve(core: int, conn, build: Callable, build_kw: dict) -> None:
  """Worker loop: pin to `core`, build the runners, answer (name, rows) until None."""
  # Before JAX starts: XLA sizes its intra-op thread pool from the CPU affinity.
  os.sched_setaffinity(0, {core})
  send = _locked_send(conn)
  try:
    runners = build(**build_kw)
    send(('ok', sorted(runners)))
  except Exception:  # pylint: disable=broad-except
    send(('error', traceback.format_exc()))
    return
  reporting = False
  while (msg := conn.recv()) is not None:
    if not reporting and 'jax' in sys.modules:  # runners that never use JAX never import it
      _report_compiles(send)
      reporting = True
    name, rows = msg
    try:
      send(('ok', runners[name].predict(rows)))
    except Exception:  # pylint: disable=broad-except
      send(('error', traceback.format_exc()))


def _exit_cause(proc) -> str:
  """How a worker whose pipe closed ended, as a predicate: 'was killed by SIGKILL'."""
  proc.join(timeout=2)  # its pipe closes a moment before the exit code is there
  code = proc.exitcode
  if code is None:
    return 'closed its pipe'
  if code < 0:
    with contextlib.suppress(ValueError):
      return f'was killed by {signal.Signals(-code).name}'
    return f'was killed by signal {-code}'
  return f'exited with code {code}'


def _stop(conn, proc, grace: float = 0.0) -> None:
  """Ends one worker: `grace` seconds to exit on its own, then SIGTERM, then SIGKILL; reaped."""
  if proc is not None:
    proc.join(timeout=grace)
    for end in (proc.terminate, proc.kill):
      if proc.is_alive():
        end()
        proc.join(timeout=5)
  if conn is not None:
    conn.close()


def _stop_all(conns: list, procs: list) -> None:
  """Stops every worker (asked first, all at once, so they exit together); empties the slots."""
  for conn in conns:
    if conn is not None:
      with contextlib.suppress(OSError):
        conn.send(None)
  for i, (conn, proc) in enumerate(zip(conns, procs)):
    _stop(conn, proc, grace=5)
    conns[i] = procs[i] = None


def _seconds(arg: str, value) -> float:
  """`value` as seconds; a ValueError naming `arg` unless it is positive and finite."""
  with contextlib.suppress(TypeError, ValueError):
    if math.isfinite(float(value)) and float(value) > 0:
      return float(value)
  raise ValueError(f'WorkerPool {arg} must be a positive finite number of seconds, got {value!r}')


class WorkerPool:
  """Runners (objects with `.predict(rows) -> dict of arrays`) in one process per core.

  `build(**build_kw)` runs in each worker and returns {name: runner}; it and its arguments
  must pickle. `predict(name, rows)` deals length-sorted blocks of `block` rows round-robin
  to the workers (so each gets long and short requests alike, in whole batches) and returns
  the outputs in the caller's order.

  `timeout`: seconds a worker may stay silent during a call. Its reply, and each program it
  finishes compiling (workers whose runners use JAX report those), restart the clock, so a call
  that compiles new shapes gets the time it needs and a hung worker is found within `timeout`;
  it bounds the steady-state run of one worker's share of one call. `start_timeout`: seconds
  to spawn a worker and run `build`. A worker that dies or overstays is stopped, a fresh one
  started on its core, and its share of the call rerun once; a second failure raises a
  RuntimeError. Errors raised by a runner (bad input) are deterministic: raised, not retried.
  """

  def __init__(self, build: Callable, build_kw: dict, cores: Sequence[int] | None = None,
               block: int = 32, timeout: float = 600.0, start_timeout: float = 300.0):
    self.cores = list(cores) if cores is not None else sorted(os.sched_getaffinity(0))
    if not self.cores:
      raise ValueError('WorkerPool needs at least one core')
    self.block = int(block)
    self.timeout, self.start_timeout = _seconds('timeout', timeout), _seconds('start_timeout',
                                                                              start_timeout)
    self._build, self._build_kw = build, build_kw
    self._ctx = multiprocessing.get_context('spawn')  # a fresh interpreter: no forked JAX state
    # One slot per core; None: stopped, restarted by the next call.
    self._conns, self._procs = [None] * len(self.cores), [None] * len(self.cores)
    # Holds the slot lists, not the pool: stops the workers if the pool is dropped unclosed,
    # and at interpreter exit.
    self._finalizer = weakref.finalize(self, _stop_all, self._conns, self._procs)
    try:
      self.names = self._start(range(len(self.cores)), 'starting')[0]
    except BaseException:
      self.close()
      raise

  @property
  def pids(self) -> list[int | None]:
    """Each core's worker process id (None: stopped, restarted by the next call)."""
    return [p.pid if p is not None else None for p in self._procs]

  def _spawn(self, i: int) -> None:
    parent, child = self._ctx.Pipe()
    proc = self._ctx.Process(target=_serve, args=(self.cores[i], child, self._build,
                                                  self._build_kw), daemon=True)
    proc.start()
    child.close()
    self._conns[i], self._procs[i] = parent, proc

  def _drop(self, i: int) -> None:
    """Stops worker i now; its slot is restarted by the next call."""
    _stop(self._conns[i], self._procs[i])
    self._conns[i] = self._procs[i] = None

  def _start(self, workers_: Sequence[int], what: str) -> dict:
    """Fresh workers in the listed slots; their runner names.

    A RuntimeError names the core if one fails to build, dies or overstays `start_timeout`
    (the others keep running).
    """
    workers_ = list(workers_)
    try:
      for i in workers_:
        self._spawn(i)
      got = self._gather(workers_, self.start_timeout)
    except BaseException:
      for i in workers_:
        self._drop(i)
      raise
    for i, (status, value) in got.items():
      if status == 'error':
        self._drop(i)  # it returned after sending the traceback
        raise RuntimeError(f'worker on core {self.cores[i]} failed while {what}:\n{value}')
      if status == 'lost':
        raise RuntimeError(f'worker on core {self.cores[i]} {value} while {what}')
    return {i: value for i, (_, value) in got.items()}

  def _gather(self, workers_: Sequence[int], timeout: float) -> dict:
    """Each listed worker's reply: ('ok', value), ('error', traceback) or ('lost', cause).

    'error' carries its runner's traceback; 'lost' is a worker that died or stayed silent
    `timeout` s (it is stopped). Waits for all, so no reply is left in a pipe to be taken for
    the next call's.
    """
    deadline = {i: time.monotonic() + timeout for i in workers_}
    got = {}
    while len(got) < len(deadline):
      waiting = {self._conns[i]: i for i in deadline if i not in got}
      left = min(deadline[i] for i in waiting.values()) - time.monotonic()
      for conn in multiprocessing.connection.wait(list(waiting), timeout=max(left, 0.0)):
        i = waiting[conn]
        try:
          status, value = conn.recv()
        except (EOFError, OSError):
          got[i] = ('lost', _exit_cause(self._procs[i]))
          self._drop(i)
          continue
        if status == 'compiled':
          deadline[i] = time.monotonic() + timeout
        else:
          got[i] = (status, value)
      now = time.monotonic()
      for i in waiting.values():
        if i not in got and deadline[i] <= now and not self._conns[i].poll(0):
          got[i] = ('lost', f'did not answer within {timeout:g} s')
          self._drop(i)
    return got

  def _run(self, name: str, jobs: dict) -> dict:
    """Sends each worker its rows, then gathers the replies (see `_gather`)."""
    # Pickled before anything is sent: rows that do not pickle leave no request in flight.
    payloads = {i: multiprocessing.reduction.ForkingPickler.dumps((name, rows))
                for i, rows in jobs.items()}
    got, sent = {}, []
    try:
      for i, payload in payloads.items():
        try:
          self._conns[i].send_bytes(payload)
          sent.append(i)
        except OSError:  # it died since the last call
          got[i] = ('lost', _exit_cause(self._procs[i]))
          self._drop(i)
      got.update(self._gather(sent, self.timeout))
    except BaseException:
      # Interrupted (e.g. KeyboardInterrupt): replies may still come; stop those workers so no
      # later call reads them. The next call restarts them.
      for i in sent:
        if self._procs[i] is not None:
          self._drop(i)
      raise
    return got

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
    if not self._finalizer.alive:
      raise RuntimeError('WorkerPool is closed')
    if name not in self.names:
      raise KeyError(f'no runner {name!r}; have {self.names}')
    if not len(rows):
      raise ValueError('no rows to predict')
    stopped = [i for i, p in enumerate(self._procs) if p is None]
    if stopped:
      self._start(stopped, 'restarting')
    parts = self.split([len(r[0]) for r in rows])
    jobs = {i: [rows[j] for j in idx] for i, idx in enumerate(parts) if len(idx)}
    what = f'running {name!r}'
    got = self._run(name, jobs)
    lost = {i: cause for i, (status, cause) in got.items() if status == 'lost'}
    if lost and all(status != 'error' for status, _ in got.values()):
      for i, cause in lost.items():
        logging.warning('worker on core %d %s while %s on %d rows; restarting it, retrying once',
                        self.cores[i], cause, what, len(jobs[i]))
      self._start(lost, f'restarting after it {"; ".join(sorted(set(lost.values())))}')
      for i, (status, value) in self._run(name, {i: jobs[i] for i in lost}).items():
        if status == 'lost':
          value = (f'{lost[i]} while {what} on {len(jobs[i])} rows; restarted and retried '
                   f'once, the fresh worker {value} too')
        got[i] = (status, value)
    rank = {'error': 0, 'lost': 1, 'ok': 2}  # a runner's traceback says most
    i, (status, value) = min(got.items(), key=lambda kv: (rank[kv[1][0]], kv[0]))
    if status == 'error':
      raise RuntimeError(f'worker on core {self.cores[i]} failed while {what}:\n{value}')
    if status == 'lost':  # only after the retry (a lost worker beside an error is not retried)
      raise RuntimeError(f'worker on core {self.cores[i]} {value}')
    first = got[min(got)][1]
    merged = {k: np.zeros((len(rows), *v.shape[1:]), v.dtype) for k, v in first.items()}
    for i, (_, out) in got.items():
      for k, v in out.items():
        merged[k][parts[i]] = v
    return merged

  def close(self) -> None:
    """Stops every worker (asked to exit, then SIGTERM, then SIGKILL); the pool is then unusable."""
    self._finalizer()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

"""Per-core worker processes: same answers as the in-process engine, caller order, errors;
dead, hung and interrupted workers restarted, none leaked."""

import gc
import os
import pathlib
import signal
import threading
import time

import numpy as np
import pytest

from mp_jax.serving import engine as engine_lib
from mp_jax.serving import workers
from tests import fake_runner
from tests.test_engine import CFG, FAST_COMPILE, make_rows, random_params, reference

KW = dict(length_buckets=(16, 64), batch_buckets=(2, 8), compiler_options=FAST_COMPILE)
CORES = sorted(os.sched_getaffinity(0))
TWO = [CORES[0], CORES[-1]]


def _broken_build(**kw):
  raise ValueError(f'cannot build from {sorted(kw)}')


@pytest.fixture(scope='module')
def params():
  p = random_params(CFG, seed=3)
  p['thresholds'] = np.full_like(p['thresholds'], 0.05)  # prunes some tokens
  return p


@pytest.fixture(scope='module')
def tau(params):
  """A tau at which some rows exit early and some do not."""
  return float(np.quantile(reference(params, make_rows(21, 16))['u'], 0.3))


@pytest.fixture(scope='module')
def pool(params, tau):
  build_kw = dict(cfg=CFG, params=params, prune=True, exits=True, tau=tau, engine_kw=KW)
  with workers.WorkerPool(workers.build_engines, build_kw, cores=TWO, block=8) as p:
    yield p


@pytest.fixture(scope='module')
def local(params, tau):
  """The same runners in this process: the reference for the workers' answers."""
  return {'engine': engine_lib.Engine(CFG, params, prune=True, exits=True, tau=tau, **KW),
          'dense': engine_lib.DenseEngine(CFG, params, **KW)}


def test_sends_from_several_threads_never_overlap():
  class Conn:
    """A pipe that notices a second writer entering while one is writing."""

    def __init__(self):
      self.writers, self.overlaps, self.got = 0, 0, []

    def send(self, msg):
      self.writers += 1
      self.overlaps += self.writers > 1
      time.sleep(0.001)  # a long write: another thread runs meanwhile
      self.got.append(msg)
      self.writers -= 1

  conn = Conn()
  send = workers._locked_send(conn)
  threads = [threading.Thread(target=lambda k=k: [send((k, j)) for j in range(20)])
             for k in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert conn.overlaps == 0 and sorted(conn.got) == [(k, j) for k in range(4) for j in range(20)]


def test_split_deals_sorted_blocks():
  p = workers.WorkerPool.__new__(workers.WorkerPool)
  p.cores, p.block = [0, 1], 3
  lengths = [5, 9, 1, 7, 3, 8, 2]
  parts = p.split(lengths)
  # Length-sorted: 9 8 7 | 5 3 2 | 1 -> whole blocks alternate, the last row goes to worker 0.
  assert [lengths[i] for i in parts[0]] == [9, 8, 7, 1]
  assert [lengths[i] for i in parts[1]] == [5, 3, 2]
  # 213 rows in blocks of 32 (bbc's test split): 6 whole blocks, the other 21 shared 11 / 10.
  p.block = 32
  parts = p.split(list(range(213)))
  assert [len(x) for x in parts] == [107, 106]
  assert sorted(np.concatenate(parts).tolist()) == list(range(213))
  p.cores = [0, 1, 2]
  assert [len(x) for x in p.split([4] * 5)] == [2, 2, 1]  # fewer rows than one block each


def test_pool_matches_in_process_engine(pool, local):
  assert pool.names == ['dense', 'engine']
  rows = make_rows(21, 37, min_len=3)  # 5 blocks of 8: both workers get work
  for name in ('engine', 'dense'):
    out, ref = pool.predict(name, rows), local[name].predict(rows)
    assert set(out) == set(ref)
    for k in ('labels', 'exit_layer', 'n_attn', 'n_ffn'):
      np.testing.assert_array_equal(out[k], ref[k], err_msg=f'{name} {k}')
    np.testing.assert_allclose(out['logits'], ref['logits'], atol=1e-5, rtol=0)
  out = pool.predict('engine', rows)
  assert (out['n_ffn'][:, 0] < out['n_attn'][:, 0]).any()  # pruning happened in the workers
  assert len(set(out['exit_layer'].tolist())) >= 2  # and rows exited at different layers


def test_pool_errors_are_reported_and_survived(pool):
  with pytest.raises(KeyError, match='no runner'):
    pool.predict('teacher', make_rows(0, 2))
  with pytest.raises(ValueError, match='no rows'):
    pool.predict('engine', [])
  with pytest.raises(RuntimeError, match='(?s)core.*largest length bucket'):
    pool.predict('engine', make_rows(1, 2, min_len=65, max_len=65))
  out = pool.predict('engine', make_rows(2, 3))  # the worker that failed still answers
  assert out['labels'].shape == (3,)


def test_failed_build_names_the_cause():
  with pytest.raises(RuntimeError, match='(?s)while starting.*cannot build from'):
    workers.WorkerPool(_broken_build, {'x': 1}, cores=CORES[:1])


def _gone(pid: int) -> bool:
  """True once the process is gone and reaped (a zombie still answers signal 0)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  return False


def _started(flag_dir) -> list[int]:
  """Pids of every fake worker ever started with this flag_dir."""
  return [int(f.name[4:]) for f in pathlib.Path(flag_dir).glob('pid_*')]


def _fake_rows(marker=None):
  """Rows of lengths 9, 7, 5, 3: with block=1 on two workers, worker 0 gets 9 and 5, worker 1
  gets 7 and 3; `marker` starts the longest (worker 0's)."""
  rows = [(np.arange(n, dtype=np.int32) + 1, np.zeros(n, np.int32)) for n in (9, 7, 5, 3)]
  if marker is not None:
    rows[0][0][0] = marker
  return rows


def _assert_fake(out, rows):
  ref = fake_runner.answer(rows)
  assert set(out) == set(ref)
  for k in ref:
    np.testing.assert_array_equal(out[k], ref[k], err_msg=k)


def test_killed_worker_is_restarted(pool, local):
  rows = make_rows(21, 37, min_len=3)
  ref = local['engine'].predict(rows)
  before = pool.pids
  os.kill(before[0], signal.SIGKILL)  # between calls: the next send finds a broken pipe
  out = pool.predict('engine', rows)
  for k in ('labels', 'exit_layer', 'n_attn', 'n_ffn'):
    np.testing.assert_array_equal(out[k], ref[k], err_msg=k)
  np.testing.assert_allclose(out['logits'], ref['logits'], atol=1e-5, rtol=0)
  assert pool.pids[1] == before[1] and pool.pids[0] not in (before[0], None)
  assert _gone(before[0])


def test_hung_worker_is_restarted_then_reported(tmp_path):
  with workers.WorkerPool(fake_runner.build, {'flag_dir': str(tmp_path)}, cores=TWO, block=1,
                          timeout=1.5) as pool:
    rows = _fake_rows()
    _assert_fake(pool.predict('fake', rows), rows)
    first = pool.pids
    # Worker 0 hangs on its part; a fresh worker on its core answers it; worker 1's part stands.
    rows = _fake_rows(fake_runner.HANG_ONCE)
    start = time.monotonic()
    _assert_fake(pool.predict('fake', rows), rows)
    assert time.monotonic() - start >= 1.5
    assert pool.pids[1] == first[1] and pool.pids[0] != first[0] and _gone(first[0])
    # It hangs on the fresh worker too: a clear error, after exactly one retry.
    with pytest.raises(RuntimeError, match=rf'(?s)core {TWO[0]} did not answer within 1.5 s while '
                       r"running 'fake' on 2 rows; restarted and retried once, the fresh "
                       r'worker did not answer within 1.5 s too'):
      pool.predict('fake', _fake_rows(fake_runner.HANG))
    assert len(_started(tmp_path)) == 4  # 2, a restart, a restart that hung again
    rows = _fake_rows()
    _assert_fake(pool.predict('fake', rows), rows)  # still usable: core 0 restarted again
    assert len(_started(tmp_path)) == 5
  assert all(_gone(pid) for pid in _started(tmp_path))


def test_dead_worker_errors_and_interrupts_leave_no_process(tmp_path):
  with pytest.raises(ValueError, match='timeout must be a positive finite number.*nan'):
    workers.WorkerPool(fake_runner.build, {'flag_dir': str(tmp_path)}, timeout=float('nan'))
  pool = workers.WorkerPool(fake_runner.build, {'flag_dir': str(tmp_path)}, cores=TWO, block=1,
                            timeout=30)
  rows = _fake_rows()
  with pytest.raises(RuntimeError, match=rf'core {TWO[0]} exited with code 3 while running '
                     r"'fake' on 2 rows; restarted and retried once, the fresh worker exited "
                     r'with code 3 too'):
    pool.predict('fake', _fake_rows(fake_runner.EXIT))
  _assert_fake(pool.predict('fake', rows), rows)
  # A runner's exception is the input's fault: reported with its traceback, not retried.
  before = pool.pids
  with pytest.raises(RuntimeError, match=rf"(?s)core {TWO[0]} failed while running 'fake'.*"
                     'ValueError: row starts with RAISE'):
    pool.predict('fake', _fake_rows(fake_runner.RAISE))
  bad = _fake_rows()
  bad[3] = (np.array([1, lambda: 0], object), bad[3][1])  # worker 1's part does not pickle
  with pytest.raises(Exception, match='pickle'):
    pool.predict('fake', bad)
  assert pool.pids == before  # neither failure stopped or restarted a worker
  # Interrupted while waiting (here by a timer; Ctrl-C alike): the busy workers are stopped so
  # their late replies cannot answer the next call, which restarts them.
  class Interrupt(Exception):
    pass

  def interrupt(*_):
    raise Interrupt

  old = signal.signal(signal.SIGALRM, interrupt)
  try:
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    with pytest.raises(Interrupt):
      pool.predict('fake', _fake_rows(fake_runner.HANG))
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)
  assert pool.pids == [None, None] and all(_gone(pid) for pid in before)
  _assert_fake(pool.predict('fake', rows), rows)
  # Dropped without close(): its finalizer stops the workers.
  del pool
  gc.collect()
  assert len(_started(tmp_path)) == 6 and all(_gone(pid) for pid in _started(tmp_path))


def test_compiling_worker_is_not_timed_out(tmp_path):
  """Busy 3 x 1 s with a 2.5 s timeout: each finished compile tells the pool it is alive."""
  kw = {'flag_dir': str(tmp_path), 'gap': 1.0, 'use_jax': True}
  with workers.WorkerPool(fake_runner.build, kw, cores=CORES[:1], timeout=2.5) as pool:
    rows = [(np.array([fake_runner.COMPILE, 7], np.int32), np.zeros(2, np.int32))]
    _assert_fake(pool.predict('fake', rows), rows)
    assert len(_started(tmp_path)) == 1  # answered by the first worker, no restart

"""The process heap: hands its free pages back to the kernel when another program or the machine
needs them.

Layer 0 (nothing of ours below it). The entry points keep freed memory in the process
(cli.MALLOC_TUNABLES: no trimming, no mmap'd blocks), which spares a training step from faulting
its buffers back in at every step. The price is fragmentation: a step's blocks do not always fit
the holes the last one left, so the heap grows (`bbc` fine-tuning: 13.1-16.9 GiB resident
after 8 steps, the soft stage 19.9 GiB on its own, where its working set is ~6 GiB; a full run was
killed for lack of memory at 23.2 GiB; docs/RESULTS.md sessions 24-25). Two valves:
`release()` between programs of other shapes (the trainer calls it after each stage), and
`watch()`, a thread that releases whenever the machine runs short of memory.
"""

import ctypes
import functools
import os
import pathlib
import threading

from absl import logging

_PAGE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096
GiB = 1 << 30


@functools.cache
def _malloc_trim():
  """glibc's malloc_trim, or None on another C library (which keeps its own policy)."""
  try:  # the C library this process runs on (platform.libc_ver reads the executable's file)
    if not os.confstr('CS_GNU_LIBC_VERSION').startswith('glibc'):
      return None
  except (AttributeError, ValueError, OSError, TypeError):
    return None
  fn = getattr(ctypes.CDLL(None), 'malloc_trim', None)
  if fn is not None:
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
  return fn


def resident_bytes() -> int:
  """This process's resident memory (Linux /proc/self/statm), or 0 where it cannot be read."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * _PAGE
  except (OSError, IndexError, ValueError):
    return 0


def release() -> int:
  """Returns every free page of the heap to the kernel (glibc: malloc_trim(0), which also
  drops whole free pages inside the heap, not only at its top); the bytes of resident memory this
  freed (0 off glibc). Costs the next allocations of those pages a fault each, once."""
  trim = _malloc_trim()
  if trim is None:
    return 0
  before = resident_bytes()
  trim(0)
  return max(before - resident_bytes(), 0)


def release_after(what: str) -> int:
  """release() after `what` (the next program has other buffers), logged where it freed 256 MiB
  or more; the bytes freed."""
  freed = release()
  if freed >= 1 << 28:
    logging.info('heap: %.1f GiB of freed memory handed back after %s (%.1f GiB resident)',
                 freed / GiB, what, resident_bytes() / GiB)
  return freed


def _read_int(path):
  try:
    with open(path) as f:
      return int(f.read().strip())
  except (OSError, ValueError):  # absent, or 'max' (no limit)
    return None


def _cgroup_dirs(proc_cgroup, root):
  """This process's cgroup (v2: the `0::` line of /proc/self/cgroup) and its parents, under root."""
  try:
    with open(proc_cgroup) as f:
      rel = next((line.strip()[3:] for line in f if line.startswith('0::')), None)
  except OSError:
    return []
  if rel is None:
    return []
  d, root = (pathlib.Path(root) / rel.lstrip('/')).resolve(), pathlib.Path(root).resolve()
  return [d, *[p for p in d.parents if p.is_relative_to(root)]]


def _cgroup_room(d):
  """(room, limit) of one cgroup v2 level with a memory.max: limit - usage + reclaimable page
  cache (memory.stat's inactive_file); None without a limit."""
  limit, used = _read_int(d / 'memory.max'), _read_int(d / 'memory.current')
  if limit is None or used is None:
    return None
  cache = 0
  try:
    with open(d / 'memory.stat') as f:
      cache = next((int(line.split()[1]) for line in f if line.startswith('inactive_file ')), 0)
  except (OSError, ValueError, IndexError):
    pass
  return max(limit - used + cache, 0), limit


def memory_available(meminfo='/proc/meminfo', proc_cgroup='/proc/self/cgroup',
                     cgroup_root='/sys/fs/cgroup'):
  """(available, total) bytes: the kernel's MemAvailable and MemTotal, narrowed by the tightest
  memory.max of this process's cgroup (v2) and its parents; None where /proc/meminfo cannot be
  read."""
  try:
    with open(meminfo) as f:
      kb = {k: int(v.split()[0]) for k, v in (line.split(':', 1) for line in f if ':' in line)}
    available, total = kb['MemAvailable'] << 10, kb['MemTotal'] << 10
  except (OSError, KeyError, ValueError, IndexError):
    return None
  for d in _cgroup_dirs(proc_cgroup, cgroup_root):
    room = _cgroup_room(d)
    if room is not None:
      available, total = min(available, room[0]), min(total, room[1])
  return available, total


def reserve_bytes(total: int) -> int:
  """Free memory the machine keeps before watch() releases: an eighth of it, at least 2 GiB, at
  most a quarter (a `bbc` training step's heap grew by up to ~0.4 GiB a second; the thread looks
  twice a second)."""
  return min(max(total // 8, 2 * GiB), total // 4)


class Watcher(threading.Thread):
  """A daemon thread that release()s whenever the memory available (`available()` ->
  (available, total) bytes, or None) falls below reserve_bytes(total), looking every `interval` s.

  Where memory suffices it does nothing but read /proc/meminfo; where it runs short, steps fault
  their buffers in again instead of the kernel killing the process.
  """

  BACKOFF = 20  # checks skipped after a release of < 256 MiB (10 s at the default interval)

  def __init__(self, interval=0.5, available=memory_available):
    super().__init__(daemon=True, name='mp_jax-heap-watch')
    self.interval, self.available = interval, available
    self.released, self.warned, self._stop_event = 0, False, threading.Event()

  def run(self):
    idle = 0
    while not self._stop_event.wait(self.interval):
      if idle:  # the last release freed little: the working set, not the heap, fills memory
        idle -= 1
        continue
      try:
        got = self.available()
        if got is None or got[0] >= reserve_bytes(got[1]):
          continue
        freed = release()
      except Exception as e:  # a valve must not take the run down
        logging.warning('heap watcher stopped: %s', e)
        return
      idle = 0 if freed >= 1 << 28 else self.BACKOFF
      if freed >= GiB and self.warned:  # under pressure it may fire often: big ones only
        logging.info('memory short (%.1f GiB available): %.1f GiB of freed heap handed back',
                     got[0] / GiB, freed / GiB)
      elif freed >= 1 << 28 and not self.warned:
        self.warned = True
        logging.warning(
            'memory short (%.1f of %.1f GiB available): %.1f GiB of freed heap handed back to '
            'the kernel, and again whenever it runs short; steps may slow down (on CPU, '
            'MP_JAX_MALLOC=hugepages keeps the heap small instead; README, on the allocator)',
            got[0] / GiB, got[1] / GiB, freed / GiB)
      self.released += freed

  def stop(self):
    self._stop_event.set()
    self.join()


_watcher = None
_watcher_lock = threading.Lock()


def watch():
  """The process's Watcher, started at the first call; None off glibc or without /proc/meminfo."""
  global _watcher
  with _watcher_lock:
    if _watcher is None and _malloc_trim() is not None and memory_available() is not None:
      _watcher = Watcher()
      _watcher.start()
    return _watcher

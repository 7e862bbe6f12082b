"""Wall-clock measurement: interleaved repeats and medians, and a count of XLA compilations.

Repeats are interleaved across the contenders (A B C A B C ...), so drift of a shared machine
hits every contender alike; the median of each contender's times is what is reported.
"""

import gc
import os
import pathlib
import platform
import statistics
import time

import jax

from mp_jax import heap
from mp_jax.serving import workers


def seconds(fn, clock=time.perf_counter):
  """Time of one call fn()."""
  start = clock()
  fn()
  return clock() - start


def interleaved(fns, repeats, *, warmup=False, clock=time.perf_counter, rounds=None):
  """{name: median seconds of fns[name]()} over `repeats` interleaved rounds.

  warmup: call each once first, untimed (compiles whatever shapes the calls need), or only the
  ones named (a name or a collection of names: the others are warm already); rounds: a dict that
  receives every round's seconds, {name: [s_1, ..., s_repeats]} (paired by round).
  """
  warm = set(fns) if warmup is True else {warmup} if isinstance(warmup, str) else set(warmup or ())
  for name, fn in fns.items():
    if name in warm:
      fn()
  times = {k: [] for k in fns}
  for _ in range(max(1, repeats)):
    for name, fn in fns.items():
      times[name].append(seconds(fn, clock))
  if rounds is not None:
    rounds.update(times)
  return {k: statistics.median(v) for k, v in times.items()}


def paired_range(rounds, num, den) -> list[float]:
  """[lowest, highest] of rounds[num][i] / rounds[den][i] over the rounds (the clock's spread)."""
  r = [a / b for a, b in zip(rounds[num], rounds[den])]
  return [min(r), max(r)]


def machine(cpuinfo: str = '/proc/cpuinfo',
            caches: str = '/sys/devices/system/cpu/cpu0/cache') -> str:
  """'Intel(R) Xeon(R) Processor, 2 cores, L2 2 MiB, L3 480 MiB': the CPU a timing ran on.

  Its model and cache sizes (Linux; the architecture elsewhere): a reading from one CPU does not
  carry over to another (docs/RESULTS.md: the development machine changed CPU four times).
  """
  name = platform.processor() or platform.machine()
  try:
    with open(cpuinfo) as f:
      name = next((ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name')), name)
  except OSError:
    pass
  parts = [name, f'{os.cpu_count()} cores']
  for d in sorted(pathlib.Path(caches).glob('index*')):
    try:
      level, kind, size = ((d / k).read_text().strip() for k in ('level', 'type', 'size'))
    except OSError:
      continue
    if kind != 'Instruction' and int(level) >= 2 and size.endswith('K'):
      kib = int(size[:-1])
      parts.append(f'L{level} {kib // 1024} MiB' if kib % 1024 == 0 else f'L{level} {kib} KiB')
  return ', '.join(parts)


def process_state():
  """This process's memory maps and resident GB (Linux /proc; None elsewhere).

  XLA:CPU maps memory per compiled kernel, and a process may hold at most vm.max_map_count maps.
  """
  try:
    with open('/proc/self/maps') as f:
      maps = sum(1 for _ in f)
  except OSError:
    return {'memory_maps': None, 'rss_gb': None}
  return {'memory_maps': maps, 'rss_gb': round(heap.resident_bytes() / 2 ** 30, 3)}


def release():
  """Frees the compiled programs nobody holds any more (and JAX's caches of them)."""
  gc.collect()  # engines in reference cycles hold their executables until collected
  jax.clear_caches()


_COMPILES = [0]
_LISTENING = [False]


def _count(event, duration_secs, **kwargs):
  del duration_secs, kwargs
  if event == workers.COMPILE_EVENT:
    _COMPILES[0] += 1


def backend_compiles() -> int:
  """XLA compilations in this process since the first call (which starts the count at 0)."""
  if not _LISTENING[0]:  # a process-wide listener, installed only by those who count
    jax.monitoring.register_event_duration_secs_listener(_count)
    _LISTENING[0] = True
  return _COMPILES[0]

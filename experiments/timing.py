"""Interleaved repeats for the comparison scripts: machine drift hits every contender alike."""

import statistics
import time


def median_ms(calls, repeats, clock=time.perf_counter):
  """{name: median ms of calls[name]()} over `repeats` interleaved rounds, after one warm-up."""
  for f in calls.values():  # warm-up (compiles)
    f()
  times = {k: [] for k in calls}
  for _ in range(repeats):
    for k, f in calls.items():
      start = clock()
      f()
      times[k].append(clock() - start)
  return {k: 1e3 * statistics.median(v) for k, v in times.items()}

"""experiments/host_gaps.py: the device's busy time and the host's gaps from a trace."""

import jax
import jax.numpy as jnp
import pytest

from experiments import host_gaps


def _x(name, ts, dur, tid=1):
  return {'ph': 'X', 'name': name, 'ts': ts, 'dur': dur, 'pid': 1, 'tid': tid}


def test_busy_is_the_union_of_program_events_over_threads():
  events = [_x('ThunkExecutor::Execute (wait for completion)', 10, 30, tid=1),
            _x('ThunkExecutor::Execute', 20, 30, tid=2),  # overlaps: merged to 10..50
            _x('ThunkExecutor::Execute', 70, 5, tid=2),
            _x('ffi_call', 0, 100, tid=3),  # a kernel, not a program event
            {'ph': 'M', 'name': 'thread_name'}]
  assert host_gaps.busy_intervals(events) == [[10, 50], [70, 75]]


@pytest.mark.parametrize('busy,start,end,want', [
    ([[10, 50], [70, 75]], 0, 100, [(10, 0), (20, 50), (25, 75)]),
    ([[0, 50], [50, 100]], 0, 100, []),  # back to back: no gap
    ([], 5, 9, [(4, 0)]),
])
def test_gaps_are_the_idle_spans_with_their_offsets(busy, start, end, want):
  assert host_gaps.gaps(busy, start, end) == want


def test_a_real_trace_has_the_program_events_it_reads():
  # Guards the event name against a JAX upgrade: a renamed event would read as 0% busy.
  x = jnp.ones((256, 256))
  f = jax.jit(lambda x: (x @ x).sum())
  f(x).block_until_ready()
  wall_us, gaps = host_gaps.traced_pass(lambda: f(x).block_until_ready())
  assert wall_us > 0 and all(g > 0 for g, _ in gaps)
  assert sum(g for g, _ in gaps) < wall_us

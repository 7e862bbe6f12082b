"""experiments/host_gaps.py: the device's busy time and the host's gaps from a trace."""

import time

import jax
import jax.numpy as jnp
import pytest

from experiments import host_gaps

EXECUTE = host_gaps.EXECUTE


def _x(name, ts, dur, tid=1):
  return {'ph': 'X', 'name': name, 'ts': ts, 'dur': dur, 'pid': 1, 'tid': tid}


def test_busy_is_the_union_of_program_events_over_threads():
  events = [_x(f'{EXECUTE} (wait for completion)', 10, 30, tid=1),
            _x(EXECUTE, 12, 3, tid=2),  # nested in the one above: ends before it
            _x(EXECUTE, 20, 30, tid=2),  # overlaps: merged to 10..50
            _x(EXECUTE, 70, 5, tid=2),
            _x('ffi_call', 0, 100, tid=3),  # a kernel, not a program event
            {'ph': 'M', 'name': 'thread_name'}]
  assert host_gaps.busy_intervals(events) == [[10, 50], [70, 75]]


@pytest.mark.parametrize('busy,start,end,want', [
    ([[10, 50], [70, 75]], 0, 100, [(10, 0), (20, 50), (25, 75)]),
    ([[0, 50], [50, 100]], 0, 100, []),  # back to back: no gap
    ([], 5, 9, [(4, 0)]),
    ([[0, 10], [50, 100]], 20, 90, [(30, 0)]),  # clipped to the pass: before and after it
    ([[0, 30]], 20, 90, [(60, 10)]),
])
def test_gaps_are_the_idle_spans_of_the_pass_with_their_offsets(busy, start, end, want):
  assert host_gaps.gaps(busy, start, end) == want


def test_a_real_trace_puts_the_host_wait_at_the_start_of_the_pass():
  x = jnp.ones((256, 256))
  f = jax.jit(lambda x: (x @ x).sum())
  f(x).block_until_ready()

  def predict():
    time.sleep(0.02)  # the host busy, no program running
    f(x).block_until_ready()
  wall_us, gaps = host_gaps.traced_pass(predict)
  (g, at), = sorted(gaps, reverse=True)[:1]
  assert g > 15e3 and at < 5e3 and wall_us > g

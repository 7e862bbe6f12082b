"""heap.release hands a freed heap back to the kernel; nothing live is touched."""

import platform
import time

import pytest

from mp_jax import heap

glibc = pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')


def _fragmented_heap():
  """A heap with ~248 MiB freed inside it and resident; the live blocks and a pin to keep."""
  blocks = [bytes([i % 251]) * (64 << 10) for i in range(4096)]
  keep, pin = blocks[::64], bytearray(b'p' * 1024)
  del blocks
  return keep, pin


@glibc
def test_release_returns_freed_heap_pages_and_keeps_live_data():
  # 64 KiB blocks stay below glibc's mmap threshold, so they live in the heap; the small block
  # allocated after them pins the heap's top, so freeing them trims nothing on its own.
  base = heap.resident_bytes()
  keep, pin = _fragmented_heap()  # 256 MiB written, 248 MiB of it freed
  freed_in_place = base + (256 << 20) - heap.resident_bytes()
  released = heap.release()
  assert freed_in_place < 64 << 20  # glibc kept the freed blocks resident ...
  assert released > 128 << 20  # ... until release() gave (most of) their pages back
  assert all(b == bytes([(64 * j) % 251]) * (64 << 10) for j, b in enumerate(keep))
  assert pin == b'p' * 1024


def test_release_is_harmless_anywhere():
  assert heap.release() >= 0 and heap.resident_bytes() >= 0


@glibc
@pytest.mark.parametrize('short', [True, False])
def test_watcher_releases_only_when_memory_runs_short(short):
  total = 64 * heap.GiB
  avail = heap.reserve_bytes(total) + (-1 if short else 1)
  keep, pin = _fragmented_heap()
  before = heap.resident_bytes()
  w = heap.Watcher(interval=0.01, available=lambda: (avail, total))
  w.start()
  time.sleep(0.3)
  w.stop()
  if short:
    assert w.released > 128 << 20 and heap.resident_bytes() < before - (128 << 20)
  else:
    assert w.released == 0 and heap.resident_bytes() > before - (64 << 20)
  assert keep[1] == bytes([64 % 251]) * (64 << 10) and pin == b'p' * 1024


@pytest.mark.parametrize('limit, want', [('max\n', (10 << 30, 16 << 30)),
                                         (f'{12 << 30}\n', (4 << 30, 12 << 30)),
                                         (None, (10 << 30, 16 << 30))])
def test_memory_available_reads_meminfo_and_the_cgroup_limit(tmp_path, limit, want):
  (tmp_path / 'meminfo').write_text(
      f'MemTotal:       {16 << 20} kB\nMemFree:        1 kB\nMemAvailable:   {10 << 20} kB\n')
  cg = tmp_path / 'cg'
  cg.mkdir()
  if limit is not None:
    (cg / 'memory.max').write_text(limit)
    (cg / 'memory.current').write_text(f'{8 << 30}\n')
  assert heap.memory_available(tmp_path / 'meminfo', cg) == want
  assert heap.memory_available(tmp_path / 'absent', cg) is None

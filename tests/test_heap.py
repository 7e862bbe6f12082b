"""heap.release hands a freed heap back to the kernel; nothing live is touched."""

import time

import pytest

from mp_jax import heap

glibc = pytest.mark.skipif(heap._malloc_trim() is None, reason='glibc only')


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
  heap.release()  # earlier tests' freed heap would take the blocks below without a fault
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
  heap.release()
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


def _cgroups(tmp_path, levels):
  """A /proc/self/cgroup naming a/b, and the memory files of root/a and root/a/b."""
  (tmp_path / 'cgroup').write_text('0::/a/b\n')
  for rel, files in levels.items():
    d = tmp_path / 'root' / rel
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
      (d / name).write_text(text)
  (tmp_path / 'meminfo').write_text(
      f'MemTotal:       {16 << 20} kB\nMemFree:        1 kB\nMemAvailable:   {10 << 20} kB\n')
  return [tmp_path / 'meminfo', tmp_path / 'cgroup', tmp_path / 'root']


G = 1 << 30


@pytest.mark.parametrize('levels, want', [
    ({}, (10 * G, 16 * G)),  # no cgroup files: the machine's
    ({'a/b': {'memory.max': 'max\n', 'memory.current': f'{8 * G}\n'}}, (10 * G, 16 * G)),
    # the parent's limit binds (systemd/Slurm put it above the process's own cgroup), and its
    # reclaimable page cache counts as room
    ({'a': {'memory.max': f'{12 * G}\n', 'memory.current': f'{9 * G}\n',
            'memory.stat': f'anon 1\ninactive_file {G}\nactive_file 5\n'},
      'a/b': {'memory.max': 'max\n', 'memory.current': f'{8 * G}\n'}}, (4 * G, 12 * G)),
    ({'a': {'memory.max': f'{12 * G}\n', 'memory.current': f'{9 * G}\n'},
      'a/b': {'memory.max': f'{10 * G}\n', 'memory.current': f'{8 * G}\n'}}, (2 * G, 10 * G)),
])
def test_memory_available_takes_the_tightest_cgroup_limit(tmp_path, levels, want):
  assert heap.memory_available(*_cgroups(tmp_path, levels)) == want


def test_memory_available_without_meminfo_is_none(tmp_path):
  assert heap.memory_available(tmp_path / 'absent', tmp_path / 'none', tmp_path) is None


@pytest.mark.parametrize('total, want', [(24 * G, 3 * G), (8 * G, 2 * G), (4 * G, G),
                                         (256 * G, 32 * G)])
def test_reserve_is_an_eighth_at_least_2_gib_at_most_a_quarter(total, want):
  assert heap.reserve_bytes(total) == want


@glibc
def test_watcher_backs_off_when_releases_free_little(monkeypatch):
  calls = []
  monkeypatch.setattr(heap, 'release', lambda: calls.append(1) or 0)
  w = heap.Watcher(interval=0.005, available=lambda: (0, 64 * G))
  w.start()
  time.sleep(0.5)  # ~100 looks: one release, then BACKOFF looks skipped, and so on
  w.stop()
  assert 2 <= len(calls) <= 100 // heap.Watcher.BACKOFF + 2


@glibc
def test_watcher_stops_quietly_on_an_error():
  def broken():
    raise RuntimeError('no meminfo today')
  w = heap.Watcher(interval=0.005, available=broken)
  w.start()
  w.join(timeout=5)
  assert not w.is_alive()


def test_watcher_warns_once_at_the_first_big_release(monkeypatch):
  freed = iter([1 << 20, 1 << 29, 2 << 30, 2 << 30] + [0] * 1000)  # small, big, bigger, ...
  logs = []
  monkeypatch.setattr(heap, 'release', lambda: next(freed))
  monkeypatch.setattr(heap.Watcher, 'BACKOFF', 0)
  monkeypatch.setattr(heap.logging, 'warning', lambda *a: logs.append('warning'))
  monkeypatch.setattr(heap.logging, 'info', lambda *a: logs.append('info'))
  w = heap.Watcher(interval=0.005, available=lambda: (0, 64 * G))
  w.start()
  time.sleep(0.3)
  w.stop()
  assert logs == ['warning', 'info', 'info']

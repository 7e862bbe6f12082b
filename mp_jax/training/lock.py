"""The workdir lock: `<workdir>/.lock` (pid, host, start time) held by a run; stale ones taken over.

The holder renews the lock's mtime every LEASE_RENEW_S; one not renewed for LEASE_S is stale from
any host (a preempted job rescheduled elsewhere takes it over), as is one whose pid is gone on
this host. Hosts' clocks must agree to well within LEASE_S - LEASE_RENEW_S.
"""

import contextlib
import errno
import json
import os
import pathlib
import socket
import tempfile
import threading
import time

from absl import logging

LOCK = '.lock'
LEASE_RENEW_S = 30
LEASE_S = 600


class Locked(ValueError):
  """Another run holds the workdir."""


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  try:  # a killed child its parent has not reaped yet is dead too
    return pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
  except (OSError, IndexError):
    return True


class Lock:
  """`<workdir>/.lock` (pid, host, start time) for the duration of a run; stale ones recovered.

  Stale: its pid is gone on this host, or its lease (mtime, renewed by the holder) has lapsed.
  """

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir) / LOCK
    self.me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': time.time()}
    self._stop = threading.Event()

  def acquire(self):
    for _ in range(3):
      try:
        self._create(json.dumps(self.me))
        break
      except FileExistsError:
        self._recover_or_raise()
    else:
      raise Locked(f'{self.path}: could not take the workdir lock')
    # A thread, so the lease is renewed through long compiles and evaluations too.
    self._stop.clear()
    threading.Thread(target=self._renew, name='mp_jax-lock-lease', daemon=True).start()
    return self

  def _create(self, text):
    """Creates the lock file holding `text`; FileExistsError if there is one."""
    fd, tmp = tempfile.mkstemp(prefix='.lock.', dir=self.path.parent)
    try:
      with os.fdopen(fd, 'w') as f:
        f.write(text)
      try:  # link: atomic and exclusive, and the lock file is never seen half written
        os.link(tmp, self.path)
        return
      except FileExistsError:
        raise
      except OSError:  # a file system without hard links: exclusive create instead
        pass
    finally:
      os.unlink(tmp)
    with os.fdopen(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), 'w') as f:
      f.write(text)

  def _renew(self):
    while not self._stop.wait(LEASE_RENEW_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def _recover_or_raise(self):
    try:
      text = self.path.read_text()
      age = time.time() - self.path.stat().st_mtime
    except FileNotFoundError:
      return  # released meanwhile: try again
    lapsed = age > LEASE_S
    try:
      held = json.loads(text)
      pid, host = int(held['pid']), str(held['host'])
      when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(held.get('started', 0))))
    except (ValueError, KeyError, TypeError, AttributeError):
      if not lapsed:
        raise Locked(f'{self.path} exists but is unreadable; if no run is using this workdir, '
                     'delete it') from None
      logging.warning('%s: unreadable lock, not renewed for %.0f s; taken over', self.path, age)
      self._remove_if(text)
      return
    if host == self.me['host'] and not _alive(pid):
      why = 'no longer running'
    elif lapsed:
      why = f'lease not renewed for {age:.0f} s'
    else:
      raise Locked(f'workdir {self.path.parent} is in use by pid {pid} on host {host} (since '
                   f'{when}; {self.path}). Wait for it to finish; if that process is gone, its '
                   f'lock is taken over {LEASE_S} s after its last renewal (or delete '
                   f'{self.path}).')
    logging.warning('%s: stale lock of pid %d on %s (started %s, %s); taken over', self.path, pid,
                    host, when, why)
    self._remove_if(text)

  def _remove_if(self, text):
    """Removes the lock if it still holds `text` (not a lock another run took over meanwhile)."""
    with contextlib.suppress(FileNotFoundError):
      if self.path.read_text() == text:
        os.unlink(self.path)

  def release(self):
    self._stop.set()
    try:
      if json.loads(self.path.read_text()).get('pid') == self.me['pid']:
        os.unlink(self.path)
    except (OSError, ValueError) as e:
      if getattr(e, 'errno', None) != errno.ENOENT:
        logging.warning('could not release %s: %s', self.path, e)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

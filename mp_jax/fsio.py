"""Durable writes of the project's files: unique temp file beside the target, fsync, os.replace.

A reader sees the old file or the new one, never a part; a crash leaves at most a stray
`.<name>.*.tmp` beside it. Readers of our own JSON name the file in their errors.
"""

import contextlib
import json
import os
import pathlib
import tempfile

CACHE_ENV = 'MP_JAX_CACHE'


class UnreadableFile(ValueError):
  """One of our own files that exists but cannot be parsed (the message names it)."""


def cache_dir() -> pathlib.Path:
  """The project's cache root: `$MP_JAX_CACHE` or `~/.cache/mp_jax` (created on demand)."""
  root = os.environ.get(CACHE_ENV) or os.path.join(pathlib.Path.home(), '.cache', 'mp_jax')
  path = pathlib.Path(root).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  return path


def write_bytes(path, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` atomically and durably; returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary output files
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  _fsync_dir(path.parent)
  return path


def write_text(path, text: str) -> pathlib.Path:
  return write_bytes(path, text.encode('utf-8'))


def write_json(path, obj, **kw) -> pathlib.Path:
  return write_text(path, json.dumps(obj, **kw))


def read_json(path):
  """Parsed JSON of `path`; UnreadableFile naming the file if it is not valid JSON."""
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text(encoding='utf-8'))
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
    raise UnreadableFile(f'{path}: not valid JSON ({e})') from None


def _fsync_dir(directory: pathlib.Path) -> None:
  """Makes the rename itself durable (POSIX); a no-op where directories cannot be opened."""
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)

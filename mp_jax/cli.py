"""Entry-point plumbing: default workdir, the compile cache, our logs only, user errors in one line.

Layer 7 (the top): the entry points (train.py, eval.py, bench.py, experiments/) call it; nothing
in mp_jax imports it.
"""

import logging as py_logging
import os
import pathlib
import platform
import re
import sys
import zlib

from absl import app, flags, logging
from ml_collections import config_flags

from mp_jax import heap
from mp_jax.data import fetch, registry, sources
from mp_jax.model import hf

# Not KeyError: a missing key inside the code is a bug and keeps its traceback.
USER_ERRORS = (sources.DataError, hf.CheckpointError, registry.FetchError, FileNotFoundError,
               ValueError, FloatingPointError)
PACKAGE = pathlib.Path(__file__).resolve().parent  # mp_jax/


RUNS = 'runs'


def default_workdir(config_arg):
  """`runs/<config stem>[_<variant items>]` for a raw --config value (`configs/x.py:a,b`)."""
  # --config.key=value overrides do not count: the name stays what the user typed as --config.
  path, _, variant = str(config_arg).partition(':')  # as ml_collections splits it
  items = [i.strip() for i in variant.split(',') if i.strip()]
  name = '_'.join([pathlib.Path(path).stem or 'config', *items])
  name = re.sub(r'[^\w.=+,-]', '-', name)  # '/', ':', spaces ... -> one safe path component
  if len(name) > 120:  # file systems cap a component at 255 bytes; keep two long ones apart
    name = f'{name[:110]}-{zlib.crc32(name.encode()):08x}'
  return str(pathlib.Path(RUNS) / name)


def workdir(flag_value):
  """--workdir if given, else the default for the raw --config value; printed at start."""
  out = flag_value or default_workdir(config_flags.get_config_filename(flags.FLAGS['config']))
  print(f'workdir: {out}', file=sys.stderr, flush=True)
  return out


class _Quiet(py_logging.Filter):
  """Drops INFO chatter of libraries (orbax logs every save step by step): ours is mp_jax's and
  the running script's."""

  def __init__(self):
    super().__init__()
    self.script = pathlib.Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None

  def filter(self, record):
    if record.levelno >= py_logging.WARNING:
      return True
    where = pathlib.Path(record.pathname).resolve()
    return where.is_relative_to(PACKAGE) or where == self.script


def compile_cache():
  """JAX's persistent compilation cache, set once per process at entry (nothing else sets it).

  `$JAX_COMPILATION_CACHE_DIR` (JAX reads it itself) wins; else `<MP_JAX_CACHE>/xla`, so the
  warm-up of the compiled engine is paid once per machine (docs/RESULTS.md: 167 CPU s for
  bert-base on CPU) instead of at every train.py, eval.py or bench.py start. It is exported to the
  environment, so worker processes (bench.py --workers) use it too. Programs that compile in
  under JAX's `persistent_cache_min_compile_time_secs` (1 s) are not worth a file and stay out.
  A cache folder that cannot be created is a warning, not an error: the cache only saves time.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not jax.config.jax_compilation_cache_dir:
    try:
      path = fetch.cache_dir() / 'xla'
      path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      logging.warning('no persistent compilation cache (%s); programs compile at every start', e)
      return None
    jax.config.update('jax_compilation_cache_dir', str(path))
  os.environ['JAX_COMPILATION_CACHE_DIR'] = jax.config.jax_compilation_cache_dir
  return jax.config.jax_compilation_cache_dir


# glibc's allocator hands every free block above 32 MB back to the kernel, and XLA:CPU frees a
# step's buffers when it ends, so each step faulted them back in (~1M faults a bbc training
# step, docs/RESULTS.md "Training step vs PyTorch"). These keep freed memory in the process: no
# mmap'd blocks, no trimming, one arena (a thread's own arena trims on its own). The price is
# peak memory: a step's blocks do not always fit the holes the last one left, so the heap grows
# (bbc: 10-20.5 GiB against ~6 GiB with HUGEPAGE_TUNABLES; docs/RESULTS.md sessions 13-25),
# so the trainer hands the free heap back after each stage and heap.watch() whenever the machine
# runs short of memory.
_NO_TRIM_ONE_ARENA = ('glibc.malloc.trim_threshold=1099511627776', 'glibc.malloc.arena_max=1')
MALLOC_TUNABLES = ('glibc.malloc.mmap_max=0', *_NO_TRIM_ONE_ARENA)
# Blocks of >= 32 MB (glibc's largest mmap threshold) go back to the kernel when freed and
# return as transparent huge pages (mostly 2 MB a fault); smaller ones stay in the heap as
# above. Peak memory near the step's working set; an `mr` training step on CPU takes ~10% longer.
HUGEPAGE_TUNABLES = ('glibc.malloc.hugetlb=1', 'glibc.malloc.mmap_threshold=33554432',
                     *_NO_TRIM_ONE_ARENA)
# '' (default): re-execute with MALLOC_TUNABLES; `hugepages`: with HUGEPAGE_TUNABLES; `system`:
# leave the allocator as it is; `tuned`: set by the re-execution itself, so that it happens once.
MALLOC_ENV = 'MP_JAX_MALLOC'
MALLOC_MODES = ('', 'system', 'hugepages', 'tuned')
THP_PATH = '/sys/kernel/mm/transparent_hugepage/enabled'


def transparent_hugepages(path=THP_PATH):
  """The kernel's THP mode (`always`, `madvise` or `never`), or '' where it cannot be read."""
  try:
    with open(path) as f:
      return f.read().split('[')[1].split(']')[0]
  except (OSError, IndexError):
    return ''


def _hugepages_refusal(system, thp, preload):
  """Why HUGEPAGE_TUNABLES would quietly leave glibc's defaults here, or None."""
  if system[:2] != ('Linux', 'glibc'):
    return 'needs glibc on Linux'
  if tuple(int(v) for v in system[2].split('.')[:2] if v.isdigit()) < (2, 35):
    return f'needs glibc >= 2.35 (here {system[2] or "unknown"})'  # older: an unknown tunable
  if thp not in ('always', 'madvise'):
    return f'needs transparent huge pages ({THP_PATH}: {thp or "unreadable"})'
  if preload:
    return f'does nothing with LD_PRELOAD={preload}'
  return None


def malloc_env(environ, system=None, thp=None):
  """The environment to re-execute in with the mode's tunables, or None to keep this process.

  None off glibc Linux, for `system` and `tuned`, and by default also when GLIBC_TUNABLES
  already sets any glibc.malloc key or a MALLOC_* variable is set (the user's choice), or when
  LD_PRELOAD brings another allocator (tcmalloc, jemalloc, mimalloc). `system`: (OS, libc,
  libc version); `thp`: transparent_hugepages().
  """
  mode = environ.get(MALLOC_ENV, '')
  if mode not in MALLOC_MODES:
    raise ValueError(f'environment variable {MALLOC_ENV}={mode!r}: expected unset, '
                     '`hugepages` or `system`')
  if mode in ('system', 'tuned'):
    return None
  system = system or (platform.system(), *platform.libc_ver())
  preload = environ.get('LD_PRELOAD', '')
  other = preload if any(a in preload for a in ('tcmalloc', 'jemalloc', 'mimalloc')) else ''
  if mode == 'hugepages':
    # Doing nothing would leave glibc's defaults (a bbc step twice as slow): say why instead.
    why = _hugepages_refusal(system, transparent_hugepages() if thp is None else thp, other)
    if why:
      raise ValueError(f'{MALLOC_ENV}=hugepages {why}; unset {MALLOC_ENV} for the default '
                       f'tunables, or {MALLOC_ENV}=system')
    tunables = HUGEPAGE_TUNABLES
  elif (system[:2] != ('Linux', 'glibc') or other
        or 'glibc.malloc.' in environ.get('GLIBC_TUNABLES', '')
        or any(k.startswith('MALLOC_') for k in environ)):
    return None
  else:
    tunables = MALLOC_TUNABLES
  # The user's own tunables last: glibc keeps the last value of a key, so theirs win.
  value = ':'.join(filter(None, [*tunables, environ.get('GLIBC_TUNABLES', '')]))
  return dict(environ, GLIBC_TUNABLES=value, **{MALLOC_ENV: 'tuned'})


def retain_freed_memory(main):
  """Re-executes this entry point once with the mode's tunables (the loader reads them at start).

  Only when `main` belongs to the script Python was started with, and the command line can be
  replayed (not a script read from stdin, not under a debugger or tracer).
  """
  env = malloc_env(os.environ)
  if (env is None or not (sys.executable and sys.orig_argv)
      or getattr(main, '__module__', None) != '__main__' or sys.argv[0] in ('', '-')
      or sys.gettrace() is not None):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, sys.orig_argv, env)
  except OSError as e:  # only speed is at stake: go on as we are
    logging.warning('could not re-execute with %s (%s): glibc keeps its defaults',
                    env['GLIBC_TUNABLES'], e)


def run(main):
  """absl app.run, printing `error: ...` and exiting 2 on bad input or config; first re-executes
  with the allocator tunables (retain_freed_memory), then watches memory (heap.watch)."""
  try:
    retain_freed_memory(main)
  except ValueError as e:  # a bad MP_JAX_MALLOC
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)

  def wrapped(argv):
    for handler in py_logging.getLogger().handlers + py_logging.getLogger('absl').handlers:
      handler.addFilter(_Quiet())
    compile_cache()
    heap.watch()  # under memory pressure, the tunables' kept heap goes back to the kernel
    try:
      return main(argv)
    except USER_ERRORS as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)

  app.run(wrapped)

"""Entry points as users type them: default workdir, data found by path, offline weights."""

import json
import os
import subprocess
import sys
import time

import pytest

from mp_jax import cli, heap
from tests import test_data
from tests.test_train import ROOT, _cli


@pytest.mark.parametrize('config, want', [
    ('configs/qqp.py', 'runs/qqp'),
    ('configs/qqp.py:smoke', 'runs/qqp_smoke'),
    ('configs/qqp.py:method=ltp,smoke', 'runs/qqp_method=ltp_smoke'),
    ('/abs/path/configs/ag_news.py: smoke , method=bert', 'runs/ag_news_smoke_method=bert'),
    ('configs/qqp.py:model.init=/ckpt/bert base', 'runs/qqp_model.init=-ckpt-bert-base'),
    ('configs/qqp.py:', 'runs/qqp'),
])
def test_default_workdir(config, want):
  assert cli.default_workdir(config) == want


def test_default_workdir_long_variants_stay_one_short_distinct_component():
  a = cli.default_workdir('configs/qqp.py:' + ','.join(f'train.lr={i}e-5' for i in range(30)))
  b = cli.default_workdir('configs/qqp.py:' + ','.join(f'train.lr={i}e-5' for i in range(31)))
  assert a != b and a.startswith('runs/qqp_train.lr=0e-5_') and '/' not in a[len('runs/'):]
  assert len(a) <= len('runs/') + 120


_CACHE_PROBE = (
    'import jax, jax.numpy as jnp\n'
    'from mp_jax import cli\n'
    'import os\n'
    'print(cli.compile_cache(), os.environ.get("JAX_COMPILATION_CACHE_DIR"))\n'
    'jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)).block_until_ready()\n')


@pytest.mark.parametrize('where', ['default', 'jax_variable', 'unwritable'])
def test_compile_cache_is_set_once_at_entry(tmp_path, where):
  """Entry points cache compiled programs in <MP_JAX_CACHE>/xla unless JAX's variable says where;
  a cache folder that cannot be made is a warning, and the program still runs."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  env.update(MP_JAX_CACHE=str(tmp_path / 'home'), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  want = tmp_path / 'home' / 'xla'
  if where == 'jax_variable':
    want = tmp_path / 'mine'
    env['JAX_COMPILATION_CACHE_DIR'] = str(want)
  elif where == 'unwritable':
    (tmp_path / 'home').write_text('a file, not a folder')
  out = subprocess.run([sys.executable, '-c', _CACHE_PROBE], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  if where == 'unwritable':
    assert out.stdout.split() == ['None', 'None']
    assert 'no persistent compilation cache' in out.stderr
    return
  assert out.stdout.split() == [str(want), str(want)]
  assert want.is_dir() and any(want.iterdir())  # the program went to disk


def _train_then_eval(tmp_path, config):
  """train.py and eval.py from a user's folder, no --workdir: both name the same default one."""
  train = _cli('train.py', f'--config={ROOT}/{config}', cwd=tmp_path)
  assert train.returncode == 0, train.stderr[-3000:]
  name = cli.default_workdir(config)
  assert f'workdir: {name}' in train.stderr and name.startswith('runs/')
  assert (tmp_path / name / 'final' / 'model.safetensors').is_file()
  ev = _cli('eval.py', f'--config={ROOT}/{config}', '--timing=false', cwd=tmp_path)
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert f'workdir: {name}' in ev.stderr
  return train, ev, json.loads((tmp_path / name / 'eval' / 'report.json').read_text())


def test_qqp_smoke_from_a_glue_folder_with_empty_questions(tmp_path):
  _, empty = test_data.write_qqp_folder(tmp_path / 'data' / 'glue' / 'QQP')
  train, ev, rep = _train_then_eval(tmp_path, 'configs/qqp.py:smoke')
  assert 'kept 10 row(s) with an empty question1 or question2' in train.stderr
  assert 'lines 5, 15, 25, 35, 45, ...' in train.stderr and empty['train.tsv'][0] == 5
  assert 'from folder data/glue/QQP' in train.stderr
  assert 0 <= rep['f1'] <= 1 and '| f1 |' in ev.stdout
  assert rep['num_examples'] == 32  # dev.tsv, empty questions included


def test_ag_news_smoke_from_csvs_with_a_header_row(tmp_path):
  test_data.write_ag_news_folder(tmp_path / 'data' / 'ag_news_csv')
  # bert: one stage is enough to read the data (qqp's test above runs every mp stage)
  train, _, rep = _train_then_eval(tmp_path, 'configs/ag_news.py:smoke,method=bert')
  assert 'train.csv:1: skipped header row' in train.stderr
  assert rep['num_examples'] == 32 and 0 <= rep['accuracy'] <= 1


def test_offline_hub_weights_fail_fast_naming_model_init(tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # hermetic: never a 440 MB download from a test
  start = time.monotonic()
  out = _cli('train.py', f'--config={ROOT}/configs/qqp.py', cwd=tmp_path, timeout=120)
  took = time.monotonic() - start
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert "config.model.init='bert-base-uncased'" in out.stderr
  assert '--config.model.init=/path/to/bert-base-uncased' in out.stderr
  assert 'workdir: runs/qqp' in out.stderr
  assert took < 60, took


GLIBC = ('Linux', 'glibc', '2.36')
TUNED = {'GLIBC_TUNABLES': ':'.join(cli.MALLOC_TUNABLES), 'MP_JAX_MALLOC': 'tuned'}
HUGE = {'GLIBC_TUNABLES': ':'.join(cli.HUGEPAGE_TUNABLES), 'MP_JAX_MALLOC': 'tuned'}


@pytest.mark.parametrize('env, want', [
    ({}, TUNED),
    ({'GLIBC_TUNABLES': 'glibc.rtld.nns=2'},
     dict(TUNED, GLIBC_TUNABLES=':'.join(cli.MALLOC_TUNABLES) + ':glibc.rtld.nns=2')),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'}, None),  # the user's own choice
    ({'MALLOC_ARENA_MAX': '2'}, None),  # the same through glibc's older variables
    ({'MP_JAX_MALLOC': 'system'}, None),
    ({'MP_JAX_MALLOC': 'tuned'}, None),  # already re-executed: once only
    ({'LD_PRELOAD': '/usr/lib/libtcmalloc_minimal.so.4'}, None),
    ({'MP_JAX_MALLOC': 'hugepages'}, HUGE),
    ({'MP_JAX_MALLOC': 'hugepages', 'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'},  # theirs last
     dict(HUGE, GLIBC_TUNABLES=':'.join(cli.HUGEPAGE_TUNABLES) + ':glibc.malloc.arena_max=4')),
])
def test_malloc_env(env, want):
  out = cli.malloc_env(dict(env, PATH='/bin'), GLIBC, thp='madvise')
  assert out == (want if want is None else dict(env, PATH='/bin', **want))
  assert cli.malloc_env({}, ('Darwin', '', '')) is None


def test_malloc_env_refuses_an_unknown_mode():
  with pytest.raises(ValueError, match='MP_JAX_MALLOC=.off.'):
    cli.malloc_env({'MP_JAX_MALLOC': 'off'}, GLIBC)


@pytest.mark.parametrize('system, thp, env, bad', [
    (GLIBC, 'never', {}, 'transparent huge pages .*never'),
    (GLIBC, '', {}, 'unreadable'),
    (('Linux', 'glibc', '2.31'), 'always', {}, r'glibc >= 2.35 \(here 2.31\)'),  # unknown there
    (('Linux', 'glibc', ''), 'always', {}, 'here unknown'),
    (('Darwin', '', ''), 'always', {}, 'needs glibc on Linux'),
    (GLIBC, 'madvise', {'LD_PRELOAD': '/lib/libjemalloc.so.2'}, 'LD_PRELOAD=/lib/libjemalloc'),
])
def test_hugepages_refuses_where_it_would_do_nothing(system, thp, env, bad):
  with pytest.raises(ValueError, match=f'MP_JAX_MALLOC=hugepages .*{bad}.*unset MP_JAX_MALLOC'):
    cli.malloc_env(dict(env, MP_JAX_MALLOC='hugepages'), system, thp=thp)


def test_hugepages_takes_glibc_2_35_and_always():
  out = cli.malloc_env({'MP_JAX_MALLOC': 'hugepages'}, ('Linux', 'glibc', '2.35'), thp='always')
  assert out['GLIBC_TUNABLES'] == ':'.join(cli.HUGEPAGE_TUNABLES)


def test_transparent_hugepages_reads_the_bracketed_mode(tmp_path):
  (tmp_path / 'enabled').write_text('always [madvise] never\n')
  assert cli.transparent_hugepages(tmp_path / 'enabled') == 'madvise'
  assert cli.transparent_hugepages(tmp_path / 'missing') == ''


def _main():
  """Stands for an entry point's main."""


@pytest.mark.parametrize('module, argv0, calls', [
    ('__main__', 'train.py', 1),
    ('tests.test_cli', 'train.py', 0),  # an in-process caller (a test, a notebook): never
    ('__main__', '-', 0),  # a script read from stdin cannot be read again
])
def test_retain_freed_memory_reexecutes_only_a_replayable_entry_point(monkeypatch, module, argv0,
                                                                     calls):
  execs = []
  monkeypatch.setattr(cli.os, 'execve', lambda *a: execs.append(a))
  monkeypatch.setattr(cli, 'malloc_env', lambda environ: dict(environ, **TUNED))
  monkeypatch.setattr(sys, 'argv', [argv0])
  monkeypatch.setattr(sys, 'gettrace', lambda: None)
  monkeypatch.setattr(_main, '__module__', module)
  cli.retain_freed_memory(_main)
  assert len(execs) == calls
  if calls:
    path, argv, env = execs[0]
    assert (path, argv) == (sys.executable, sys.orig_argv)
    assert env['MP_JAX_MALLOC'] == 'tuned' and env['GLIBC_TUNABLES'] == TUNED['GLIBC_TUNABLES']


_WATCH_PROBE = (
    'import threading\n'
    'from mp_jax import cli\n'
    'def main(argv):\n'
    '  print(sum(t.name == "mp_jax-heap-watch" and t.is_alive() for t in threading.enumerate()))\n'
    'cli.run(main)\n')


@pytest.mark.skipif(heap._malloc_trim() is None, reason='glibc only')
def test_entry_points_watch_the_heap():
  run = subprocess.run([sys.executable, '-c', _WATCH_PROBE], cwd=ROOT, check=True, text=True,
                       capture_output=True, env=dict(os.environ, MP_JAX_MALLOC='system'),
                       timeout=120)
  assert run.stdout.split() == ['1']


# Frees 256 MB and takes it again: faults on the second touch are pages given back to the kernel.
_FAULT_PROBE = (
    'import ctypes, os, resource\n'
    'from mp_jax import cli\n'
    'def main(): pass\n'
    'cli.retain_freed_memory(main)\n'
    'libc, n = ctypes.CDLL(None), 256 << 20\n'
    'libc.malloc.restype = ctypes.c_void_p\n'
    'def cycle():\n'
    '  p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(ctypes.c_void_p(p))\n'
    'cycle()\n'
    'f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n'
    'cycle()\n'
    'f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f\n'
    'rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")\n'
    'print(os.environ.get("MP_JAX_MALLOC", ""), f, rss >> 20)\n')


def _hugepages_here():
  try:
    return cli.malloc_env({'MP_JAX_MALLOC': 'hugepages'}) is not None
  except ValueError:
    return False


@pytest.mark.skipif(cli.malloc_env({}) is None or cli.transparent_hugepages() == 'always',
                    reason='glibc Linux with 4 KB pages for malloc only')
def test_entry_points_keep_freed_memory_in_the_process():
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')
         and not k.startswith('MALLOC_')}
  huge = _hugepages_here()
  out = {}
  for mode in ('', 'system') + (('hugepages',) if huge else ()):
    run = subprocess.run([sys.executable, '-c', _FAULT_PROBE], cwd=ROOT, check=True, text=True,
                         capture_output=True, env=dict(env, MP_JAX_MALLOC=mode), timeout=120)
    out[mode] = run.stdout.split()
  assert out['system'][0] == 'system' and int(out['system'][1]) > 30_000  # 65536 pages of 4 KB
  # The default keeps the 256 MB (resident MB beyond glibc's defaults); hugepages gives it back
  # and faults it in 2 MB pages.
  def extra(mode):
    return int(out[mode][2]) - int(out['system'][2])
  assert out[''][0] == 'tuned' and int(out[''][1]) < 1_000 and extra('') > 200, out
  if huge:  # huge pages where the kernel has them free: well below the 65536 small-page faults
    assert out['hugepages'][0] == 'tuned' and int(out['hugepages'][1]) < 30_000, out
    assert extra('hugepages') < 128, out

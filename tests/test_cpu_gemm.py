"""MKL's GEMM as an XLA:CPU custom call: equal to the reference, differentiable, CPU-only."""

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

from mp_jax.model import cpu_gemm, matmul

MKL_HERE = sys.platform == 'linux' and platform.machine() == 'x86_64'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [
    pytest.mark.skipif(not MKL_HERE, reason='the mkl wheel is x86-64 Linux only'),
    pytest.mark.skipif(cpu_gemm.mode() == 'xla', reason='MP_JAX_CPU_GEMM=xla asks for none'),
    pytest.mark.skipif(jax.default_backend() != 'cpu', reason='a CPU custom call')]


@pytest.fixture(autouse=True)
def _mkl_traced():
  # MKL's path on any CPU: `auto` picks XLA's dot off Intel (test_auto_picks_mkl_on_intel_only).
  with cpu_gemm.enabled(True):
    yield


def _dense(x, w):
  return matmul.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def test_available_where_requirements_install_mkl():
  # CI installs requirements.txt: if this fails, every other test here would pass on XLA's dot.
  assert cpu_gemm.available()
  x, w = jnp.ones((4, 3)), jnp.ones((3, 2))
  assert 'mp_cpu_gemm' in jax.jit(_dense).lower(x, w).as_text()


# (m, k, n): one thread (few MACs), column blocks (few rows), row blocks, odd sizes.
SHAPES = [(1, 384, 1536), (3, 7, 5), (26, 384, 1536), (32, 1536, 384), (517, 129, 263),
          (1024, 384, 384), (100, 200, 100), (0, 3, 5), (4, 0, 5), (4, 3, 0)]


@pytest.mark.parametrize('m,k,n', SHAPES)
@pytest.mark.parametrize('trans_a', [False, True])
@pytest.mark.parametrize('trans_b', [False, True])
def test_gemm_equals_float64(m, k, n, trans_a, trans_b):
  rng = np.random.default_rng(m * n + k)
  a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
  a_in = (a.T if trans_a else a).astype(np.float32).copy()
  b_in = (b.T if trans_b else b).astype(np.float32).copy()
  got = jax.jit(cpu_gemm.gemm, static_argnums=(2, 3))(a_in, b_in, trans_a, trans_b)
  assert got.shape == (m, n)
  want = a_in.astype(np.float64).T if trans_a else a_in.astype(np.float64)
  want = want @ (b_in.astype(np.float64).T if trans_b else b_in.astype(np.float64))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.sqrt(max(k, 1)))


def test_dense_layer_and_gradients_equal_xla():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((4, 33, 96)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((96, 200)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((4, 33, 200)), jnp.float32)

  def loss(x, w):
    return jnp.sum(_dense(x, w) * g)

  with cpu_gemm.enabled(False):
    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
    assert 'mp_cpu_gemm' not in jax.jit(jax.grad(loss)).lower(x, w).as_text()
  got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
  # forward, x^T g and g w^T: three custom calls, and nothing left to XLA's dot
  text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, w).as_text()
  assert text.count('@mp_cpu_gemm(') == 3 and 'dot_general' not in text
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-4)


# Each transform of f(x, w) = sum(tanh(x w / 10)^2), its number of GEMMs on MKL.
TRANSFORMS = {
    'jvp': (lambda f, x, w: jax.jvp(f, (x, w), (x, w)), 3),  # x w, dx w, x dw
    'jacfwd': (lambda f, x, w: jax.jacfwd(f, 1)(x[:1, :2], w), 2),
    'forward over reverse': (lambda f, x, w: jax.jvp(jax.grad(f, (0, 1)), (x, w), (x, w)), 9),
    'reverse over reverse': (lambda f, x, w: jax.grad(
        lambda x, w: jnp.sum(jax.grad(f, 1)(x, w) ** 2), (0, 1))(x, w), 6),
    # Ran on MKL before too (custom_vjp and ffi_call's sequential vmap): a regression guard.
    'vmap of grad': (lambda f, x, w: jax.vmap(jax.grad(f, 1), (0, None))(x, w), 2),
}


@pytest.mark.parametrize('name', TRANSFORMS)
def test_forward_mode_higher_order_and_vmap_equal_xla(name):
  """Forward mode, second order and vmap go through MKL (a bilinear primitive: its JVP and
  transposes are its own GEMMs) and equal XLA's dot; a custom_vjp allowed first-order reverse
  mode (and vmap) only."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 33, 96)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((96, 200)), jnp.float32)
  f = lambda x, w: jnp.sum(jnp.tanh(_dense(x, w) / 10) ** 2)
  transform, gemms = TRANSFORMS[name]
  run = jax.jit(functools.partial(transform, f))
  with cpu_gemm.enabled(False):
    want = run(x, w)
  text = run.lower(x, w).as_text()
  assert text.count('@mp_cpu_gemm(') == gemms and 'dot_general' not in text
  for a, b in zip(jax.tree.leaves(run(x, w)), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize('batched', ['a', 'b', 'both'])
@pytest.mark.parametrize('trans_a,trans_b', [(False, False), (True, True)])
def test_vmap_of_gemm_equals_float64(batched, trans_a, trans_b):
  """vmap over either operand (at axis 1) or both: one GEMM an entry, equal to float64."""
  rng = np.random.default_rng(2)
  a = rng.standard_normal((5, 3, 7) if trans_a else (5, 7, 3)).astype(np.float32)
  b = rng.standard_normal((5, 4, 3) if trans_b else (5, 3, 4)).astype(np.float32)
  a_in, b_in = (np.moveaxis(x, 0, 1) if batched in (k, 'both') else x[0]
                for x, k in ((a, 'a'), (b, 'b')))
  axes = (1 if batched in ('a', 'both') else None, 1 if batched in ('b', 'both') else None)
  got = jax.jit(jax.vmap(lambda x, y: cpu_gemm.gemm(x, y, trans_a, trans_b), axes))(a_in, b_in)
  op = lambda x, t: np.swapaxes(x, -1, -2) if t else x
  a64, b64 = (x.astype(np.float64) if batched in (k, 'both') else x[:1].astype(np.float64)
              for x, k in ((a, 'a'), (b, 'b')))
  want = op(a64, trans_a) @ op(b64, trans_b)
  assert got.shape == (5, 7, 4)
  np.testing.assert_allclose(np.asarray(got), np.broadcast_to(want, (5, 7, 4)), rtol=1e-5,
                             atol=1e-5)


def test_only_float32_reaches_mkl():
  x, w = jnp.ones((8, 16), jnp.bfloat16), jnp.ones((16, 4), jnp.bfloat16)
  assert 'mp_cpu_gemm' not in jax.jit(_dense).lower(x, w).as_text()
  assert 'mp_cpu_gemm' in jax.jit(_dense).lower(x.astype(jnp.float32),
                                                w.astype(jnp.float32)).as_text()


@pytest.mark.parametrize('target', ['tpu', 'cuda'])
def test_accelerator_programs_keep_xla_dot(target):
  x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
  fn = jax.jit(jax.grad(lambda x, w: jnp.sum(_dense(x, w) ** 2), argnums=(0, 1)))
  text = jax_export.export(fn, platforms=[target])(x, w).mlir_module()
  assert 'mp_cpu_gemm' not in text and 'dot_general' in text


def test_flag_is_in_the_trace_cache_key():
  x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
  fn = jax.jit(_dense)
  fn(x, w)  # traced and cached with the custom call
  with cpu_gemm.enabled(False):
    assert 'mp_cpu_gemm' not in fn.lower(x, w).as_text()
    fn(x, w)  # dispatched: a second executable, not the first one's
  assert 'mp_cpu_gemm' in fn.lower(x, w).as_text()
  assert fn._cache_size() == 2  # pylint: disable=protected-access


def test_concurrent_gemms_finish_and_agree():
  # Independent GEMMs XLA may run at once, each handing blocks to the same pool threads.
  rng = np.random.default_rng(1)
  xs = [jnp.asarray(rng.standard_normal((256, 128)), jnp.float32) for _ in range(8)]
  w = jnp.asarray(rng.standard_normal((128, 256)), jnp.float32)
  fn = jax.jit(lambda xs, w: [_dense(jnp.tanh(x), w) for x in xs])
  with cpu_gemm.enabled(False):
    want = jax.jit(lambda xs, w: [_dense(jnp.tanh(x), w) for x in xs])(xs, w)
  for _ in range(20):
    for a, b in zip(fn(xs, w), want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_mode_is_checked(monkeypatch):
  monkeypatch.setenv(cpu_gemm.ENV, 'MKL ')
  assert cpu_gemm.mode() == 'mkl'
  monkeypatch.setenv(cpu_gemm.ENV, 'blas')
  with pytest.raises(ValueError, match='MP_JAX_CPU_GEMM'):
    cpu_gemm.mode()


def _run(code, **env):
  # The caller's flag override is dropped: each test sets what it relies on.
  base = {k: v for k, v in os.environ.items() if k != 'MP_JAX_TRACE_CPU_GEMM'}
  env = {**base, 'PYTHONPATH': ROOT, **env}
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True,
                        text=True, env=env, cwd=ROOT, check=False)


def test_mkl_stays_out_of_the_global_symbol_scope():
  # mkl_rt opened its parts globally and PyTorch, imported after, ran its matmuls at half speed.
  proc = _run('''
      import ctypes
      from mp_jax.model import cpu_gemm
      assert cpu_gemm.available()
      try:
        ctypes.CDLL(None).cblas_sgemm
      except AttributeError:
        print('local')
      ''', MP_JAX_CPU_GEMM='mkl')
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == 'local'


def test_xla_mode_and_missing_mkl(tmp_path):
  proc = _run('''
      from mp_jax.model import cpu_gemm
      assert not cpu_gemm.available()
      ''', MP_JAX_CPU_GEMM='xla', MP_JAX_TRACE_CPU_GEMM='true')  # `xla` wins over the flag
  assert proc.returncode == 0, proc.stderr
  # No compiler: `auto` warns and falls back, `mkl` refuses, naming what is missing.
  code = '''
      from mp_jax.model import cpu_gemm
      print(cpu_gemm.available())
      '''
  # (MKL traced on any CPU: off Intel `auto` would not try to load it)
  proc = _run(code, CXX=str(tmp_path / 'no-such-g++'), MP_JAX_CACHE=str(tmp_path),
              MP_JAX_TRACE_CPU_GEMM='true')
  assert proc.returncode == 0 and proc.stdout.strip() == 'False', proc.stderr
  assert 'no-such-g++' in proc.stderr and 'MP_JAX_CPU_GEMM' in proc.stderr
  proc = _run(code, CXX=str(tmp_path / 'no-such-g++'), MP_JAX_CACHE=str(tmp_path),
              MP_JAX_CPU_GEMM='mkl')
  assert proc.returncode != 0 and 'MP_JAX_CPU_GEMM=mkl' in proc.stderr


def test_missing_mkl_names_the_wheel(monkeypatch):
  monkeypatch.setattr(importlib.metadata, 'files', lambda name: [])
  with pytest.raises(cpu_gemm.Unavailable, match='libmkl_core.*mkl wheel'):
    cpu_gemm._mkl_libs()  # pylint: disable=protected-access


def test_a_damaged_cached_library_is_rebuilt(tmp_path, monkeypatch):
  monkeypatch.setenv('MP_JAX_CACHE', str(tmp_path))
  libs = cpu_gemm._mkl_libs()  # pylint: disable=protected-access
  path = cpu_gemm._build(libs)  # pylint: disable=protected-access
  path.write_bytes(b'not a shared library')
  lib = cpu_gemm._open(libs)  # pylint: disable=protected-access
  assert lib.MpCpuGemm and path.read_bytes()[:4] == b'\x7fELF'
  assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_reports_say_which_gemm(monkeypatch):
  monkeypatch.setenv(cpu_gemm.ENV, 'auto')
  assert cpu_gemm.which() == 'MKL GEMMs'
  with cpu_gemm.enabled(False):
    monkeypatch.setattr(cpu_gemm, 'cpu_vendor', lambda: 'GenuineIntel')
    assert cpu_gemm.which() == 'XLA GEMMs: not enabled'
    monkeypatch.setattr(cpu_gemm, 'cpu_vendor', lambda: 'AuthenticAMD')
    assert cpu_gemm.which() == 'XLA GEMMs: MP_JAX_CPU_GEMM=auto on AuthenticAMD'


def test_cpu_vendor_read_from_cpuinfo(tmp_path):
  info = tmp_path / 'cpuinfo'
  info.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n')
  assert cpu_gemm.cpu_vendor(str(info)) == 'AuthenticAMD'
  info.write_text('processor\t: 0\nmodel name\t: some ARM core\n')
  assert cpu_gemm.cpu_vendor(str(info)) == ''
  assert cpu_gemm.cpu_vendor(str(tmp_path / 'missing')) == ''


@pytest.mark.parametrize('env', ['auto', 'mkl', 'xla'])
def test_auto_picks_mkl_on_intel_only(env):
  """`auto` traces MKL's GEMM on Intel CPUs only (on an AMD EPYC it was slower than XLA's dot,
  docs/RESULTS.md session 38); `mkl` on any vendor, `xla` on none: in a fresh process, the
  default and what a program holds follow this machine's vendor."""
  table = {'auto': (True, False, False), 'mkl': (True, True, True), 'xla': (False, False, False)}
  for vendor, want in zip(('GenuineIntel', 'AuthenticAMD', ''), table[env], strict=True):
    assert cpu_gemm.picks_mkl(env, vendor) is want, vendor
  proc = _run('''
      import jax, jax.numpy as jnp
      from mp_jax.model import cpu_gemm, matmul
      dense = lambda x, w: matmul.dot_general(x, w, (((1,), (0,)), ((), ())))
      text = jax.jit(dense).lower(jnp.ones((4, 3)), jnp.ones((3, 2))).as_text()
      built = cpu_gemm._load.cache_info().currsize  # pylint: disable=protected-access
      print(cpu_gemm.enabled.value, 'mp_cpu_gemm' in text, built > 0, cpu_gemm.which())
      ''', MP_JAX_CPU_GEMM=env)
  assert proc.returncode == 0, proc.stderr
  vendor = cpu_gemm.cpu_vendor()
  want = cpu_gemm.picks_mkl(env, vendor)
  enabled, traced, built, which = proc.stdout.split(maxsplit=3)
  # Off Intel, `auto` does not even build the library.
  assert (enabled, traced, built) == (str(want),) * 3, proc.stdout
  if want:
    assert which.strip() == 'MKL GEMMs'
  else:
    on = vendor or 'a CPU of unknown vendor'
    assert which.strip() == f'XLA GEMMs: MP_JAX_CPU_GEMM={env} on {on}'

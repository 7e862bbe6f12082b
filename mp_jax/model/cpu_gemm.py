"""float32 GEMMs on XLA:CPU through MKL's sgemm, as an FFI custom call (cpu_gemm.cc).

Why: on the Xeon this project measures on, XLA:CPU's own fp32 GEMMs ran at 0.81-0.86 of MKL's
at the layer's shapes and no XLA flag moved them (docs/RESULTS.md, sessions 33 and 35); they are
most of a layer's time. The custom call runs MKL's sequential sgemm on blocks of C[M, N] spread
over XLA's own intra-op threads. It is lowered only for CPU (`lax.platform_dependent`): GPU and
TPU programs keep XLA's dot, and their gradients autodiff's. On CPU the call is a primitive
bilinear in its two operands: its JVP and both transposes are GEMMs of the same primitive, so
grad, jvp/jacfwd, vmap and their compositions (second order too) run on MKL.

Which GEMM a CPU program gets, from `$MP_JAX_CPU_GEMM` (read when this module is imported, for
`enabled`'s default, and when MKL is first loaded):
- `auto` (default): MKL's on an Intel CPU when the `mkl` wheel (requirements.txt, x86-64 Linux)
  and a C++ compiler are here, else XLA's dot (one warning names what is missing). On an AMD
  EPYC, MKL's GEMM ran the dense model 0.85-0.91x (`mr`) and 0.90-0.96x (`bbc`) as fast as XLA's
  dot, and training no faster (docs/RESULTS.md, session 38), so off Intel `auto` is XLA's;
- `mkl`: MKL's on any x86-64 CPU, or an error naming what is missing;
- `xla`: XLA's dot.
The handler is compiled once per machine into `$MP_JAX_CACHE/native` (~2 s with g++).
`enabled` (default: what the mode picks for this CPU) is in JAX's trace context and jit key:
`with cpu_gemm.enabled(False):` traces XLA's dot, which jax.export needs (serving/export.py) so
that an exported file loads with jax alone; `enabled(True)` asks for MKL's where it loads.
"""

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.extend
import jax.numpy as jnp
import jaxlib
from jax import lax
from jax._src import config as jax_config  # private, pinned: a flag JAX keys trace caches on
from jax.interpreters import ad, batching, mlir

from mp_jax import fsio

ENV = 'MP_JAX_CPU_GEMM'
MODES = ('auto', 'mkl', 'xla')
_TARGET = 'mp_cpu_gemm'
_SOURCE = pathlib.Path(__file__).with_name('cpu_gemm.cc')
# Sequential MKL: the handler spreads blocks over XLA's threads; MKL's own would fight them.
_MKL_LIBS = ('libmkl_intel_lp64', 'libmkl_sequential', 'libmkl_core')


class Unavailable(RuntimeError):
  """MKL's GEMM was asked for ($MP_JAX_CPU_GEMM=mkl) but cannot be loaded here."""


def mode() -> str:
  """`$MP_JAX_CPU_GEMM`, checked."""
  value = os.environ.get(ENV, 'auto').strip().lower() or 'auto'
  if value not in MODES:
    raise ValueError(f'${ENV}={value!r}: expected one of {", ".join(MODES)}')
  return value


def cpu_vendor(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The CPU's `vendor_id` (GenuineIntel, AuthenticAMD, ...), or '' where it cannot be read."""
  try:
    with open(cpuinfo, encoding='utf-8', errors='replace') as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'vendor_id':
          return value.strip()
  except OSError:
    pass
  return ''


def picks_mkl(mode_: str, vendor: str) -> bool:
  """Whether CPU programs trace MKL's GEMM by default: `mkl`, or `auto` on an Intel CPU."""
  return mode_ == 'mkl' or (mode_ == 'auto' and vendor == 'GenuineIntel')


# In JAX's trace context and jit key, as JAX's own flags that change what is traced: a jitted
# function traced or dispatched under one value is never reused under the other (a compiled
# executable held by the caller is the caller's). JAX also reads it from $MP_JAX_TRACE_CPU_GEMM.
enabled = jax_config.bool_state(
    'mp_jax_trace_cpu_gemm',
    picks_mkl(mode(), cpu_vendor()),  # a bad $MP_JAX_CPU_GEMM fails here, at import
    include_in_trace_context=True,
    include_in_jit_key=True,
    help='float32 GEMMs of CPU programs through MKL (mp_jax/model/cpu_gemm.py)')


def _mkl_libs() -> list[pathlib.Path]:
  """The `mkl` wheel's LP64 interface, sequential threading and core libraries."""
  try:
    files = importlib.metadata.files('mkl') or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  found = {f.name.split('.so')[0]: pathlib.Path(f.locate()).resolve() for f in files
           if '.so' in f.name}
  missing = [n for n in _MKL_LIBS if n not in found]
  if missing:
    raise Unavailable(f'no MKL ({", ".join(missing)}): `pip install -r requirements.txt` '
                      'installs the mkl wheel on x86-64 Linux')
  return [found[n] for n in _MKL_LIBS]


def _compiler() -> list[str]:
  """$CXX (words, e.g. `ccache g++`) or g++ or c++, checked to exist."""
  cxx = shlex.split(os.environ.get('CXX', '')) or [shutil.which('g++') or shutil.which('c++') or
                                                   'g++']
  if not shutil.which(cxx[0]):
    raise Unavailable(f'no C++ compiler ({cxx[0]}; set $CXX) to build {_SOURCE}')
  return cxx


def _build(libs: list[pathlib.Path], rebuild: bool = False) -> pathlib.Path:
  """cpu_gemm.cc built against jaxlib's FFI headers and MKL, once per source, command and compiler.

  Compiled in a temp folder, then written with fsio.write_bytes (atomic, fsynced): a killed or
  failed build leaves no file a later run could load.
  """
  cxx = _compiler()
  flags = ['-O2', '-std=c++17', '-shared', '-fPIC', '-w', f'-I{jax.ffi.include_dir()}',
           str(_SOURCE), '-Wl,--no-as-needed', *map(str, libs),
           *sorted({f'-Wl,-rpath,{p.parent}' for p in libs})]
  version = subprocess.run([*cxx, '--version'], capture_output=True, text=True, check=False,
                           timeout=60).stdout
  key = hashlib.sha256('\0'.join([_SOURCE.read_text(), jaxlib.__version__, version, *cxx,
                                   *flags]).encode()).hexdigest()[:16]
  out = fsio.cache_dir() / 'native' / f'cpu_gemm-{key}.so'
  if out.exists() and not rebuild:
    return out
  with tempfile.TemporaryDirectory() as tmp:
    built = os.path.join(tmp, out.name)
    proc = subprocess.run([*cxx, *flags, '-o', built], capture_output=True, text=True,
                          check=False, timeout=600)
    if proc.returncode:
      raise Unavailable(f'{" ".join([*cxx, *flags])} failed ({proc.returncode}):\n'
                        f'{proc.stderr[-3000:]}')
    return fsio.write_bytes(out, pathlib.Path(built).read_bytes())


def _open(libs: list[pathlib.Path]) -> ctypes.CDLL:
  """The handler's library, rebuilt once if the cached file does not load (a damaged file)."""
  try:
    return ctypes.CDLL(str(_build(libs)))
  except OSError:
    return ctypes.CDLL(str(_build(libs, rebuild=True)))


_LOCK = threading.Lock()


@functools.cache
def _load():
  """Builds and loads the handler and registers its target; None, or why it is not loaded."""
  if mode() == 'xla':
    return f'${ENV}=xla'
  try:
    # RTLD_LOCAL (ctypes' default) keeps MKL's symbols out of the process's global scope: with
    # mkl_rt (which opens its parts globally) loaded first, PyTorch's matmuls in the same
    # process ran at half speed (docs/RESULTS.md, session 35). The handler gets sgemm by
    # address from this handle's own MKL, not by name from whatever the process loaded first.
    lib = _open(_mkl_libs())
  except (Unavailable, OSError, subprocess.SubprocessError) as e:
    if mode() == 'mkl':
      raise Unavailable(f'${ENV}=mkl: {e}') from e
    logging.warning('CPU GEMMs run on XLA\'s dot, not MKL (%s=xla hides this): %s', ENV, e)
    return str(e)
  lib.mp_cpu_gemm_set_sgemm(ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p))
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.MpCpuGemm), platform='cpu')
  _load.handle = lib  # the library stays loaded for the process
  return None


def _loaded():
  with _LOCK:  # one build and one registration per process, whichever thread traces first
    return _load()


def available() -> bool:
  """Whether CPU programs traced now get MKL's GEMM: `enabled`, a CPU default backend (a GPU or
  TPU host builds nothing), the mode, the libraries."""
  return bool(enabled.value) and jax.default_backend() == 'cpu' and _loaded() is None


def which() -> str:
  """What float32 dense layers of CPU programs traced now multiply with, for reports."""
  if available():
    return 'MKL GEMMs'
  if jax.default_backend() != 'cpu':
    why = 'not a CPU backend'
  elif enabled.value:
    why = _loaded()
  elif picks_mkl(mode(), cpu_vendor()):
    why = 'not enabled'
  else:
    why = f'{ENV}={mode()} on {cpu_vendor() or "a CPU of unknown vendor"}'
  return f'XLA GEMMs: {why}'


def _ffi(a, b, *, trans_a, trans_b):
  """The custom call itself: op(a) @ op(b), float32 [m, n]."""
  m, n = a.shape[1 if trans_a else 0], b.shape[0 if trans_b else 1]
  call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
  return call(a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


# A primitive, bilinear in (a, b): its JVP and transposes are GEMMs of the same primitive, so
# forward and reverse mode, and their compositions, differentiate through it to any order.
_gemm_p = jax.extend.core.Primitive(_TARGET)
_gemm_p.def_impl(jax.jit(_ffi, static_argnames=('trans_a', 'trans_b')))
_gemm_p.def_abstract_eval(lambda a, b, *, trans_a, trans_b: jax.core.ShapedArray(
    (a.shape[1 if trans_a else 0], b.shape[0 if trans_b else 1]), jnp.float32))
mlir.register_lowering(_gemm_p, mlir.lower_fun(_ffi, multiple_results=False))


def _ct_a(ct, _, b, *, trans_a, trans_b):
  """d/d(a) of <ct, op(a) op(b)>: ct op(b)^T, stored as a is (transposed where a is)."""
  if trans_a:
    return _gemm_p.bind(b, ct, trans_a=trans_b, trans_b=True)
  return _gemm_p.bind(ct, b, trans_a=False, trans_b=not trans_b)


def _ct_b(ct, a, _, *, trans_a, trans_b):
  """d/d(b) of <ct, op(a) op(b)>: op(a)^T ct, stored as b is."""
  if trans_b:
    return _gemm_p.bind(ct, a, trans_a=True, trans_b=trans_a)
  return _gemm_p.bind(a, ct, trans_a=not trans_a, trans_b=False)


ad.defbilinear(_gemm_p, _ct_a, _ct_b)


def _batched(args, dims, **kw):
  """vmap: one GEMM per batch entry, in sequence (as ffi_call's vmap_method='sequential'); an
  unbatched operand is closed over, not copied per entry."""
  a, b = (x if d is None else jnp.moveaxis(x, d, 0) for x, d in zip(args, dims))
  pick = lambda x, d, i: x if d is None else x[i]
  n = (a if dims[0] is not None else b).shape[0]
  return lax.map(lambda i: _gemm_p.bind(pick(a, dims[0], i), pick(b, dims[1], i), **kw),
                 jnp.arange(n)), 0


batching.primitive_batchers[_gemm_p] = _batched


def gemm(a, b, trans_a=False, trans_b=False):
  """op(a) @ op(b) for 2-D float32 a, b (op transposes where asked): the custom call, CPU only;
  differentiable in both, forward and reverse mode."""
  why = _loaded()
  if why is not None:
    raise Unavailable(f'MKL\'s GEMM is not loaded: {why}')
  return _gemm_p.bind(a, b, trans_a=bool(trans_a), trans_b=bool(trans_b))


def matmul(x_MxK, w_KxN, **dot_kw):
  """x @ w: MKL's GEMM (gradient g w^T, x^T g) where lowered for CPU, else `lax.dot_general`.

  `dot_kw` (precision, preferred_element_type) reach XLA's dot only: MKL's sgemm is float32 in and
  out at full precision, which is what XLA:CPU computes for float32 at any precision.
  """
  dense = functools.partial(lax.dot_general, dimension_numbers=(((1,), (0,)), ((), ())), **dot_kw)
  usable = (x_MxK.dtype == jnp.float32 and w_KxN.dtype == jnp.float32 and x_MxK.ndim == 2
            and w_KxN.ndim == 2 and dot_kw.get('preferred_element_type') in (None, jnp.float32))
  if not (usable and available()):
    return dense(x_MxK, w_KxN)
  return lax.platform_dependent(x_MxK, w_KxN, cpu=gemm, default=dense)

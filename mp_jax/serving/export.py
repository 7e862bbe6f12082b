"""jax.export of engine programs: one (batch, length) program to bytes/file, run with jax alone.

Two layouts (choose with `bake_params`):
- baked (default): params are constants inside the program; the file is self-contained and the
  program is called as fn(ids_BxT, types_BxT, mask_BxT, halt_L).
- argument: the program takes `engine.operands(batch, length)` (the params it reads) first; `save`
  stores its leaves next to the program and `load` rebuilds the tree from the program's own
  input tree structure.
Either way `load` needs only jax and numpy (no mp_jax model code). halt_L: the per-layer halt
values (L,), `Engine.halts(tau)`: which heads run at tau is the exit plan's (SPEC §3), so a bare
tau is refused rather than guessed.
"""

import io
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from mp_jax import fsio


def _specs(batch, length, num_layers):
  ids = jax.ShapeDtypeStruct((int(batch), int(length)), jnp.int32)
  return ids, ids, ids, jax.ShapeDtypeStruct((int(num_layers),), jnp.float32)


def export(engine, batch: int, length: int, *, bake_params: bool = True) -> jax_export.Exported:
  """Exports `engine.forward` (Engine or DenseEngine) for (batch, length) int32 inputs."""
  # Here, not at the top: `load` runs in processes that import no model code (tests/test_engine).
  from mp_jax.model import cpu_gemm  # pylint: disable=g-import-not-at-top
  specs = _specs(batch, length, engine.cfg.num_layers)
  with cpu_gemm.enabled(False):  # XLA's dot: MKL's custom call would need mp_jax to load
    if bake_params:
      params = engine.operands(batch, length)
      return jax_export.export(jax.jit(lambda *a: engine.forward(params, *a)))(*specs)
    return jax_export.export(jax.jit(engine.forward))(engine.operands(batch, length), *specs)


def save(path: str | os.PathLike, exported: jax_export.Exported, params=None) -> None:
  """Writes the serialized program (and the params leaves, if not baked) to one .npz file."""
  arrays = {'program': np.frombuffer(bytes(exported.serialize()), np.uint8)}
  for i, leaf in enumerate(jax.tree.leaves(params)):
    arrays[f'param_{i:05d}'] = np.asarray(leaf)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  fsio.write_bytes(path, buf.getvalue())


def deserialize(program: bytes, leaves: list | None = None) -> Callable:
  """A jitted fn(ids_BxT, types_BxT, mask_BxT, halt_L) -> outputs dict from serialized bytes
  (halt_L: the (L,) per-layer halt values of `Engine.halts(tau)`)."""
  exp = jax_export.deserialize(bytearray(program))
  shape = exp.in_avals[-1].shape

  def halts(halt_L):
    halt_L = np.asarray(halt_L, np.float32)
    if halt_L.shape != shape:
      raise ValueError(f'halt values must have shape {shape} (Engine.halts(tau): the exit '
                       f'plan\'s heads at tau), got {halt_L.shape}')
    return halt_L

  call = jax.jit(exp.call)
  if leaves:
    args_tree, _ = exp.in_tree.children()  # in_tree is ((args...), {kwargs})
    params = jax.device_put(args_tree.children()[0].unflatten(leaves))
    return lambda ids, types, mask, halt_L: call(params, ids, types, mask, halts(halt_L))
  return lambda ids, types, mask, halt_L: call(ids, types, mask, halts(halt_L))


def load(path: str | os.PathLike) -> Callable:
  """Loads a file written by `save`; see `deserialize` for the returned callable."""
  with np.load(path) as data:
    leaves = [data[k] for k in sorted(data.files) if k.startswith('param_')]
    return deserialize(data['program'].tobytes(), leaves)

"""jax.export of engine programs: one (batch, length) program to bytes/file, run with jax alone.

Two layouts (choose with `bake_params`):
- baked (default): params are constants inside the program; the file is self-contained and the
  program is called as fn(ids_BxT, types_BxT, mask_BxT, tau).
- argument: the program takes the engine's stacked params tree first; `save` stores its leaves
  next to the program and `load` rebuilds the tree from the program's own input tree structure.
Either way `load` needs only jax and numpy (no mp_jax model code).
"""

import io
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

from mp_jax import fsio


def _specs(batch, length):
  ids = jax.ShapeDtypeStruct((int(batch), int(length)), jnp.int32)
  return ids, ids, ids, jax.ShapeDtypeStruct((), jnp.float32)


def export(engine, batch: int, length: int, *, bake_params: bool = True) -> jax_export.Exported:
  """Exports `engine.forward` (Engine or DenseEngine) for (batch, length) int32 inputs."""
  if bake_params:
    params = engine.params
    return jax_export.export(jax.jit(lambda *a: engine.forward(params, *a)))(
        *_specs(batch, length))
  return jax_export.export(jax.jit(engine.forward))(engine.params, *_specs(batch, length))


def save(path: str | os.PathLike, exported: jax_export.Exported, params=None) -> None:
  """Writes the serialized program (and the params leaves, if not baked) to one .npz file."""
  arrays = {'program': np.frombuffer(bytes(exported.serialize()), np.uint8)}
  for i, leaf in enumerate(jax.tree.leaves(params)):
    arrays[f'param_{i:05d}'] = np.asarray(leaf)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  fsio.write_bytes(path, buf.getvalue())


def deserialize(program: bytes, leaves: list | None = None) -> Callable:
  """A jitted fn(ids_BxT, types_BxT, mask_BxT, tau) -> outputs dict from serialized bytes."""
  exp = jax_export.deserialize(bytearray(program))
  if leaves:
    args_tree, _ = exp.in_tree.children()  # in_tree is ((args...), {kwargs})
    params = jax.device_put(args_tree.children()[0].unflatten(leaves))
    call = jax.jit(exp.call)
    return lambda ids, types, mask, tau: call(params, ids, types, mask, np.float32(tau))
  call = jax.jit(exp.call)
  return lambda ids, types, mask, tau: call(ids, types, mask, np.float32(tau))


def load(path: str | os.PathLike) -> Callable:
  """Loads a file written by `save`; see `deserialize` for the returned callable."""
  with np.load(path) as data:
    leaves = [data[k] for k in sorted(data.files) if k.startswith('param_')]
    return deserialize(data['program'].tobytes(), leaves)

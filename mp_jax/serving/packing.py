"""A layer's or exit head's params with their vectors in one array: fewer program arguments.

Every array argument of a compiled program costs host time at each call: on XLA:CPU about
2.5 us (six MiniLM layers at 1 x 32 tokens, one request at a time: 96 arguments took 0.135 ms
a call more than the same weights with each layer's vectors packed, 42; docs/RESULTS.md, session
31). A single request's program takes them all, 176 for a MiniLM-L6 with exit heads. Only the
vectors (biases, LayerNorm scales) are packed: a matrix sliced out of a packed array is copied at
every call (the same layers ran 3x slower at 1 x 32), a vector's slice costs nothing measurable.

packed = {the tree's matrices at their places, VECTORS: its float32 vectors concatenated in
leaf order}; `unpack` cuts them out again at the shapes of the module's own params (template).
"""

import functools
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mp_jax.model import bert
from mp_jax.model import config as model_config

VECTORS = '_vectors'


@functools.lru_cache(maxsize=16)
def templates(cfg: model_config.ModelConfig) -> dict:
  """{'layer': ..., 'exit': ...}: a layer's and an exit head's param shapes (ShapeDtypeStructs)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(
      lambda: bert.MagicPyramid(cfg).init(jax.random.PRNGKey(0), ids, ids, ids + 1,
                                          exits=True))['params']
  return {'layer': shapes['layer_0'], 'exit': shapes.get('exit_0')}


def _vector(t) -> bool:
  return len(t.shape) <= 1 and t.dtype == jnp.float32


def _walk(template, path=()):
  """(path, template leaf) in jax's leaf order (dict keys sorted)."""
  for k in sorted(template):
    if isinstance(template[k], Mapping):
      yield from _walk(template[k], (*path, k))
    else:
      yield (*path, k), template[k]


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def pack(tree, template) -> dict:
  """`tree` (a param dict of `template`'s structure and shapes) packed (module docstring)."""
  layout = lambda tr: [(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype))
                       for p, x in jax.tree_util.tree_leaves_with_path(tr)]
  if layout(tree) != layout(template):
    raise ValueError(f"params to pack do not match the model's: {layout(tree)} vs "
                     f'{layout(template)}')
  out, vectors = {}, []
  for path, t in _walk(template):
    if _vector(t):
      vectors.append(jnp.ravel(_get(tree, path)))
    else:
      node = out
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = _get(tree, path)
  out[VECTORS] = jnp.concatenate(vectors) if vectors else jnp.zeros((0,), jnp.float32)
  return out


def unpack(packed, template) -> dict:
  """The param dict `pack` packed (traced or not); any other tree as it is."""
  if not isinstance(packed, Mapping) or VECTORS not in packed:
    return packed
  flat, at, out = packed[VECTORS], 0, {}
  for path, t in _walk(template):
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    if _vector(t):
      n = math.prod(t.shape)
      node[path[-1]] = flat[at:at + n].reshape(t.shape)
      at += n
    else:
      node[path[-1]] = _get(packed, path)
  if at != flat.shape[0]:  # packed for another model (pack checked its own template)
    raise ValueError(f'packed vectors hold {flat.shape[0]} values, the model\'s {at}')
  return out

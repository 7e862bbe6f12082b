"""A layer's or exit head's params with their vectors in one array: fewer program arguments.

Every array argument of a compiled program costs time at each call (six MiniLM layers at 1 x 32
tokens, one request at a time: 96 arguments took 0.135 ms a call more than the same weights with
each layer's vectors packed, 42; docs/RESULTS.md, session 31), most of it not in the host's own
argument handling (a trivial program over a packed one-row program's 92 arguments: 40 us a call,
session 32). A single request's program takes every layer's and head's params: 176 arguments for
a MiniLM-L6 with exit heads unpacked, 92 packed (82 with the engine's merged heads:
programs.engine_exit). Only the
vectors (biases, LayerNorm scales) are packed: a matrix sliced out of a packed array is copied at
every call (the same layers ran 3x slower at 1 x 32), a vector's slice costs nothing measurable.

packed = {each matrix under its path's key (jax.tree_util.keystr), VECTORS: the float32 vectors
concatenated in leaf order}; `unpack` cuts them out again at the shapes of the module's own params
(template) and rebuilds its tree.
"""

import functools
import math
import re
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


def name(path) -> str:
  """'per_layer/0/attention/query/kernel': a leaf's path, packed keys (keystr) unwrapped."""
  keys = (getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))) for k in path)
  return '/'.join(re.sub(r"^\['|'\]$", '', str(k)).replace("']['", '/') for k in keys)


def _shapes(leaves) -> dict:
  return {name(p): (tuple(x.shape), str(x.dtype)) for p, x in leaves}


def _difference(got, want) -> str | None:
  """The first name of `want` that `got` ({name: (shape, dtype)}) lacks, adds or differs in."""
  if missing := [k for k in want if k not in got]:
    return f'{missing[0]} is missing ({len(missing)} leaves in all)'
  if extra := [k for k in got if k not in want]:
    return f'{extra[0]} is not in the model ({len(extra)} leaves in all)'
  diff = [f'{k} is {got[k][0]} {got[k][1]}, the model\'s {want[k][0]} {want[k][1]}'
          for k in want if got[k] != want[k]]
  return diff[0] if diff else None


def mismatch(tree, template) -> str | None:
  """The first leaf where `tree` and `template` differ in path, shape or dtype (None: none)."""
  leaves = jax.tree_util.tree_leaves_with_path
  return _difference(_shapes(leaves(tree)), _shapes(leaves(template)))


def check(trees, template, what: str) -> None:
  """A ValueError naming the first leaf where a tree of `trees` (packed or not) is not `template`
  (packed alike): params prepared for another model, or another config (a dtype's exit heads
  merge or not)."""
  packed = jax.eval_shape(lambda t: pack(t, t), template)
  for i, tree in enumerate(trees):
    want = packed if isinstance(tree, Mapping) and VECTORS in tree else template
    if why := mismatch(tree, want):
      raise ValueError(f"params do not match the engine's model at {what}/{i}: {why} (prepared "
                       "for another config? engine.prepare takes the engine's own)")


def pack(tree, template) -> dict:
  """`tree` (a param dict of `template`'s structure and shapes) packed (module docstring)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  tpl_leaves, tpl_def = jax.tree_util.tree_flatten_with_path(template)
  # The same names from other kinds of key (a list for a dict) can flatten in another order.
  why = _difference(_shapes(leaves), _shapes(tpl_leaves)) or (
      treedef != tpl_def and f'{treedef} is not {tpl_def}')
  if why:
    raise ValueError(f"params to pack do not match the model's: {why}")
  out, vectors = {}, []
  for (p, x), (_, t) in zip(leaves, tpl_leaves):  # the template decides, as in unpack
    if _vector(t):
      vectors.append(jnp.ravel(x))
    else:
      out[jax.tree_util.keystr(p)] = x
  out[VECTORS] = jnp.concatenate(vectors) if vectors else jnp.zeros((0,), jnp.float32)
  return out


def unpack(packed, template) -> dict:
  """The param dict `pack` packed (traced or not); any other tree as it is."""
  if not isinstance(packed, Mapping) or VECTORS not in packed:
    return packed
  flat, at, leaves = packed[VECTORS], 0, []
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  for p, t in paths:
    if _vector(t):
      n = math.prod(t.shape)
      leaves.append(flat[at:at + n].reshape(t.shape))
      at += n
    else:
      leaves.append(packed[jax.tree_util.keystr(p)])
  if at != flat.shape[0]:  # packed for another model (pack checked its own template)
    raise ValueError(f'packed vectors hold {flat.shape[0]} values, the model\'s {at}')
  return jax.tree.unflatten(treedef, leaves)

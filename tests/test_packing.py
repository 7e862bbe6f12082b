"""Packed layer and exit-head params: the same params back, fewer arguments, mismatches refused."""

import jax
import numpy as np
import pytest

from mp_jax.model import bert
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import packing, programs
from tests.conftest import tiny_config


@pytest.mark.parametrize('kind', ['layer', 'exit'])
def test_unpack_gives_back_every_param(kind):
  cfg = tiny_config()
  params = bert.init_params(cfg, seed=3)
  # every value distinct, so a vector cut at a wrong offset or shape cannot match
  tree = jax.tree.map(lambda x: np.random.default_rng(x.size).normal(size=x.shape), params)
  tree = jax.tree.map(lambda x: x.astype(np.float32), tree[f'{kind}_0'])
  tpl = packing.templates(cfg)[kind]
  packed = packing.pack(tree, tpl)
  assert all(np.ndim(x) >= 2 for k, x in packed.items() if k != packing.VECTORS
             for x in jax.tree.leaves(x))
  vectors = [x for x in jax.tree.leaves(tree) if np.ndim(x) <= 1]
  assert len(jax.tree.leaves(packed)) == len(jax.tree.leaves(tree)) - len(vectors) + 1
  back = jax.jit(lambda p: packing.unpack(p, tpl))(packed)  # traced, as programs unpack it
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)


def test_pack_refuses_params_of_another_shape():
  cfg = tiny_config()
  layer = bert.init_params(cfg)['layer_0']
  bad = jax.tree.map(lambda x: x, layer)
  bad['output']['LayerNorm']['bias'] = np.zeros(5, np.float32)
  with pytest.raises(ValueError, match='do not match'):
    packing.pack(bad, packing.templates(cfg)['layer'])


def test_one_row_programs_take_fewer_arguments_with_the_same_answers():
  """The engine's per-layer params are packed; the same programs over unpacked ones answer the
  same (unpack passes an unpacked tree through)."""
  cfg = tiny_config()
  params = bert.init_params(cfg, seed=1)
  packed = engine_lib.prepare(cfg, params)
  tpl = packing.templates(cfg)
  sp = packed.tree
  plain = engine_lib.Prepared(dict(
      sp, per_layer=tuple(packing.unpack(p, tpl['layer']) for p in sp['per_layer']),
      per_exit=tuple(packing.unpack(p, tpl['exit']) for p in sp['per_exit'])))
  kw = dict(exits=True, prune=True, tau=0.5, length_buckets=(8, 16), batch_buckets=(1, 8))
  a, b = engine_lib.Engine(cfg, packed, **kw), engine_lib.Engine(cfg, plain, **kw)
  n_a, n_b = (len(jax.tree.leaves(e.operands(1, 8))) for e in (a, b))
  assert programs.unrolls(1, 8, a.chunk_tokens)
  assert n_a < n_b - 2 * cfg.num_layers
  rows = [(np.array([2, 7, 9, 11, 3]), np.zeros(5, np.int64))]
  out_a, out_b = a.predict(rows), b.predict(rows)
  for k in programs.OUTPUTS:
    np.testing.assert_array_equal(out_a[k], out_b[k])

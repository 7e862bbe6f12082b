"""Packed layer and exit-head params: the same params back, fewer arguments, mismatches refused."""

import jax
import numpy as np
import pytest

from mp_jax.model import bert
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import packing, programs
from tests.conftest import tiny_config


@pytest.fixture(scope='module')
def cfg_params():
  """tiny_config's params with every value distinct (one stream over all leaves, biases too), so
  a vector cut at a wrong offset or swapped with one of its size cannot match."""
  cfg = tiny_config()
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(size=np.shape(x)).astype(np.float32) * 0.5,
                        bert.init_params(cfg, seed=3))
  return cfg, params


@pytest.mark.parametrize('kind', ['layer', 'exit', 'engine exit'])
def test_unpack_gives_back_every_param(cfg_params, kind):
  cfg, params = cfg_params
  if kind == 'engine exit':  # the form a float32 engine holds (merged)
    tree, tpl = programs.engine_exit(cfg, params['exit_0']), programs.exit_template(cfg)
  else:
    tree, tpl = params[f'{kind}_0'], packing.templates(cfg)[kind]
  packed = packing.pack(tree, tpl)
  # One flat level: the matrices under their paths, beside the vectors' one array.
  assert all(np.ndim(x) >= 2 and k.startswith('[') for k, x in packed.items()
             if k != packing.VECTORS)
  vectors = [x for x in jax.tree.leaves(tree) if np.ndim(x) <= 1]
  assert len(jax.tree.leaves(packed)) == len(jax.tree.leaves(tree)) - len(vectors) + 1
  back = jax.jit(lambda p: packing.unpack(p, tpl))(packed)  # traced, as programs unpack it
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)


def test_a_float32_engine_holds_its_exit_heads_merged(cfg_params):
  """float32 engines hold exits.merge's form (what makes their heads cheaper); bfloat16 ones
  and heads of more than two attention heads the trained factors."""
  cfg, params = cfg_params
  factored = packing.templates(cfg)['exit']
  assert programs.merges_heads(cfg) and set(programs.exit_template(cfg)) == {
      'down', 'query_key', 'value_out', 'dense', 'logits'}
  for other in (cfg.replace(dtype='bfloat16'), cfg.replace(exit_heads=4)):
    assert not programs.merges_heads(other)
    assert programs.exit_template(other) == packing.templates(other)['exit']
  assert set(factored) != set(programs.exit_template(cfg))
  sp = engine_lib.prepare(cfg, params).tree
  assert "['query_key']['kernel']" in sp['per_exit'][0] and 'query_key' in sp['exits']


def test_pack_and_unpack_refuse_another_model(cfg_params):
  cfg, params = cfg_params
  bad = jax.tree.map(lambda x: x, params['layer_0'])
  bad['output']['LayerNorm']['bias'] = np.zeros(5, np.float32)
  with pytest.raises(ValueError, match='do not match'):
    packing.pack(bad, packing.templates(cfg)['layer'])
  tpl = packing.templates(cfg)['layer']
  missing = {k: v for k, v in params['layer_0'].items() if k != 'output'}
  with pytest.raises(ValueError, match=r"output/LayerNorm/bias is missing \(\d+ leaves in all\)"):
    packing.pack(missing, tpl)
  extra = dict(params['layer_0'], more={'w': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match='more/w is not in the model'):
    packing.pack(extra, tpl)
  # The same names from another kind of key (a list where a dict is) would pair leaves by
  # another order: refused by structure.
  listed = dict(params['layer_0'], attention=[params['layer_0']['attention'][k]
                                              for k in sorted(params['layer_0']['attention'])])
  listed_tpl = dict(tpl, attention={str(i): tpl['attention'][k]
                                    for i, k in enumerate(sorted(tpl['attention']))})
  with pytest.raises(ValueError, match='is not PyTreeDef'):
    packing.pack(listed, listed_tpl)
  packed = packing.pack(params['layer_0'], packing.templates(cfg)['layer'])
  longer = dict(packed, **{packing.VECTORS: np.zeros(packed[packing.VECTORS].size + 1)})
  with pytest.raises(ValueError, match='packed vectors hold'):
    packing.unpack(longer, packing.templates(cfg)['layer'])


def test_an_engine_refuses_params_prepared_for_another_config(cfg_params):
  """A Prepared tree is used as it is: one made for another dtype (its exit heads merged or not)
  or another width is named at the leaf that differs, not met as a KeyError while tracing."""
  cfg, params = cfg_params
  bf16 = cfg.replace(dtype='bfloat16')
  cases = [(cfg, bf16, r'per_exit/0: query_key/kernel is missing'),
           (bf16, cfg, r'per_exit/0: key/kernel is missing'),
           (cfg.replace(intermediate_size=cfg.intermediate_size // 2), cfg,
            r'per_layer/0: intermediate/dense/kernel is')]
  kw = dict(length_buckets=(16, cfg.max_seq_length), batch_buckets=(1, 4))
  for engine_cfg, prepared_cfg, match in cases:
    shared = engine_lib.prepare(prepared_cfg, params)
    with pytest.raises(ValueError, match=match):
      engine_lib.Engine(engine_cfg, shared, **kw)
  engine_lib.Engine(bf16, engine_lib.prepare(bf16, params), **kw)  # its own: accepted


def test_one_row_programs_take_fewer_arguments_with_the_same_answers(cfg_params):
  """The engine's per-layer params are packed; the same programs over the model's own params
  (never packed) answer the same."""
  cfg, params = cfg_params
  packed = engine_lib.prepare(cfg, params)
  n = cfg.num_layers
  plain = engine_lib.Prepared(dict(
      packed.tree, per_layer=tuple(jax.device_put(params[f'layer_{l}']) for l in range(n)),
      per_exit=tuple(jax.device_put(programs.engine_exit(cfg, params[f'exit_{l}']))
                     for l in range(n - 1))))
  kw = dict(exits=True, prune=True, tau=0.5, length_buckets=(8, 16), batch_buckets=(1, 8))
  a, b = engine_lib.Engine(cfg, packed, **kw), engine_lib.Engine(cfg, plain, **kw)
  n_a, n_b = (len(jax.tree.leaves(e.operands(1, 8))) for e in (a, b))
  assert programs.unrolls(1, 8, a.chunk_tokens)
  assert n_a < n_b - 2 * n
  rows = [(np.array([2, 7, 9, 11, 3, 8]), np.zeros(6, np.int64))]
  out_a, out_b = a.predict(rows), b.predict(rows)
  for k in programs.OUTPUTS:
    np.testing.assert_array_equal(out_a[k], out_b[k])

"""mp_jax.model.matmul: the dense layers' matmul over merged rows, its values and its gradient."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mp_jax.model import bert, cpu_gemm, matmul
from tests.conftest import make_batch, tiny_config


def _loss(dot_general, x, n):
  """(loss(params, x), params) of a dense layer of n outputs under a fixed random projection."""
  dense = nn.Dense(n, dot_general=dot_general, dtype=x.dtype)
  p = dense.init(jax.random.PRNGKey(0), x)
  c_N = jax.random.normal(jax.random.PRNGKey(1), (n,))
  return lambda p, x: jnp.sum(jnp.tanh(dense.apply(p, x).astype(jnp.float32)) * c_N), p


@pytest.mark.parametrize('shape,dtype', [((3, 5, 8), jnp.float32), ((4, 8), jnp.float32),
                                         ((2, 3, 4, 8), jnp.float32), ((8,), jnp.float32),
                                         ((0, 5, 8), jnp.float32), ((3, 5, 8), jnp.bfloat16)])
@pytest.mark.parametrize('mkl', [False, True])  # MKL's GEMM where it loads, on any CPU vendor
def test_values_and_gradients_equal_the_plain_dot(shape, dtype, mkl):
  x = jax.random.normal(jax.random.PRNGKey(2), shape).astype(dtype)
  tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  (loss, p), (loss0, _) = _loss(matmul.dot_general, x, 6), _loss(None, x, 6)
  with cpu_gemm.enabled(mkl):
    for got, want in ((loss(p, x), loss0(p, x)),
                      (jax.grad(loss, (0, 1))(p, x), jax.grad(loss0, (0, 1))(p, x))):
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.float32(a), np.float32(b), **tol)


@pytest.mark.parametrize('a_shape,b_shape,dims', [
    ((2, 3, 4), (2, 4, 5), (((2,), (1,)), ((0,), (0,)))),  # batched
    ((3, 4), (5, 4), (((1,), (1,)), ((), ()))),  # x @ w.T: w's contracting axis is not 0
    ((4, 3), (4, 5), (((0,), (0,)), ((), ()))),  # x's contracting axis is not its last
])
def test_other_contractions_fall_back_to_lax(a_shape, b_shape, dims):
  a = jax.random.normal(jax.random.PRNGKey(0), a_shape)
  b = jax.random.normal(jax.random.PRNGKey(1), b_shape)
  np.testing.assert_allclose(matmul.dot_general(a, b, dims), lax.dot_general(a, b, dims),
                             rtol=1e-6)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='what XLA:CPU compiles')
def test_the_weight_gradient_reads_the_output_gradient_in_place():
  # [B, T, K] x [K, N]: autodiff's weight gradient contracts B and T at once, and XLA:CPU copies
  # the output gradient transposed, to [N, B*T], before its dot. Merged rows need no copy.
  b, t, k, n = 8, 16, 32, 48
  x = jnp.ones((b, t, k))
  transposed = re.compile(rf'= f32\[{n},({b * t}|{b},{t})\]')

  def hlo(dot_general):
    loss, p = _loss(dot_general, x, n)
    return jax.jit(jax.grad(loss)).lower(p, x).compile().as_text()
  assert transposed.search(hlo(None)), 'XLA no longer copies it: matmul.dot_general may go'
  with cpu_gemm.enabled(False):  # XLA's dot over merged rows (GPU, TPU, exported programs)
    assert not transposed.search(hlo(matmul.dot_general))


def test_the_model_multiplies_over_merged_rows():
  # Every dense layer of the model (backbone, exit heads, factorised word table) and its
  # gradient: a matmul without batch axes takes 2-D operands.
  cfg = tiny_config(embedding_rank=8)
  batch = make_batch([16, 9], 16)
  model = bert.MagicPyramid(cfg)
  params = model.init(jax.random.PRNGKey(0), *batch, pruning='soft', exits=True)['params']

  def loss(p):
    logits, aux = model.apply({'params': p}, *batch, pruning='soft', exits=True)
    return logits.sum() + aux['exit_logits'].sum()

  def dots(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        yield eqn
      for v in eqn.params.values():
        for j in (v if isinstance(v, (list, tuple)) else (v,)):
          if hasattr(j, 'jaxpr'):
            yield from dots(getattr(j.jaxpr, 'jaxpr', j.jaxpr))
          elif hasattr(j, 'eqns'):
            yield from dots(j)

  found = list(dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
  plain = [e for e in found if e.params['dimension_numbers'][1] == ((), ())]
  assert len(plain) > 6 * cfg.num_layers
  wide = [tuple(v.aval.shape for v in e.invars) for e in plain
          if max(v.aval.ndim for v in e.invars) > 2]
  assert not wide, wide

"""mp_jax.model.matmul: the dense layers' matmul over merged rows, its values and its gradient."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mp_jax.model import matmul


def _grads(dot_general, x, n):
  dense = nn.Dense(n, dot_general=dot_general)
  p = dense.init(jax.random.PRNGKey(0), x)
  c = jax.random.normal(jax.random.PRNGKey(1), (*x.shape[:-1], n))
  loss = lambda p, x: jnp.sum(jnp.tanh(dense.apply(p, x)) * c)
  return dense.apply(p, x), jax.grad(loss, argnums=(0, 1))(p, x), jax.jit(
      jax.grad(loss)).lower(p, x).compile().as_text()


@pytest.mark.parametrize('shape', [(3, 5, 8), (4, 8), (2, 3, 4, 8)])
def test_values_and_gradients_equal_the_plain_dot(shape):
  x = jax.random.normal(jax.random.PRNGKey(2), shape)
  y, (gp, gx), _ = _grads(matmul.dot_general, x, 6)
  y0, (gp0, gx0), _ = _grads(None, x, 6)
  np.testing.assert_allclose(y, y0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(gx, gx0, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert y.shape == (*shape[:-1], 6)


def test_other_contractions_fall_back_to_lax():
  a = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
  b = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 5))
  dims = (((2,), (1,)), ((0,), (0,)))  # batched: not a dense layer's
  np.testing.assert_allclose(matmul.dot_general(a, b, dims), lax.dot_general(a, b, dims),
                             rtol=1e-6)


def test_the_weight_gradient_reads_the_output_gradient_in_place():
  # [B, T, K] x [K, N]: autodiff's weight gradient contracts B and T at once, and XLA:CPU copies
  # the output gradient transposed, to [N, B*T], before its dot. Merged rows need no copy.
  b, t, k, n = 8, 16, 32, 48
  x = jnp.ones((b, t, k))
  transposed = re.compile(rf'= f32\[{n},{b * t}\]')
  *_, plain = _grads(None, x, n)
  *_, merged = _grads(matmul.dot_general, x, n)
  assert transposed.search(plain), 'XLA no longer copies it: matmul.dot_general may go'
  assert not transposed.search(merged)

"""The hashed dropout mask: Bernoulli(1 - rate), independent across elements and keys."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mp_jax.model import bert, dropout
from tests.conftest import tiny_config

SHAPE = (8, 4, 128, 256)  # 1M elements: 5 sigma of a frequency is ~0.002
N = int(np.prod(SHAPE))


def _mask(seed, rate=0.1, shape=SHAPE):
  return np.asarray(dropout.keep_mask(jax.random.PRNGKey(seed), shape, rate))


def test_flat_index_is_row_major():
  np.testing.assert_array_equal(dropout.flat_index((3, 4, 5)), np.arange(60).reshape(3, 4, 5))


def test_counter_beyond_32_bits_is_refused():
  with pytest.raises(ValueError, match='2\\^32'):
    jax.eval_shape(lambda: dropout.flat_index((2 ** 16, 2 ** 16)))


def test_mix32_is_a_bijection():
  x = jnp.arange(1 << 20, dtype=jnp.uint32) * np.uint32(4099)  # distinct, spread over uint32
  assert len(np.unique(np.asarray(dropout.mix32(x)))) == 1 << 20


@pytest.mark.parametrize('rate', [0.1, 0.5, 0.9])
def test_keep_frequency_is_one_minus_rate(rate):
  sd = np.sqrt(rate * (1 - rate) / N)
  for seed in range(3):
    assert abs(_mask(seed, rate).mean() - (1 - rate)) < 5 * sd


def test_elements_and_keys_are_independent():
  p, m = 0.9, _mask(0).astype(np.float64)
  # Two keys agree as independent coins do: p^2 + (1-p)^2.
  agree, want = (m == _mask(1)).mean(), p * p + (1 - p) ** 2
  assert abs(agree - want) < 5 * np.sqrt(want * (1 - want) / N)
  # Neighbours along every axis (and a whole head apart) are uncorrelated.
  f = (m - m.mean()).ravel()
  for lag in (1, 2, 256, 128 * 256, 4 * 128 * 256):
    r = (f[:-lag] * f[lag:]).mean() / f.var()
    assert abs(r) < 5 / np.sqrt(N - lag), lag


def test_same_key_same_mask():
  np.testing.assert_array_equal(_mask(7), _mask(7))
  assert (_mask(7) != _mask(8)).any()


class _Two(nn.Module):
  @nn.compact
  def __call__(self, x):
    return dropout.Dropout(0.5)(x, False), dropout.Dropout(0.5)(x, False)


def test_each_module_draws_its_own_mask():
  a, b = _Two().apply({}, jnp.ones((64, 64)), rngs={'dropout': jax.random.PRNGKey(0)})
  assert (a != b).mean() > 0.3  # independent halves differ on ~1/2 of the elements


def test_scaled_where_kept_zero_elsewhere_and_gradient_follows():
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 300))
  key = jax.random.PRNGKey(2)
  f = lambda x: dropout.Dropout(0.25).apply({}, x, False, rngs={'dropout': key})
  y, g = f(x), jax.grad(lambda x: f(x).sum())(x)
  keep = np.asarray(y) != 0
  assert 0.6 < keep.mean() < 0.9
  np.testing.assert_allclose(np.asarray(y)[keep], np.asarray(x)[keep] / 0.75, rtol=1e-6)
  np.testing.assert_allclose(g, keep / 0.75, rtol=1e-6)  # no gradient into dropped elements


def test_deterministic_and_zero_rate_are_the_identity():
  x = jnp.arange(12.0).reshape(3, 4)
  assert dropout.Dropout(0.3).apply({}, x, True) is x
  assert dropout.Dropout(0.0).apply({}, x, False) is x
  np.testing.assert_array_equal(
      dropout.Dropout(1.0).apply({}, x, False, rngs={'dropout': jax.random.PRNGKey(0)}), 0)


def test_bfloat16_stays_bfloat16():
  x = jnp.ones((4, 64), jnp.bfloat16)
  y = dropout.Dropout(0.1).apply({}, x, False, rngs={'dropout': jax.random.PRNGKey(0)})
  assert y.dtype == jnp.bfloat16 and set(np.unique(np.asarray(y, np.float32))) <= {0.0, 1.109375}


def test_the_model_drops_with_it(monkeypatch):
  cfg = tiny_config()
  calls = []
  real = dropout.keep_mask
  monkeypatch.setattr(dropout, 'keep_mask', lambda *a: calls.append(a[1]) or real(*a))
  ids = jnp.ones((2, 8), jnp.int32)
  bert.MagicPyramid(cfg).apply({'params': bert.init_params(cfg)}, ids, ids * 0, ids, train=True,
                               rngs={'dropout': jax.random.PRNGKey(0)})
  # embeddings, then per layer attention weights, attention output, FFN output; the pooler
  assert len(calls) == 1 + 3 * cfg.num_layers + 1
  assert (2, cfg.num_heads, 8, 8) in calls

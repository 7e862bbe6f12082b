"""Learned token pruning (LTP as used by Magic Pyramid, SPEC §2): scores, thresholds, masks."""

import jax
import jax.numpy as jnp
import numpy as np


def importance(probs_BxHxTxT, alive_BxT, max_seq_length):
  """s(j) = 1/(H*n) sum_h sum_{i alive} A[h, i, j], n = configured max length (not T)."""
  num_heads = probs_BxHxTxT.shape[1]
  # Query rows of pruned/padding tokens contribute 0.
  col_BxT = jnp.einsum('bhij,bi->bj', probs_BxHxTxT, alive_BxT.astype(probs_BxHxTxT.dtype))
  return col_BxT / (num_heads * max_seq_length)


def init_thresholds(num_layers, final_threshold):
  """theta_l = final_threshold * l / L for l = 1..L."""
  return final_threshold * np.arange(1, num_layers + 1, dtype=np.float32) / num_layers


def soft_mask(score_BxT, theta, temperature, real_BxT):
  """sigmoid((s - theta) / T); [CLS] forced to 1, padding to 0."""
  m_BxT = jax.nn.sigmoid((score_BxT - theta) / temperature)
  m_BxT = m_BxT.at[:, 0].set(1.0)
  return m_BxT * real_BxT.astype(m_BxT.dtype)


def hard_keep(score_BxT, theta, alive_BxT):
  """Cumulative keep: alive before AND s > theta; [CLS] always kept."""
  keep_BxT = alive_BxT & (score_BxT > theta)
  return keep_BxT.at[:, 0].set(alive_BxT[:, 0])


def mask_penalty(masks_LxBxT, real_BxT):
  """sum_l mean over real tokens of M_l (the L1 regulariser, before lambda)."""
  real = real_BxT.astype(masks_LxBxT.dtype)
  per_layer = (masks_LxBxT * real[None]).sum(axis=(1, 2)) / jnp.maximum(real.sum(), 1.0)
  return per_layer.sum()

"""Learned token pruning (LTP as used by Magic Pyramid, SPEC §2): scores, thresholds, masks."""

import jax
import jax.numpy as jnp
import numpy as np


def importance(e_BxHxTxT, z_BxHxTx1, alive_BxT, max_seq_length):
  """s(j) = 1/(H*n) sum_h sum_{i alive} A[h, i, j], n = configured max length (not T).

  A = e / z: the attention probabilities from their unnormalised weights and row sums, folded
  into the query weights (alive_i / z_hi), so the T x T probabilities never materialise (on
  XLA:CPU that made attention + score 1.3x slower than attention alone at 32 x 64 tokens).
  """
  num_heads = e_BxHxTxT.shape[1]
  # Query rows of pruned/padding tokens contribute 0.
  w_BxHxT = alive_BxT[:, None, :].astype(e_BxHxTxT.dtype) / z_BxHxTx1[..., 0]
  col_BxT = jnp.einsum('bhi,bhij->bj', w_BxHxT, e_BxHxTxT)
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


def soft_keep(masks_LxBxT, real_BxT):
  """Token keep of soft masks: mean_l sum_{b,t} prod_{k<=l} M_k / sum real (cf. token_keep).

  Cumulative like the hard masks, whose keep it stands in for while training: a token a layer
  masks out stays out in the hard model, whatever the later soft masks say.
  """
  real = real_BxT.astype(masks_LxBxT.dtype)
  cum_LxBxT = jnp.cumprod(masks_LxBxT, axis=0) * real[None]
  return cum_LxBxT.sum(axis=(1, 2)).mean() / jnp.maximum(real.sum(), 1.0)


def token_keep(n_ffn_NxL, lengths_N):
  """Fraction of the token-layer work kept: mean_l sum_i n_ffn[i, l] / sum_i length_i.

  n_ffn[i, l] is the number of tokens of example i that layer l's FFN processes (after the
  layer's own pruning); 1.0 = nothing pruned. With FFNs the larger part of a layer's FLOPs,
  about 1 / (backbone FLOPs speedup).
  """
  n = np.asarray(n_ffn_NxL, np.float64)
  return float(n.sum(0).mean() / max(float(np.sum(lengths_N)), 1.0))


def calibrate(keep_of, target, lo=1e-6, hi=1.0, steps=20):
  """(final_threshold, keep): bisection in log(final_threshold) for keep_of(f) ~= target.

  keep_of(f) is the token keep of LTP's schedule theta_l = f * l / L, decreasing in f (a higher
  threshold removes more; exact monotonicity is not needed, the result is a crossing). Outside
  [keep_of(hi), keep_of(lo)] the nearer end is returned.
  """
  k_lo, k_hi = keep_of(lo), keep_of(hi)
  if target >= k_lo:
    return lo, k_lo
  if target <= k_hi:
    return hi, k_hi
  best = min(((lo, k_lo), (hi, k_hi)), key=lambda fk: abs(fk[1] - target))
  for _ in range(steps):
    mid = float(np.sqrt(lo * hi))
    k = keep_of(mid)
    if abs(k - target) < abs(best[1] - target):
      best = (mid, k)
    if k > target:
      lo = mid
    else:
      hi = mid
  return best

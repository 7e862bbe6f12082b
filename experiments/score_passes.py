"""What the importance score costs attention, and two ways around it that do not pay.

  python experiments/score_passes.py --rows=32 --length=256

The score s(j) = 1/(H n) sum_h sum_i alive_i p[h, i, j] (SPEC §2) reads every head's T x T
attention probabilities. Without it XLA:CPU runs attention as one fusion that never writes them;
with it they are written and read again (mp_jax.model.pruning.importance). Timed here on random
q, k, v of MiniLM's heads (12 x 32), interleaved (medians, CALLS calls a round):
  fused             attention alone (the dense program's)
  fused + lse       the same, also returning each query row's log-sum-exp
  score             attention + score as the engine runs it (model code), whole and in the
                    schedule's row chunks (grouping.attention_rows)
  two passes        `fused + lse`, then the score from a second pass over k q^T: for key j,
                    sum_i exp(k_j . q_i / sqrt(d) - lse_i) over alive queries i (the same
                    probabilities, never stored), whole and in chunks of 8 rows
Also prints how far the two-pass answers are from the engine's (float rounding). Never run it
beside another training or benchmark (2 cores: XLA processes thrash).
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp_jax import cli
from mp_jax.evaluation import timing
from mp_jax.model import pruning as pruning_lib
from mp_jax.serving import grouping, programs

_ROWS = flags.DEFINE_integer('rows', 32, 'Batch rows.')
_LENGTH = flags.DEFINE_integer('length', 256, 'Tokens a row (all alive but a random tenth).')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Interleaved rounds (medians).')
HEADS, DIM, MAX_LEN, CALLS = 12, 32, 256, 5


def _logits(q_BxHxTxK, k_BxHxTxK, alive_BxT):
  bias_BxT = jnp.where(alive_BxT, 0.0, -1e9).astype(jnp.float32)
  return (jnp.einsum('bhqk,bhtk->bhqt', q_BxHxTxK / np.sqrt(DIM), k_BxHxTxK)
          + bias_BxT[:, None, None, :])


def _attention(q, k, v, alive):
  """(ctx, e, z, m): bert.SelfAttention's core with its unnormalised weights e, their row sums z
  and row maxima m; what a caller leaves unused, XLA drops."""
  s_BxHxTxT = _logits(q, k, alive)
  m_BxHxTx1 = s_BxHxTxT.max(-1, keepdims=True)
  e_BxHxTxT = jnp.exp(s_BxHxTxT - m_BxHxTx1)
  z_BxHxTx1 = e_BxHxTxT.sum(-1, keepdims=True)
  ctx_BxHxTxK = jnp.einsum('bhqt,bhtk->bhqk', e_BxHxTxT, v) / z_BxHxTx1
  return ctx_BxHxTxK, e_BxHxTxT, z_BxHxTx1, m_BxHxTx1


def fused(q, k, v, alive, lse=False):
  """Attention alone; with `lse`, also each query row's log-sum-exp."""
  ctx_BxHxTxK, _, z_BxHxTx1, m_BxHxTx1 = _attention(q, k, v, alive)
  return (ctx_BxHxTxK, m_BxHxTx1 + jnp.log(z_BxHxTx1)) if lse else ctx_BxHxTxK


def scored(q, k, v, alive):
  """Attention and the score as the engine computes them."""
  ctx_BxHxTxK, e_BxHxTxT, z_BxHxTx1, _ = _attention(q, k, v, alive)
  return ctx_BxHxTxK, pruning_lib.importance(e_BxHxTxT, z_BxHxTx1, alive, MAX_LEN)


def two_passes(q, k, v, alive):
  """Fused attention with log-sum-exp, then the score from k q^T (module docstring)."""
  ctx_BxHxTxK, lse_BxHxTx1 = fused(q, k, v, alive, lse=True)
  # Dead queries add nothing: -inf before the exp. s - lse <= 0 for alive keys: no overflow
  # (dead keys, unbiased here, are zeroed at the end).
  c_BxHxT = jnp.where(alive[:, None, :], -lse_BxHxTx1[..., 0], -jnp.inf)
  st_BxHxTxT = jnp.einsum('bhtk,bhqk->bhtq', k, q / np.sqrt(DIM)) + c_BxHxT[:, :, None, :]
  col_BxT = jnp.exp(st_BxHxTxT).sum(-1).sum(1)
  return ctx_BxHxTxK, jnp.where(alive, col_BxT, 0.0) / (HEADS * MAX_LEN)


def main(argv):
  del argv
  b, t = _ROWS.value, _LENGTH.value
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((b, HEADS, t, DIM), np.float32)) for _ in range(3))
  alive = jnp.asarray(rng.random((b, t)) < 0.9).at[:, 0].set(True)
  r = grouping.attention_rows(b, t, HEADS, grouping.ATTENTION_BYTES)
  chunks = lambda f, n: lambda *x: programs.map_rows(f, x, n)
  fns = {'fused': fused, 'fused + lse': lambda *x: fused(*x, lse=True), 'score, whole': scored,
         'two passes, whole': two_passes}
  if r < b:  # the schedule's chunks
    fns[f'score, chunks of {r} rows'] = chunks(scored, r)
  if b > 8 and b % 8 == 0:
    fns['two passes, chunks of 8 rows'] = chunks(two_passes, 8)
  jitted = {n: jax.jit(f) for n, f in fns.items()}
  (ctx, score), (ctx2, score2) = jitted['score, whole'](q, k, v, alive), jitted[
      'two passes, whole'](q, k, v, alive)
  live = np.asarray(alive)
  print(f'two passes against the engine: attention {float(jnp.abs(ctx - ctx2).max()):.1e} '
        f'(max abs), score {float((jnp.abs(score - score2) / score)[live].max()):.1e} '
        '(max relative, alive tokens)\n')
  secs = timing.interleaved(
      {n: (lambda f=f: jax.block_until_ready([f(q, k, v, alive) for _ in range(CALLS)]))
       for n, f in jitted.items()}, _REPEATS.value, warmup=True)
  print(f'| {b} x {t} | ms a call | against fused |\n|---|---|---|')
  for n, s in secs.items():
    print(f'| {n} | {s / CALLS * 1e3:.2f} | {s / secs["fused"]:.2f} |')


if __name__ == '__main__':
  cli.run(main)

"""How the layer-major schedule (mp_jax.serving.schedule) cuts a layer's rows into calls, and
each call's attention and FFN into chunks: pure sizing rules, no device work.

Per layer the active rows, longest first, go into groups (`groups`): one call each, at a
(batch bucket, length bucket) of the group sizes (`group_buckets`, `group_rows`). Inside a call
the attention runs in row chunks (`attention_rows`), the FFN over the kept tokens packed to a
count of `pack_grid`, in chunks of `ffn_rows` tokens. mp_jax.serving.work counts the MACs of
these same shapes.
"""

from collections.abc import Sequence

import numpy as np

from mp_jax.data import batching
from mp_jax.serving import programs

# When fewer rows are left in a layer than a group holds, the next group's size is the one
# that covers them with least padding plus this many tokens' worth of rows a call
# (batching.plan_batches): a call's host dispatch measured 0.3-0.5 ms on the busy CPU, about what
# 64 tokens of a half-layer cost (a MiniLM forward: ~70 us a token, docs/RESULTS.md session 20).
# Calls are whole layers since session 21 (twice the work a token); not re-tuned.
CALL_TOKENS = 64

# With pruning a group's FFN runs over its kept tokens packed into one matrix, at the first of
# pack_grid's counts that holds them: steps of this many tokens (1/16 of a large group), at most
# 16 branches a program. Steps of the group's length buckets (a 128-row group at 8 tokens: 256,
# 512, ..) ran LTP on `mr` 1.57x over dense against 1.69x (docs/RESULTS.md, session 21).
PACK_TOKENS = 64

# With pruning a group's attention runs in row chunks whose unnormalised weights (rows x heads x
# T x T float32, materialised for the importance score) take at most this many bytes: a group
# of 32 x 256 tokens holds 100 MB of them, three times the EPYC's 32 MiB L3. On MiniLM (12
# heads) attention + score ran 1.14x faster at 32 x 256 in chunks of 2 rows (6 MiB; 4 rows:
# 1.03x), 1.07-1.10x at 32 x 128 in chunks of 2-8, no faster at 64 tokens (docs/RESULTS.md,
# session 26). Without pruning XLA fuses the attention whole (nothing materialises).
ATTENTION_BYTES = 8 << 20


def attention_rows(rows: int, length: int, heads: int, attention_bytes: int) -> int:
  """Rows of a group's attention chunk: the largest divisor of `rows` whose chunk's weights
  (chunk x heads x length^2 float32) fit in `attention_bytes` (at least 1; 0: no chunks)."""
  if attention_bytes <= 0:
    return rows
  # chunk_rows bounds rows x length; a row's weights are heads x length^2 x 4 bytes, so the
  # bound in its units is bytes / (4 heads length). At least 1: chunk_rows reads 0 as no chunks.
  return programs.chunk_rows(rows, length, max(1, attention_bytes // (4 * heads * length)))


def ffn_rows(tokens: int, ffn_tokens: int) -> int:
  """Tokens of a packed FFN chunk: the largest divisor of `tokens` within `ffn_tokens`; all if
  ffn_tokens is 0 or the divisor is under half of min(tokens, ffn_tokens) (a loop of tiny ones)."""
  r = programs.chunk_rows(tokens, 1, ffn_tokens)
  return tokens if 2 * r < min(tokens, ffn_tokens) else r


def group_buckets(batch_buckets: Sequence[int], length_buckets: Sequence[int],
                  token_budget: int) -> tuple[int, ...]:
  """The schedule's group sizes: the batch buckets, then doublings of the largest while
  `token_budget` tokens hold that many rows at the shortest length bucket (0: no doublings)."""
  out = sorted({int(b) for b in batch_buckets})
  while token_budget > 0 and out[-1] * 2 * min(length_buckets) <= token_budget:
    out.append(out[-1] * 2)
  return tuple(out)


def group_rows(nt: int, *, batch_buckets: Sequence[int], min_rows: int, token_budget: int) -> int:
  """The most rows a group at length bucket `nt` holds: the largest of `batch_buckets` (the
  group sizes, min_rows among them) within max(min_rows, token_budget // nt)."""
  if min_rows not in batch_buckets:
    raise ValueError(f'min_rows {min_rows} is not one of the group sizes {tuple(batch_buckets)}')
  want = max(min_rows, token_budget // nt if token_budget > 0 else 0)
  return max(b for b in batch_buckets if b <= want)


def groups(rows: np.ndarray, count_N: np.ndarray, *, length_buckets: Sequence[int],
           batch_buckets: Sequence[int], min_rows: int, token_budget: int):
  """[(rows of a call, batch bucket, length bucket)]: `rows` by count (longest first), each group
  at the length bucket of its first row and of group_rows rows; once fewer rows are left than
  that, of the first size batching.plan_batches picks for them (a call: CALL_TOKENS tokens)."""
  lbs, bbs = sorted(length_buckets), sorted(batch_buckets)
  rows = rows[np.argsort(-count_N[rows], kind='stable')]
  out, i = [], 0
  while i < len(rows):
    nt = batching.bucket_length(max(int(count_N[rows[i]]), 1), lbs)
    cap = group_rows(nt, batch_buckets=bbs, min_rows=min_rows, token_budget=token_budget)
    left = len(rows) - i
    nb = cap if left >= cap else batching.plan_batches(
        left, [b for b in bbs if b <= cap], max(1, CALL_TOKENS // nt))[0]
    g = rows[i:i + nb]
    i += len(g)
    out.append((g, nb, nt))
  return out


def pack_grid(capacity: int) -> tuple[int, ...]:
  """Token counts the packed FFN of a group of `capacity` (batch x length bucket) places runs
  at: multiples of max(PACK_TOKENS, capacity / 16) up to the capacity, which ends the grid."""
  q = max(PACK_TOKENS, -(-capacity // 16))
  return tuple(sorted({min(capacity, k * q) for k in range(1, capacity // q + 2)}))

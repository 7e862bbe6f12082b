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

# A layer's rows are cut into calls with the least padded tokens plus this many tokens a call
# (batching.plan_calls, as Engine.route plans the fused calls): a call costs its host dispatch
# (0.3-0.5 ms measured on the busy CPU) and small calls run fewer MACs a second. Against
# taking the most rows a call holds until the last ones (the rule before), mr's test split at
# batch 32 ran FastBERT (τ 0.3) 1.01-1.02x faster at 128 (its padded MACs 1.149 -> 1.123 of the
# real ones, as many calls) and 1.03x at 64 (1.106, 17 more calls); mp 1.00x at 128, 0.98x at
# 64 (docs/RESULTS.md, session 30).
CALL_TOKENS = 128

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
# session 26). Without pruning XLA fuses the attention (nothing materialises): ATTENTION_TOKENS.
ATTENTION_BYTES = 8 << 20

# Without pruning nothing materialises, but a whole group's queries, keys and values (3 x tokens
# x D) outrun the cache at long rows: its attention runs in row chunks of at most
# this many tokens. A layer without pruning, against the dense program's layer at `bbc`'s
# shapes: 32 x 256 whole 1.015-1.052, in chunks of 2048 tokens 0.991-1.006 (three runs); 32 x
# 128 1.018 whole, 1.002 (docs/RESULTS.md, session 30).
ATTENTION_TOKENS = 2048

_NEVER = 1 << 40  # a length no call runs at: plan_calls never picks it


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
  """[(rows of a call, batch bucket, length bucket)]: `rows` by count (longest first), cut into
  calls with the least padded tokens (batch bucket x length bucket of its first row) plus
  CALL_TOKENS a call (batching.plan_calls), each of at most group_rows rows at its length."""
  lbs, bbs = sorted(length_buckets), sorted(batch_buckets)
  rows = rows[np.argsort(-count_N[rows], kind='stable')]

  def length_of(b, n):  # a group larger than its length's group_rows is never picked
    nt = batching.bucket_length(n, lbs)
    cap = group_rows(nt, batch_buckets=bbs, min_rows=min_rows, token_budget=token_budget)
    return nt if b <= cap else _NEVER

  plan = batching.plan_calls(np.maximum(count_N[rows], 1), bbs, length_of, CALL_TOKENS)
  return [(rows[i:i + b], b, t) for i, b, t in plan]


def pack_grid(capacity: int) -> tuple[int, ...]:
  """Token counts the packed FFN of a group of `capacity` (batch x length bucket) places runs
  at: multiples of max(PACK_TOKENS, capacity / 16) up to the capacity, which ends the grid."""
  q = max(PACK_TOKENS, -(-capacity // 16))
  return tuple(sorted({min(capacity, k * q) for k in range(1, capacity // q + 2)}))

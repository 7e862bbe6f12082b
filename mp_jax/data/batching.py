"""Examples -> token rows (Encoded) -> padded batches of static (batch, length bucket) shapes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from mp_jax.data import splits, tokenization


@dataclasses.dataclass
class Encoded:
  """Tokenized examples: per-row int32 id/type arrays, labels (N,), lengths (N,)."""

  ids: list[np.ndarray]
  type_ids: list[np.ndarray]
  labels: np.ndarray
  lengths: np.ndarray
  pad_id: int = 0

  def __len__(self) -> int:
    return len(self.ids)


def encode(tokenizer, examples: Sequence, max_len: int) -> Encoded:
  """Tokenizes examples ([CLS] a [SEP] (b [SEP]), truncated to max_len)."""
  rows = tokenization.encode_rows(tokenizer, [ex.text_a for ex in examples],
                                  [ex.text_b for ex in examples], max_len)
  return Encoded(
      ids=[r[0] for r in rows], type_ids=[r[1] for r in rows],
      labels=np.asarray([ex.label for ex in examples], np.int32),
      lengths=np.asarray([len(r[0]) for r in rows], np.int32),
      pad_id=int(getattr(tokenizer, 'pad_id', 0)))


def num_batches(n: int | Encoded, batch_size: int, drop_last: bool = False) -> int:
  """Number of batches per epoch."""
  n = len(n) if isinstance(n, Encoded) else int(n)
  return n // batch_size if drop_last else math.ceil(n / batch_size)


def epoch_order(n: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
  """Row order of one epoch: a permutation fixed by (seed, epoch), or 0..n-1."""
  return splits.rng(seed, 'epoch', epoch).permutation(n) if shuffle else np.arange(n)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """Smallest bucket >= length."""
  for b in buckets:
    if b >= length:
      return int(b)
  raise ValueError(f'row of {length} tokens exceeds the largest bucket {buckets[-1]}')


def plan_calls(lengths_N: np.ndarray, batch_buckets: Sequence[int],
               length_of: Callable[[int, int], int],
               call_tokens: int = 0) -> list[tuple[int, int, int]]:
  """Calls covering rows sorted longest first, [(first row, batch bucket, length)], with the
  least padded tokens (batch x length a call) plus `call_tokens` a call.

  length_of(b, n): the length a call of b rows whose longest has n tokens runs at. A call takes
  as many of the next rows as its batch bucket holds (more never lengthen it: they are shorter),
  so the plan is a shortest path over row positions, one step per batch bucket. Ties go to the
  larger bucket (fewer calls).
  """
  lengths_N = np.asarray(lengths_N, np.int64)
  n = len(lengths_N)
  bbs = sorted({int(b) for b in batch_buckets}, reverse=True)
  if n == 1:  # one call, no search (a single request's predict: every us counts)
    t_of = {b: int(length_of(b, int(lengths_N[0]))) for b in bbs}
    b = min(bbs, key=lambda b: b * t_of[b])  # the first of equal costs: the larger bucket
    return [(0, b, t_of[b])]
  if n and np.any(np.diff(lengths_N) > 0):
    raise ValueError('plan_calls: rows must be sorted longest first')
  # A call's cost from each row on, per bucket: length_of asked once per (bucket, distinct length).
  uniq, inv = np.unique(lengths_N, return_inverse=True)
  t_of = {b: [int(length_of(b, int(u))) for u in uniq] for b in bbs}
  step = [(b, (b * np.asarray(t_of[b], np.int64)[inv] + call_tokens).tolist()) for b in bbs]
  # The shortest path from the end: plain lists, the loop is the planner's whole cost (a layer
  # of the layer-major schedule plans ~1000 rows on the host between two waits).
  cost, pick = [0] * (n + bbs[0] + 1), [0] * n  # past the last row: nothing left, cost 0
  for i in range(n - 1, -1, -1):
    best = None
    for b, c_i in step:
      c = c_i[i] + cost[i + b]
      if best is None or c < best:
        best, pick[i] = c, b
    cost[i] = best
  out, i = [], 0
  while i < n:
    b = pick[i]
    out.append((i, b, t_of[b][inv[i]]))
    i += b
  return out


def upto(buckets: Sequence[int], top: int) -> tuple[int, ...]:
  """Buckets below `top`, plus `top` (sorted, unique): the shapes a `top`-sized input can use.

  The one rule for lengths (configured buckets up to max_seq_length) and for batches (up to a
  batch size), and for the working shapes a compiled program shrinks to.
  """
  return tuple(sorted({int(b) for b in buckets if b < top} | {int(top)}))


def batches(encoded: Encoded, batch_size: int, *, buckets: Sequence[int], shuffle: bool = False,
            seed: int = 0, epoch: int = 0, start_batch: int = 0,
            drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """Yields padded batch dicts (see docs/DESIGN.md) with static (batch_size, bucket) shapes.

  A short last batch (when not `drop_last`) is filled to `batch_size` with copies of its first
  row carrying weight 0, so padding rows are well-formed inputs that never count.
  """
  buckets = tuple(int(b) for b in buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1 or batch_size < 1:
    raise ValueError(f'need batch_size >= 1 and increasing buckets, got {batch_size}, {buckets}')
  if len(encoded) and int(encoded.lengths.max()) > buckets[-1]:
    raise ValueError(f'longest row ({int(encoded.lengths.max())} tokens) exceeds the largest '
                     f'bucket {buckets[-1]}')
  order = epoch_order(len(encoded), shuffle=shuffle, seed=seed, epoch=epoch)
  for b in range(max(start_batch, 0), num_batches(len(encoded), batch_size, drop_last)):
    yield _make_batch(encoded, order[b * batch_size:(b + 1) * batch_size], batch_size, buckets)


def _make_batch(enc: Encoded, rows: np.ndarray, batch_size: int,
                buckets: Sequence[int]) -> dict[str, np.ndarray]:
  t = bucket_length(int(enc.lengths[rows].max()), buckets)
  ids_BxT = np.full((batch_size, t), enc.pad_id, np.int32)
  types_BxT = np.zeros((batch_size, t), np.int32)
  mask_BxT = np.zeros((batch_size, t), np.int32)
  weights_B = np.zeros((batch_size,), np.float32)
  weights_B[:len(rows)] = 1.0
  rows_B = np.concatenate([rows, np.full(batch_size - len(rows), rows[0], rows.dtype)])
  for i, r in enumerate(rows_B):
    n = int(enc.lengths[r])
    ids_BxT[i, :n] = enc.ids[r]
    types_BxT[i, :n] = enc.type_ids[r]
    mask_BxT[i, :n] = 1
  return {'input_ids': ids_BxT, 'token_type_ids': types_BxT, 'attention_mask': mask_BxT,
          'labels': enc.labels[rows_B].astype(np.int32), 'weights': weights_B}


def as_rows(inputs) -> list[tuple[np.ndarray, np.ndarray]]:
  """(ids, type_ids) per request from Encoded, a batch dict, or a sequence of rows."""
  if hasattr(inputs, 'ids') and hasattr(inputs, 'type_ids'):  # Encoded
    return [(np.asarray(i), np.asarray(t)) for i, t in zip(inputs.ids, inputs.type_ids)]
  if isinstance(inputs, dict):
    ids = np.asarray(inputs['input_ids'])
    types = np.asarray(inputs.get('token_type_ids', np.zeros_like(ids)))
    mask = np.asarray(inputs.get('attention_mask', np.ones_like(ids))).astype(bool)
    if (np.diff(mask.astype(np.int8), axis=1) > 0).any():
      raise ValueError('attention_mask rows must be a prefix of ones (right padding)')
    return [(ids[i, :n], types[i, :n]) for i, n in enumerate(mask.sum(1))]
  rows = []
  for r in inputs:
    ids, types = (r, None) if not isinstance(r, tuple) and np.ndim(r) == 1 else r
    ids = np.asarray(ids)
    rows.append((ids, np.zeros_like(ids) if types is None else np.asarray(types)))
  return rows

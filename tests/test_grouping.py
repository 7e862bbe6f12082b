"""The schedule's sizing rules: groups of a layer's rows, group sizes, attention and FFN chunks."""

import functools

import numpy as np
import pytest

from mp_jax.serving import grouping


def _cost(out):
  """What groups minimises: padded tokens plus CALL_TOKENS a call."""
  return sum(nb * nt + grouping.CALL_TOKENS for _, nb, nt in out)


def test_groups_sort_cap_and_bucket():
  count_N = np.asarray([3, 17, 9, 64, 16, 2, 40])
  out = grouping.groups(np.asarray([0, 1, 2, 4, 5, 6]), count_N, length_buckets=(8, 16, 32, 64),
                        batch_buckets=(1, 2, 4), min_rows=4, token_budget=0)
  # Longest first, each call at the bucket of its first row. The long row (40 tokens) and the
  # next take a call of 2 at 64; the other four fit 16 tokens. Taking the most rows a call holds
  # (4 at 64, then 2 at 8) pads 272 tokens against these 192, in as many calls. Row 3 is not in
  # the set and never appears.
  assert [(g.tolist(), nb, nt) for g, nb, nt in out] == [([6, 1], 2, 64), ([4, 2, 0, 5], 4, 16)]


def test_short_rows_make_larger_groups():
  """Up to token_budget tokens a group where rows are short (in doublings of the largest batch
  bucket), never more rows than that bucket where they are long."""
  lbs = (8, 16, 32, 64)
  assert grouping.group_buckets((1, 2, 4), lbs, 64) == (1, 2, 4, 8)  # 8 rows x 8 tokens
  assert grouping.group_buckets((1, 2, 4), lbs, 0) == (1, 2, 4)
  count_N = np.asarray([40] + [5] * 14)
  out = grouping.groups(np.arange(15), count_N, length_buckets=lbs,
                        batch_buckets=(1, 2, 4, 8), min_rows=4, token_budget=64)
  # The long row alone (a call of 4 at 64 would pad 3 rows of 5 tokens to 64), then the short
  # ones in groups of 8 rows at 8 tokens: 6 of them pad to 8 rather than make two calls.
  assert [(len(g), nb, nt) for g, nb, nt in out] == [(1, 1, 64), (8, 8, 8), (6, 8, 8)]
  assert sorted(np.concatenate([g for g, _, _ in out]).tolist()) == list(range(15))


def _cheapest(counts, lbs, bbs, cap):
  """The least padded tokens + CALL_TOKENS a call over every cut of rows sorted longest first
  into calls of any k rows at any batch bucket >= k within `cap` (brute force)."""
  @functools.cache
  def best(i):
    if i == len(counts):
      return 0
    nt = min(b for b in lbs if b >= counts[i])
    return min(nb * nt + grouping.CALL_TOKENS + best(i + k) for nb in bbs if nb <= cap(nt)
               for k in range(1, min(nb, len(counts) - i) + 1))
  return best(0)


def test_groups_are_the_cheapest_cut():
  """Against every way to cut the rows into calls: the least cost, every row once, in count
  order, no call over its length's group_rows."""
  rng = np.random.default_rng(0)
  lbs, bbs = (2, 4, 8, 16, 32), (1, 2, 4, 8, 16)
  cap = lambda nt: grouping.group_rows(nt, batch_buckets=bbs, min_rows=4, token_budget=32)
  for _ in range(40):
    count_N = rng.integers(0, 33, int(rng.integers(1, 16)))  # 0: read as 1 token
    out = grouping.groups(np.arange(len(count_N)), count_N, length_buckets=lbs,
                          batch_buckets=bbs, min_rows=4, token_budget=32)
    counts = tuple(sorted(count_N.tolist(), reverse=True))
    assert _cost(out) == _cheapest(counts, lbs, bbs, cap)
    rows = np.concatenate([g for g, _, _ in out])
    assert sorted(rows.tolist()) == list(range(len(count_N)))
    assert count_N[rows].tolist() == list(counts)
    for g, nb, nt in out:
      assert len(g) <= nb <= cap(nt) and count_N[g].max() <= nt


def test_the_pack_grid():
  """Multiples of max(64, capacity / 16) up to the capacity, which ends the grid (<= 16)."""
  assert grouping.pack_grid(40) == (40,)
  assert grouping.pack_grid(100) == (64, 100)
  assert grouping.pack_grid(1024) == tuple(range(64, 1025, 64))
  assert grouping.pack_grid(2048) == tuple(range(128, 2049, 128))
  assert grouping.pack_grid(3000) == (*range(188, 3000, 188), 3000)
  assert all(len(grouping.pack_grid(c)) <= 16 for c in range(1, 5000))


def test_attention_chunks_fit_the_byte_bound():
  """A chunk's weights (rows x heads x T^2 float32) fit the bound, in the fewest chunks that
  divide the group; 0 or a group that fits: one chunk; never less than a row."""
  mib = 1 << 20
  assert grouping.attention_rows(32, 256, 12, 8 * mib) == 2  # 6 MiB a chunk (100 MB whole)
  assert grouping.attention_rows(32, 128, 12, 8 * mib) == 8
  assert grouping.attention_rows(32, 64, 12, 8 * mib) == 32
  assert grouping.attention_rows(32, 256, 12, 0) == 32
  assert grouping.attention_rows(8, 256, 12, 1) == 1
  for rows, t in ((24, 40), (512, 8), (1, 512)):
    r = grouping.attention_rows(rows, t, 4, 100_000)
    assert rows % r == 0 and (r == 1 or r * 4 * t * t * 4 <= 100_000)
    assert r == rows or 2 * r * 4 * t * t * 4 > 100_000 or rows % (2 * r)


def test_ffn_rows():
  assert grouping.ffn_rows(8192, 1024) == 1024 and grouping.ffn_rows(1536, 1024) == 768
  assert grouping.ffn_rows(512, 1024) == 512 and grouping.ffn_rows(512, 0) == 512
  assert grouping.ffn_rows(1031, 1024) == 1031  # a prime: 1-token chunks would be a long loop
  assert grouping.ffn_rows(2 * 499, 1024) == 998 and grouping.ffn_rows(2 * 521, 1024) == 521


def test_min_rows_is_a_group_size():
  with pytest.raises(ValueError, match='min_rows 4 is not one of the group sizes'):
    grouping.group_rows(8, batch_buckets=(1, 8), min_rows=4, token_budget=0)

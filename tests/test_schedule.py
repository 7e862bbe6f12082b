"""Layer-major schedule (SPEC §6): grouping, waves, and answers equal to the reference's."""

import numpy as np
import pytest

from mp_jax.serving import engine as engine_lib
from mp_jax.serving import schedule
from tests import test_engine as te

params, thresholds = te.params, te.thresholds  # the engine tests' fixtures, shared


def test_groups_sort_cap_and_bucket():
  count_N = np.asarray([3, 17, 9, 64, 16, 2, 40])
  out = schedule.groups(np.asarray([0, 1, 2, 4, 5, 6]), count_N, length_buckets=(8, 16, 32, 64),
                        batch_buckets=(1, 2, 4), max_rows=4, chunk_tokens=0)
  # Longest first, runs of at most max_rows; each run at the bucket of its longest row and the
  # smallest batch bucket holding it. Row 3 is not in the set and never appears.
  assert [(g.tolist(), nb, nt) for g, nb, nt in out] == [([6, 1, 4, 2], 4, 64), ([0, 5], 2, 8)]
  capped = schedule.groups(np.arange(7), count_N, length_buckets=(8, 16, 32, 64),
                           batch_buckets=(1, 2, 4), max_rows=4, chunk_tokens=64)
  assert [len(g) for g, _, _ in capped] == [1, 1, 2, 3]  # 64 tokens a call: 1 row at 64, ...


def test_waves_and_order_give_the_same_answers(params, thresholds):
  """A request set split into waves of 3 rows (longest first) answers as one wave does, in the
  caller's order; both equal the reference (exits and pruning both happen)."""
  p = {**params, 'thresholds': thresholds[0.25]}
  rows = te.make_rows(31, 11)
  ref = te.reference(p, rows)
  tau = float(np.quantile(ref['u'], 0.3))
  kw = dict(prune=True, exits=True, length_buckets=te.LENGTHS, batch_buckets=te.BATCHES,
            compiler_options=te.FAST_COMPILE)
  eng = engine_lib.Engine(te.CFG, p, **kw)
  whole = eng.predict(rows, tau=tau)
  te.assert_same(whole, te.reference(p, rows, tau=tau))
  assert len(set(whole['exit_layer'].tolist())) >= 2 and (whole['n_ffn'] < whole['n_attn']).any()
  eng.schedule = schedule.Schedule(te.CFG, prune=True, exits=True, length_buckets=te.LENGTHS,
                                   batch_buckets=te.BATCHES, compiler_options=te.FAST_COMPILE,
                                   wave_rows=3)
  waves = eng.predict(rows, tau=tau)
  for k in ('labels', 'exit_layer', 'n_attn', 'n_ffn'):
    np.testing.assert_array_equal(waves[k], whole[k], err_msg=k)
  np.testing.assert_allclose(waves['logits'], whole['logits'], atol=1e-5)
  # The buffers are reused across calls (never re-zeroed): stale rows must not matter.
  again = eng.predict(rows[::-1], tau=tau)
  np.testing.assert_array_equal(again['exit_layer'], whole['exit_layer'][::-1])


def test_schedule_only_where_rows_leave_or_shrink(params):
  kw = dict(length_buckets=te.LENGTHS, batch_buckets=te.BATCHES)
  assert engine_lib.Engine(te.CFG, params, prune=False, exits=False, **kw).schedule is None
  assert engine_lib.Engine(te.CFG, params, schedule='fused', **kw).schedule is None
  assert engine_lib.Engine(te.CFG, params, prune=False, exits=True, **kw).schedule is not None
  with pytest.raises(ValueError, match=r"schedule must be one of \('layers', 'fused'\), got "
                     r"'layer'"):
    engine_lib.Engine(te.CFG, params, schedule='layer', **kw)

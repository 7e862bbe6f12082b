"""Layer-major schedule (SPEC §6): grouping, waves, and answers equal to the reference's."""

import jax
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


def _mixed_rows(seed):
  """8 long and 8 short requests: once long rows exit or shrink, groups mix the two, so short
  rows are read at longer buckets than they were embedded at."""
  return te.make_rows(seed, 8, min_len=50, max_len=64) + te.make_rows(seed + 1, 8, max_len=14)


def test_answers_ignore_what_the_buffers_held(params, thresholds):
  """Buffers full of junk (NaN-free noise, every token alive) from before the call, and waves of
  3 rows that reuse them: answers still equal the reference's, in the caller's order."""
  p = {**params, 'thresholds': thresholds[0.25]}
  rows = _mixed_rows(31)
  ref = te.reference(p, rows)
  tau = float(np.quantile(ref['u'], 0.4))
  ref = te.reference(p, rows, tau=tau)
  kw = dict(prune=True, exits=True, length_buckets=te.LENGTHS, batch_buckets=te.BATCHES,
            compiler_options=te.FAST_COMPILE, schedule_max_length=64)
  eng = engine_lib.Engine(te.CFG, p, **kw)
  assert len(set(ref['exit_layer'].tolist())) >= 2 and (ref['n_ffn'] < ref['n_attn']).any()
  for wave_rows in (0, 3):
    if wave_rows:
      eng.schedule = schedule.Schedule(te.CFG, prune=True, exits=True, wave_rows=wave_rows,
                                       length_buckets=te.LENGTHS, batch_buckets=te.BATCHES,
                                       compiler_options=te.FAST_COMPILE)
    h, a = eng.schedule._buffers_spec()
    noise = np.random.default_rng(0).normal(size=h.shape).astype(np.float32)
    eng.schedule._buffers = (jax.device_put(noise), jax.device_put(np.ones(a.shape, bool)))
    out = eng.predict(rows, tau=tau)
    te.assert_same(out, ref)
    assert eng.schedule.programs  # it ran layer-major
    perm = np.random.default_rng(wave_rows).permutation(len(rows))
    again = eng.predict([rows[i] for i in perm], tau=tau)  # on what the first call left
    te.assert_same(again, {k: v[perm] for k, v in ref.items() if k != 'u'})


def test_schedule_only_where_rows_can_leave(params):
  kw = dict(length_buckets=te.LENGTHS, batch_buckets=te.BATCHES)
  assert engine_lib.Engine(te.CFG, params, prune=False, exits=False, **kw).schedule is None
  assert engine_lib.Engine(te.CFG, params, prune=True, exits=False, **kw).schedule is None
  assert engine_lib.Engine(te.CFG, params, schedule='fused', **kw).schedule is None
  assert engine_lib.Engine(te.CFG, params, schedule_max_length=0, **kw).schedule is None
  eng = engine_lib.Engine(te.CFG, params, prune=False, exits=True, **kw)
  assert eng.schedule is not None
  # tau 0: no row can exit, the dense program runs (exits alone: its compile count grows, not
  # the schedule's nor the fused programs').
  eng.predict(te.make_rows(1, 5), tau=0.0)
  assert eng.headless.programs and not eng.programs and not eng.schedule.programs
  eng.predict(te.make_rows(1, 5), tau=0.9)
  assert eng.schedule.programs
  with pytest.raises(ValueError, match=r"schedule must be one of \('layers', 'fused'\), got "
                     r"'layer'"):
    engine_lib.Engine(te.CFG, params, schedule='layer', **kw)

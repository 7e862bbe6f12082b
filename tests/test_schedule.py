"""Layer-major schedule (SPEC §6): programs, buffers, waves; answers equal to the reference."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mp_jax.model import bert
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import grouping, programs, schedule
from tests import test_engine as te

params, thresholds = te.params, te.thresholds  # the engine tests' fixtures, shared


def _copies_of(compiled, shape):
  """Instructions of a compiled program that copy an array of `shape` (e.g. 'f32[9,8,96]')."""
  return re.findall(rf'= {re.escape(shape)}\S* copy\(', compiled.as_text())


def test_the_layer_program_updates_the_row_buffer_in_place():
  """The layer programs write H (donated) in place: no copy of it, no temp its size (257 rows
  here, ~12x a call's own temps). The packed FFN's scatter into H stays outside its switch:
  inside a branch XLA:CPU copies the buffer it updates (the checks see that form's copy)."""
  cfg = te.CFG
  for prune, exits in ((True, True), (True, False), (False, True)):
    s = schedule.Schedule(cfg, prune=prune, exits=exits, length_buckets=(8,), batch_buckets=(4,),
                          wave_rows=256, compiler_options=te.FAST_COMPILE)
    h, _ = s._buffers_spec()
    h_shape = f'f32[{",".join(map(str, h.shape))}]'
    eng = engine_lib.Engine(cfg, bert.init_params(cfg), prune=prune, exits=exits,
                            length_buckets=(8,), batch_buckets=(4,), schedule_max_length=8)
    c = s.program(eng.params, 'layer', 4, 8)
    flat_shape = f'f32[{h.shape[0] * h.shape[1]},{h.shape[2]}]'  # H as the packed FFN writes it
    assert not _copies_of(c, h_shape) and not _copies_of(c, flat_shape), (prune, exits)
    assert c.memory_analysis().temp_size_in_bytes < h.size * 4, (prune, exits)

  def in_branch(h_NxTxD, idx, n):  # the form avoided: the scatter inside the switch's branches
    flat = h_NxTxD.reshape(-1, h_NxTxD.shape[-1])
    set_at = lambda m: lambda f: f.at[idx[:m]].set(f[idx[:m]] * 2.0)
    return lax.switch(n, [set_at(1), set_at(2)], flat).reshape(h_NxTxD.shape)
  avoided = jax.jit(in_branch, donate_argnums=0).lower(
      h, jax.ShapeDtypeStruct((2,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)).compile()
  assert _copies_of(avoided, flat_shape) or _copies_of(avoided, h_shape)
  assert avoided.memory_analysis().temp_size_in_bytes >= h.size * 4


def test_every_group_has_a_compiled_program():
  """keys() (what warmup compiles) covers every (batch, length) shape groups can ask for."""
  s = schedule.Schedule(te.CFG, prune=True, exits=True, length_buckets=(2, 4, 8, 16, 32, 64),
                        batch_buckets=(1, 8, 32), token_budget=1024)
  assert s.bbs == (1, 8, 32, 64, 128, 256, 512)
  keys = set(s.keys())
  rng = np.random.default_rng(0)
  seen = set()
  for n in (1, 7, 33, 100, 700):
    for hi in (2, 6, 20, 64):
      count_N = rng.integers(1, hi + 1, n)
      out = s.groups(np.arange(n), count_N)
      assert sorted(np.concatenate([g for g, _, _ in out]).tolist()) == list(range(n))
      for g, nb, nt in out:
        assert len(g) <= nb and count_N[g].max() <= nt
        assert {(k, nb, nt) for k in schedule.KINDS} <= keys
        seen.add((nb, nt))
  assert max(nb for nb, _ in seen) == 512 and (32, 64) in seen


def test_a_small_batch_bounds_a_groups_tokens():
  """With one row a batch, a group never holds more tokens than one row of the longest length
  (64): short rows still group (32 rows of 2 tokens), long ones run alone."""
  s = schedule.Schedule(te.CFG, prune=True, exits=False, length_buckets=(2, 4, 8, 16, 32, 64),
                        batch_buckets=(1,), token_budget=1024)
  assert s.bbs == (1, 2, 4, 8, 16, 32)
  programs = s.keys()  # what warmup compiles
  assert max(nb * nt for _, nb, nt in programs) == 64
  assert s.group_rows(2) == 32 and s.group_rows(64) == 1


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


def test_attention_in_row_chunks_answers_as_the_reference(params, thresholds):
  """Pruned groups whose attention and score run in row chunks (a bound of 16 KiB: one row a
  chunk at 32-64 tokens, 4 at 16) answer as the reference, and their programs do loop."""
  p = {**params, 'thresholds': thresholds[0.25]}
  rows = _mixed_rows(5)
  ref = te.reference(p, rows)
  tau = float(np.quantile(ref['u'], 0.4))
  ref = te.reference(p, rows, tau=tau)
  assert len(set(ref['exit_layer'].tolist())) >= 2 and (ref['n_ffn'] < ref['n_attn']).any()
  bound, heads = 16 << 10, te.CFG.num_heads
  for exits in (True, False):
    kw = dict(prune=True, exits=exits, length_buckets=te.LENGTHS, batch_buckets=te.BATCHES,
              compiler_options=te.FAST_COMPILE)
    eng = engine_lib.Engine(te.CFG, p, schedule_max_length=64, **kw)
    eng.schedule = schedule.Schedule(te.CFG, token_budget=eng.chunk_tokens,
                                     attention_bytes=bound, **kw)
    out = eng.predict(rows, tau=tau)
    want = ref if exits else te.reference(p, rows, prune=True, exits=False)
    te.assert_same(out, want)
    chunked = [(nb, nt) for kind, nb, nt in eng.schedule.programs
               if kind == 'layer' and grouping.attention_rows(nb, nt, heads, bound) < nb]
    assert chunked, eng.schedule.programs.keys()
    # The chunks are a loop in the compiled program (the same program unchunked has one less).
    whole = schedule.Schedule(te.CFG, token_budget=eng.chunk_tokens, attention_bytes=0, **kw)
    key = ('layer', *chunked[0])
    loops = [len(re.findall(r' while\(', s.program(eng.params, *key).as_text()))
             for s in (eng.schedule, whole)]
    assert loops[0] > loops[1], (key, loops)


@pytest.mark.parametrize('prune,exits,chunk', [(True, True, 'ffn'), (True, False, 'ffn'),
                                               (False, True, 'ffn'), (False, True, 'attention')])
def test_token_chunks_answer_as_the_reference(params, thresholds, prune, exits, chunk):
  """The FFN in chunks of about 16 tokens (packed kept tokens with pruning; whole rows, one at
  least, without), or unpruned attention in chunks of at most 16 tokens (whole rows, one at
  least), answers as the reference; the chunked programs loop where whole ones do not."""
  p = {**params, 'thresholds': thresholds[0.25]}
  rows = _mixed_rows(6)
  tau = te.pick_tau(te.reference(p, rows)['u'], 0.4) if exits else 0.0
  want = te.reference(p, rows, prune=prune, exits=exits, tau=tau)
  kw = dict(prune=prune, exits=exits, length_buckets=te.LENGTHS, batch_buckets=te.BATCHES,
            compiler_options=te.FAST_COMPILE)
  eng = engine_lib.Engine(te.CFG, p, schedule_max_length=64, **kw)
  sizes = lambda n: {'ffn_tokens': 0, 'attention_tokens': 0, f'{chunk}_tokens': n}
  make = lambda n: schedule.Schedule(te.CFG, token_budget=eng.chunk_tokens, attention_bytes=0,
                                     **sizes(n), **kw)
  eng.schedule, whole = make(16), make(0)
  te.assert_same(eng.predict(rows, tau=tau), want)
  key = max((k for k in eng.schedule.programs if k[0] == 'layer'), key=lambda k: k[1] * k[2])
  assert programs.chunk_rows(key[1], key[2], 16) < key[1], key  # a chunked group ran
  loops = [len(re.findall(r' while\(', s.program(eng.params, *key).as_text()))
           for s in (eng.schedule, whole)]
  assert loops[0] > loops[1], (key, loops)


def test_pruning_alone_runs_layer_major(params, thresholds):
  """LTP's engine (pruning, no exits) runs several short requests layer-major, in groups larger
  than its largest batch bucket, and answers as the reference does."""
  p = {**params, 'thresholds': thresholds[0.5]}
  eng = engine_lib.Engine(te.CFG, p, prune=True, exits=False, length_buckets=te.LENGTHS,
                          batch_buckets=te.BATCHES, compiler_options=te.FAST_COMPILE,
                          schedule_max_length=64, chunk_tokens=256)
  rows = te.make_rows(7, 16, max_len=40)
  out = eng.predict(rows)
  te.assert_same(out, te.reference(p, rows, prune=True, exits=False))
  assert (out['n_ffn'] < out['n_attn']).any()
  assert max(nb for _, nb, _ in eng.schedule.programs) > max(te.BATCHES)
  assert not eng.programs  # no fused program ran


def test_schedule_where_rows_can_leave_or_shrink(params):
  kw = dict(length_buckets=te.LENGTHS, batch_buckets=te.BATCHES)
  assert engine_lib.Engine(te.CFG, params, prune=False, exits=False, **kw).schedule is None
  assert engine_lib.Engine(te.CFG, params, prune=True, exits=False, **kw).schedule is not None
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

"""Compiled engine == masked reference model (SPEC §6), no recompilation, export, modes."""

import gc
import re
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mp_jax.data import batching
from mp_jax.evaluation import timing
from mp_jax.model import bert, exit_plan
from mp_jax.model import config as model_config
from mp_jax.model import exits as exits_lib
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import export as export_lib
from mp_jax.serving import programs
from tests import tiny

CFG = model_config.ModelConfig(vocab_size=100, hidden_size=32, num_layers=4, num_heads=4,
                               intermediate_size=64, max_position_embeddings=128, max_seq_length=64,
                               num_labels=3, exit_width=16)
L, REF_B, REF_T = CFG.num_layers, 16, 64
LENGTHS, BATCHES = (16, 64), (2, 8)
PRUNE_QUANTILES = (0.0, 0.25, 0.5)
# Halves XLA:CPU compile time (runs ~1.7x slower: irrelevant for a tiny model; same semantics).
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def make_rows(seed, n, max_len=REF_T, min_len=2):
  """n random requests: [CLS]=1 first, ids in 2..99, random token types."""
  rng = np.random.default_rng(seed)
  rows = []
  for length in rng.integers(min_len, max_len + 1, n):
    ids = rng.integers(2, CFG.vocab_size, length).astype(np.int32)
    ids[0] = 1
    rows.append((ids, (np.arange(length) > length // 2).astype(np.int32)))
  return rows


def pad(rows, b=REF_B, t=REF_T):
  ids, types, mask = (np.zeros((b, t), np.int32) for _ in range(3))
  for i, (r_ids, r_types) in enumerate(rows):
    ids[i, :len(r_ids)], types[i, :len(r_ids)], mask[i, :len(r_ids)] = r_ids, r_types, 1
  return ids, types, mask


@jax.jit
def _ref_hard(params, ids, types, mask):
  return bert.MagicPyramid(CFG).apply({'params': params}, ids, types, mask, pruning='hard',
                                      exits=True)


@jax.jit
def _ref_none(params, ids, types, mask):
  return bert.MagicPyramid(CFG).apply({'params': params}, ids, types, mask, pruning='none',
                                      exits=True)


def reference(params, rows, *, prune=True, exits=True, tau=0.0):
  """The masked full-shape model + exits.exit_layers, at one padded shape (one compile)."""
  assert len(rows) <= REF_B
  logits, aux = (_ref_hard if prune else _ref_none)(params, *pad(rows))
  if exits:
    exit_B, logits = exits_lib.exit_layers(aux['exit_logits'], logits, tau)
  else:
    exit_B = np.full((REF_B,), L)
  n = len(rows)
  exit_B, logits = np.asarray(exit_B)[:n], np.asarray(logits)[:n]
  ran_NxL = np.arange(L)[None] < exit_B[:, None]  # the engine records executed layers only
  return {'labels': logits.argmax(-1), 'logits': logits, 'exit_layer': exit_B,
          'n_attn': np.asarray(aux['n_attn']).T[:n] * ran_NxL,
          'n_ffn': np.asarray(aux['n_ffn']).T[:n] * ran_NxL,
          'u': np.asarray(exits_lib.uncertainty(aux['exit_logits']))[:, :n]}


def assert_same(out, ref):
  np.testing.assert_array_equal(out['exit_layer'], ref['exit_layer'])
  np.testing.assert_array_equal(out['labels'], ref['labels'])
  np.testing.assert_allclose(out['logits'], ref['logits'], atol=1e-4, rtol=0)
  np.testing.assert_array_equal(out['n_attn'], ref['n_attn'])
  np.testing.assert_array_equal(out['n_ffn'], ref['n_ffn'])


def pick_tau(u_ExN, frac):
  """A tau between two observed uncertainties (far from both), or 0 / 1, chosen by frac."""
  u = np.unique(u_ExN)
  mids = [(a + b) / 2 for a, b in zip(u[:-1], u[1:]) if b - a > 1e-4]
  cands = [0.0, *mids, 1.0]
  return float(cands[int(round(frac * (len(cands) - 1)))])


def random_params(cfg, seed=0):
  """Random params of bert.init_params' structure, drawn with numpy.

  bert.init_params compiles one threefry program per initializer (8-15 s on 2 busy cores).
  """
  ids = np.zeros((1, 4), np.int32)
  shapes = jax.eval_shape(lambda: bert.MagicPyramid(cfg).init(
      jax.random.PRNGKey(0), ids, ids, ids + 1, exits=True))['params']
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if 'LayerNorm' in name:
      return np.full(s.shape, 'scale' in name, np.float32)
    if name.endswith("['bias']"):
      return rng.normal(0, 0.02, s.shape).astype(np.float32)
    fan_in = s.shape[0] if name.endswith("['kernel']") else 1
    return rng.normal(0, fan_in ** -0.5, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope='module')
def params():
  return random_params(CFG)


@pytest.fixture(scope='module')
def thresholds(params):
  """Per-layer thresholds that prune about q of the alive tokens at every layer, per q."""
  rows = make_rows(123, REF_B)
  out = {}
  for q in PRUNE_QUANTILES:
    th = np.full((L,), -1.0, np.float32)  # -1 < every score: keep all
    for l in range(L if q > 0 else 0):  # calibrate layer by layer under hard pruning
      _, aux = _ref_hard({**params, 'thresholds': th}, *pad(rows))
      alive = np.asarray(aux['masks'][l - 1] if l else pad(rows)[2]).astype(bool)
      s = np.sort(np.asarray(aux['scores'][l])[alive])
      k = int(q * len(s))
      th[l] = (s[k] + s[k + 1]) / 2  # midway between two scores: no ties
    out[q] = th
  return out


@pytest.fixture(scope='module', params=engine_lib.SCHEDULES)
def both(params, request):
  """Pruning + exits engine, layer-major (many rows) and fused (every request set) alike."""
  return engine_lib.Engine(CFG, params, prune=True, exits=True, length_buckets=LENGTHS,
                           batch_buckets=BATCHES, compiler_options=FAST_COMPILE,
                           schedule=request.param, schedule_max_length=64)


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(n=st.integers(1, 12), max_len=st.sampled_from([12, 40, 64]), seed=st.integers(0, 999),
       q=st.sampled_from(PRUNE_QUANTILES), tau_frac=st.floats(0.0, 1.0),
       heads=st.none() | st.lists(st.booleans(), min_size=L - 1, max_size=L - 1))
def test_engine_matches_reference(both, params, thresholds, n, max_len, seed, q, tau_frac, heads):
  """Any rows, thresholds and tau, with every head or an exit plan's subset of them."""
  p = {**params, 'thresholds': thresholds[q]}
  rows = make_rows(seed, n, max_len)
  tau = pick_tau(reference(p, rows)['u'], tau_frac)
  both.set_params(p)
  both.plan = None if heads is None else tiny.FixedHeads(heads)
  try:
    out = both.predict(rows, tau=tau)
  finally:
    both.plan = None
  assert_same(out, reference(p, rows, tau=exit_plan.halts(tau, L, heads)))
  if heads is not None:  # a skipped head never answers
    early = out['exit_layer'] < L
    assert np.asarray(heads)[out['exit_layer'][early] - 1].all()


def test_pruning_and_exits_both_happen(both, params, thresholds):
  p = {**params, 'thresholds': thresholds[0.25]}
  rows = make_rows(7, 12)
  ref = reference(p, rows)
  tau = float(np.quantile(ref['u'], 0.3))
  both.set_params(p)
  out = both.predict(rows, tau=tau)
  assert_same(out, reference(p, rows, tau=tau))
  assert len(set(out['exit_layer'].tolist())) >= 2  # a mix of exit layers
  assert (out['n_ffn'][:, 0] < out['n_attn'][:, 0]).any()  # tokens were removed
  out0 = both.predict(rows, tau=0.0)  # no head can fire (and none runs)
  assert (out0['exit_layer'] == L).all()
  assert_same(out0, reference(p, rows, tau=0.0))


def test_no_recompilation_after_warmup(both, params, thresholds):
  secs = both.warmup()
  assert set(secs) == {(b, t) for b in BATCHES for t in LENGTHS}
  before = (both.num_compiles, both.num_traces, timing.backend_compiles())
  rng = np.random.default_rng(0)
  for i, (n, max_len) in enumerate([(1, 5), (3, 64), (9, 20), (17, 64), (2, 16), (30, 33)]):
    both.set_params({**params, 'thresholds': thresholds[PRUNE_QUANTILES[i % 3]]})
    out = both.predict(make_rows(100 + i, n, max_len), tau=float(rng.uniform(0.5, 1.0)))
    assert out['logits'].shape == (n, CFG.num_labels)
  assert (both.num_compiles, both.num_traces, timing.backend_compiles()) == before


@pytest.mark.parametrize('prune,exits', [(True, True), (False, True), (True, False)])
def test_unrolled_programs_match_the_reference(params, thresholds, prune, exits):
  """make_forward's one-row form (unroll_max_rows: the layers over the per-layer weights, each
  under a lax.cond, at the input's shape, no while loop, no switch) answers as the reference
  does, whatever layer a row exits at; and so with 8 rows, some exited while others go on."""
  p = {**params, 'thresholds': thresholds[0.25 if prune else 0.0]}
  sp = engine_lib.prepare(CFG, p).tree
  fwd = programs.make_forward(CFG, prune=prune, exits=exits, batch_buckets=(1, 8),
                              length_buckets=LENGTHS, unroll_max_rows=1)
  ops = programs.operands(sp, dense=False, unrolled=True)
  rows = make_rows(11, 10, max_len=16)
  run = jax.jit(fwd).lower(ops, *pad(rows[:1], 1, 16), np.zeros(L, np.float32)).compile(
      compiler_options=FAST_COMPILE)
  assert 'while' not in run.as_text()
  # No switch over buckets: every conditional is a layer's (or a head's) cond of two branches.
  branches = [len(m.split(',')) for m in re.findall(r'branch_computations=\{([^}]*)\}',
                                                     run.as_text())]
  assert branches and max(branches) == 2
  u = reference(p, rows, prune=prune)['u']
  seen = set()
  for frac in (0.15, 0.5, 0.85) if exits else (0.0,):
    tau = pick_tau(u, frac)
    halt_L = exit_plan.halts(tau if exits else 0.0, L)
    outs = [jax.tree.map(np.asarray, run(ops, *pad([r], 1, 16), halt_L)) for r in rows]
    out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    assert_same(out, reference(p, rows, prune=prune, exits=exits, tau=tau))
    seen |= set(out['exit_layer'].tolist())
  assert len(seen) >= (3 if exits else 1)
  if exits:  # more rows unrolled: rows leave the working batch between the layers' conds
    fwd8 = programs.make_forward(CFG, prune=prune, exits=exits, batch_buckets=(1, 8),
                                 length_buckets=LENGTHS, unroll_max_rows=8)
    tau = pick_tau(u, 0.5)
    out = jax.tree.map(np.asarray, jax.jit(fwd8)(ops, *pad(rows[:8], 8, 16),
                                                 exit_plan.halts(tau, L)))
    assert_same(out, reference(p, rows[:8], prune=prune, exits=exits, tau=tau))


def test_single_requests_run_the_one_row_form(params, thresholds):
  """A call of one request runs the one-row program at the fine bucket of its length (warmup
  compiled them all) and answers as the reference does, with every head or a plan's subset."""
  p = {**params, 'thresholds': thresholds[0.25]}
  fine = (8, 12, 16, 24, 32, 48, 64)
  eng = engine_lib.Engine(CFG, p, length_buckets=fine, batch_buckets=(1, 8),
                          compiler_options=FAST_COMPILE)
  eng.warmup()
  assert {(1, t) for t in fine} <= set(eng.programs)
  before = (eng.num_compiles, eng.num_traces, timing.backend_compiles())
  rows = make_rows(21, 12)
  u = reference(p, rows)['u']
  seen = set()
  for frac, heads in ((0.3, None), (0.6, [True, False, True])):
    tau = pick_tau(u, frac)
    eng.plan = None if heads is None else tiny.FixedHeads(heads)
    outs = [eng.predict([r], tau=tau) for r in rows]
    out = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
    assert_same(out, reference(p, rows, tau=exit_plan.halts(tau, L, heads)))
    assert (out['n_ffn'] < out['n_attn']).any()  # tokens were pruned
    seen |= set(out['exit_layer'].tolist())
  assert len(seen) >= 2
  assert (eng.num_compiles, eng.num_traces, timing.backend_compiles()) == before


def test_predict_inputs_and_order(both, params):
  both.set_params(params)
  rows = make_rows(5, 11)
  out = both.predict(rows, tau=0.9)
  ids, types, mask = pad(rows, b=11)
  for k, v in both.predict({'input_ids': ids, 'token_type_ids': types,
                            'attention_mask': mask}, tau=0.9).items():
    np.testing.assert_array_equal(v, out[k])
  perm = np.random.default_rng(0).permutation(11)
  shuffled = both.predict([rows[i] for i in perm], tau=0.9)
  np.testing.assert_array_equal(shuffled['exit_layer'], out['exit_layer'][perm])
  np.testing.assert_allclose(shuffled['logits'], out['logits'][perm], atol=1e-5)
  np.testing.assert_allclose(out['probs'].sum(-1), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match='largest length bucket'):
    both.predict(make_rows(0, 1, min_len=65, max_len=65))


@pytest.mark.parametrize('prune,exits', [(True, False), (False, True), (False, False)])
def test_modes(params, thresholds, prune, exits):
  p = {**params, 'thresholds': thresholds[0.5]}
  rows = make_rows(11, 8, min_len=17)  # one (8, 64) program
  eng = engine_lib.Engine(CFG, p, prune=prune, exits=exits, length_buckets=LENGTHS,
                          batch_buckets=(8,))
  ref = reference(p, rows, prune=prune, exits=exits)
  tau = pick_tau(ref['u'], 0.4) if exits else 0.5  # without exits tau is ignored
  out = eng.predict(rows, tau=tau)
  assert_same(out, reference(p, rows, prune=prune, exits=exits, tau=tau))
  if prune:
    assert (out['n_ffn'] < out['n_attn']).any()
  if not exits:
    assert (out['exit_layer'] == L).all()
  if not prune and not exits:  # neither == dense
    dense = engine_lib.DenseEngine(CFG, p, length_buckets=LENGTHS, batch_buckets=(8,))
    d = dense.predict(rows)
    np.testing.assert_allclose(out['logits'], d['logits'], atol=1e-5)
    for k in ('labels', 'exit_layer', 'n_attn', 'n_ffn'):
      np.testing.assert_array_equal(out[k], d[k])


def test_exits_alone_run_the_dense_program_when_no_head_runs(params):
  """Exits without pruning at tau <= 0, or under a plan that runs no head: the dense program
  answers (the fused loop never compiles); with a head running, the fused loop does."""
  rows = make_rows(21, 8, min_len=17)
  kw = dict(length_buckets=LENGTHS, batch_buckets=(8,), compiler_options=FAST_COMPILE)
  eng = engine_lib.Engine(CFG, params, prune=False, exits=True, schedule='fused', **kw)
  dense = engine_lib.DenseEngine(CFG, params, **kw).predict(rows)
  for tau, heads in ((0.0, None), (0.9, [False] * (L - 1))):
    eng.plan = heads and tiny.FixedHeads(heads)
    out = eng.predict(rows, tau=tau)
    assert not eng.programs and eng.headless.programs
    assert_same(out, reference(params, rows, prune=False, tau=exit_plan.halts(tau, L, heads)))
    np.testing.assert_allclose(out['logits'], dense['logits'], atol=1e-6)
  eng.plan = tiny.FixedHeads([False, True, False])
  ref = reference(params, rows, prune=False, tau=exit_plan.halts(1.0, L, eng.plan.heads_E))
  assert (ref['exit_layer'] == 2).all()  # tau 1 exits every row at the one head that runs
  assert_same(eng.predict(rows, tau=1.0), ref)
  assert eng.programs
  warm = engine_lib.Engine(CFG, params, prune=False, exits=True, **kw)
  warm.warmup()  # both program sets: switching between them never compiles
  before = (warm.num_compiles, warm.num_traces, warm.headless.num_traces,
            timing.backend_compiles())
  for tau, heads in ((0.0, None), (0.7, [True, False, True]), (0.7, [False] * (L - 1))):
    warm.plan = heads and tiny.FixedHeads(heads)
    warm.predict(rows, tau=tau)
  assert (warm.num_compiles, warm.num_traces, warm.headless.num_traces,
          timing.backend_compiles()) == before


def test_warmup_leaves_nothing_to_compile_for_the_first_layer_major_call(params):
  """A fresh engine's warm-up covers the schedule's row buffers too (their fill is a program)."""
  timing.release()  # forget programs of earlier tests: this engine's first call would reuse them
  eng = engine_lib.Engine(CFG, params, prune=True, exits=True, length_buckets=LENGTHS,
                          batch_buckets=BATCHES, compiler_options=FAST_COMPILE,
                          schedule_max_length=64)
  eng.warmup()
  before = timing.backend_compiles()
  eng.predict(make_rows(3, 5, max_len=40), tau=0.5)
  assert eng.schedule._buffers is not None and timing.backend_compiles() == before


@pytest.mark.parametrize('prune,exits', [(True, True), (False, True)])
def test_a_dropped_engine_goes_at_once(params, thresholds, prune, exits):
  """No reference cycle holds an engine (nor its schedule or headless engine): its compiled
  programs go when the last reference does, not when Python's cycle collector next runs."""
  p = {**params, 'thresholds': thresholds[0.5]}
  rows = make_rows(5, 8, max_len=16)
  eng = engine_lib.Engine(CFG, p, prune=prune, exits=exits, length_buckets=LENGTHS,
                          batch_buckets=(8,), compiler_options=FAST_COMPILE)
  eng.predict(rows, tau=0.5)  # the layer-major schedule's programs (several short rows)
  eng.predict(rows[:1], tau=0.5)  # a fused program
  eng.predict(rows, tau=0.0)  # without pruning: the headless dense engine
  assert eng.programs and eng.schedule.programs
  assert prune or eng.headless.programs
  gone = [weakref.ref(x) for x in (eng, eng.schedule, eng.headless) if x is not None]
  gc.disable()
  try:
    del eng
    assert [r() for r in gone] == [None] * len(gone)
  finally:
    gc.enable()


def test_programs_with_a_known_layer_read_its_weights_in_place():
  """The dense program and the schedule's layers use each layer's weights where they lie,
  with no temporary copy out of the stacked ones (7 MB a MiniLM layer per call: session 18)."""
  # Widths whose weight shapes no activation shares (a packed FFN runs 64 or 128 tokens).
  cfg = model_config.ModelConfig(vocab_size=100, hidden_size=96, num_layers=2, num_heads=4,
                                 intermediate_size=384, max_position_embeddings=16,
                                 max_seq_length=8, exit_width=16)
  p = bert.init_params(cfg)
  nbytes = lambda *keys: sum(x.nbytes for k in keys for x in jax.tree.leaves(p['layer_0'][k]))
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  dense = engine_lib.DenseEngine(cfg, p, length_buckets=(8,), batch_buckets=(1,), chunk_tokens=0)
  assert temp(dense.program(1, 8)) < nbytes('intermediate', 'output') / 4
  weights = {f'f32[{",".join(map(str, x.shape))}]' for x in jax.tree.leaves(p['layer_0'])
             if x.ndim == 2}

  def computed(compiled):  # instructions that compute a weight-shaped array (a copy of one)
    return [m.group(1) for m in re.finditer(r'^\s*(?:ROOT )?%?(\S+) = (f32\[[\d,]*\])\S* '
                                            r'([\w-]+)\(', compiled.as_text(), re.M)
            if m.group(2) in weights
            and m.group(3) not in ('parameter', 'get-tuple-element', 'bitcast', 'tuple')]

  stacked = jax.jit(lambda w, x, i: x @ w[i]).lower(
      jax.ShapeDtypeStruct((2, 96, 384), jnp.float32), jax.ShapeDtypeStruct((8, 96), jnp.float32),
      jax.ShapeDtypeStruct((), jnp.int32)).compile()
  assert computed(stacked)  # the check sees a copy out of stacked weights
  for prune in (True, False):
    for rows in (1, 16):  # 16 x 8: a packed FFN of two branches (64 and 128 tokens)
      eng = engine_lib.Engine(cfg, p, prune=prune, exits=True, length_buckets=(8,),
                              batch_buckets=(rows,), schedule_max_length=8)
      assert not computed(eng.schedule.program(eng.params, 'layer', rows, 8)), (prune, rows)


def test_which_programs_run_the_one_row_form():
  """One row of at most UNROLL_MAX_LENGTH (64) tokens, in one chunk; everything else loops."""
  assert programs.unrolls(1, 64, 1024) and programs.unrolls(1, 8, 0)
  assert programs.unrolls(1, 64, 32)  # a lone row is one chunk, however small the budget
  assert not programs.unrolls(2, 16, 0)  # two rows
  assert not programs.unrolls(1, 128, 1024)  # long: its tokens cost more than its weights


def test_chunk_rows():
  assert programs.chunk_rows(32, 256, 1024) == 4
  assert programs.chunk_rows(32, 64, 1024) == 16
  assert programs.chunk_rows(32, 32, 1024) == 32
  assert programs.chunk_rows(12, 256, 1024) == 4
  assert programs.chunk_rows(6, 300, 1024) == 3
  assert programs.chunk_rows(32, 2048, 1024) == 1
  assert programs.chunk_rows(32, 256, 0) == 32


def test_chunked_programs_match_reference(params, thresholds):
  """Row chunks (a lax.map inside each program) prune, shrink and exit on their own."""
  p = {**params, 'thresholds': thresholds[0.25]}
  # (8, 64) and (8, 16) programs (longest first, calls of 8): chunks of 1 and 4 rows
  rows = make_rows(13, 8, min_len=17) + make_rows(14, 8, max_len=16)
  kw = dict(length_buckets=LENGTHS, batch_buckets=(8,), chunk_tokens=64,
            compiler_options=FAST_COMPILE)
  eng = engine_lib.Engine(CFG, p, prune=True, exits=True, schedule='fused', **kw)
  tau = pick_tau(reference(p, rows)['u'], 0.5)
  out = eng.predict(rows, tau=tau)
  assert_same(out, reference(p, rows, tau=tau))
  assert {programs.chunk_rows(*k, 64) for k in eng.programs} == {1, 4}
  assert len(set(out['exit_layer'].tolist())) >= 2 and (out['n_ffn'] < out['n_attn']).any()
  chunked = engine_lib.DenseEngine(CFG, p, **kw).predict(rows)
  whole = engine_lib.DenseEngine(CFG, p, **{**kw, 'chunk_tokens': 0}).predict(rows)
  np.testing.assert_allclose(chunked['logits'], whole['logits'], atol=1e-5)
  np.testing.assert_array_equal(chunked['n_ffn'], whole['n_ffn'])


def test_export_roundtrip(both, params, thresholds, tmp_path):
  if both.schedule is not None:
    pytest.skip('export serves the fused programs, the same in both engines: tested once')
  p = {**params, 'thresholds': thresholds[0.25]}
  both.set_params(p)
  both.plan = tiny.FixedHeads([True, False, True])  # the halt values carry the plan's heads
  # Params baked in: bytes -> program. (Small programs: each one compiles twice here.)
  ids, types, mask = pad(make_rows(3, 2, max_len=64), b=2)
  want = jax.tree.map(np.asarray, both.run(ids, types, mask, tau=0.95))
  baked = export_lib.deserialize(export_lib.export(both, 2, 64).serialize())
  got = jax.tree.map(np.asarray, baked(ids, types, mask, both.halts(0.95)))
  for k in programs.OUTPUTS:
    np.testing.assert_allclose(got[k], want[k], atol=1e-5)
  assert set(want['exit_layer'].tolist()) <= {1, 3, L}
  with pytest.raises(ValueError, match=r'halt values must have shape \(4,\)'):
    baked(ids, types, mask, 0.95)  # a bare tau: which heads run is not the caller's guess
  # Params as an argument: file -> a fresh python that never imports the model code.
  ids, types, mask = pad(make_rows(4, 2, max_len=16), b=2, t=16)
  want = jax.tree.map(np.asarray, both.run(ids, types, mask, tau=0.95))
  path = tmp_path / 'prog.npz'
  export_lib.save(path, export_lib.export(both, 2, 16, bake_params=False), both.operands(2, 16))
  np.savez(tmp_path / 'in.npz', ids=ids, types=types, mask=mask, halts=both.halts(0.95))
  both.plan = None
  script = (
      'import sys, numpy as np, jax\n'
      'from mp_jax.serving import export\n'
      f'fn = export.load({str(path)!r})\n'
      f'x = np.load({str(tmp_path / "in.npz")!r})\n'
      'out = fn(x["ids"], x["types"], x["mask"], x["halts"])\n'
      'assert not any(m.startswith(("mp_jax.model", "flax")) for m in sys.modules)\n'
      f'np.savez({str(tmp_path / "out.npz")!r}, **jax.tree.map(np.asarray, out))\n')
  subprocess.run([sys.executable, '-c', script], check=True, cwd=str(tmp_path.parent),
                 env={'PYTHONPATH': str(engine_lib.__file__).rsplit('/mp_jax/', 1)[0],
                      'JAX_PLATFORMS': 'cpu', 'PATH': ''})
  with np.load(tmp_path / 'out.npz') as got:
    for k in programs.OUTPUTS:
      np.testing.assert_allclose(got[k], want[k], atol=1e-5)


def test_a_single_request_is_routed_as_plan_calls_would(params):
  """Route's shortcut for one request picks plan_calls' call (batch bucket, input length), with
  and without a batch bucket of 1; the halt values are kept per tau until a plan is assigned."""
  fine = (8, 12, 16, 24, 32, 48, 64)
  for prune, buckets in ((True, (1, 8)), (True, (4, 8)), (False, (2, 8))):
    eng = engine_lib.Engine(CFG, params, prune=prune, exits=True, length_buckets=fine,
                            batch_buckets=buckets, compiler_options=FAST_COMPILE)
    halt_L = eng.halts(0.5)
    for n in range(1, 65):
      r = eng.route(np.asarray([n]), halt_L)
      want = batching.plan_calls(np.asarray([n]), buckets, eng.input_length,
                                 engine_lib.FUSED_CALL_TOKENS)
      assert len(r.layer_major) == 0 and len(r.calls) == 1 and len(want) == 1
      assert r.calls[0][0].tolist() == [0] and r.calls[0][1:] == want[0][1:], (buckets, n)
  assert eng.halts(0.5) is halt_L and not halt_L.flags.writeable
  eng.plan = tiny.FixedHeads([True, False, True])
  np.testing.assert_array_equal(eng.halts(0.5), exit_plan.halts(0.5, L, [True, False, True]))
  eng.plan = None
  np.testing.assert_array_equal(eng.halts(0.5), exit_plan.halts(0.5, L))


def test_spaced_input_buckets(params):
  assert programs.spaced((8, 16, 24, 32, 40, 48, 56, 64)) == (8, 16, 32, 64)
  assert programs.spaced((64,)) == (64,)
  assert programs.spaced((10, 12, 30, 50)) == (12, 50)
  fine = (16, 24, 32, 48, 64)
  pruned = engine_lib.Engine(CFG, params, prune=True, exits=False, length_buckets=fine,
                             batch_buckets=(2,), compiler_options=FAST_COMPILE,
                             schedule='fused')
  dense = engine_lib.DenseEngine(CFG, params, length_buckets=fine, batch_buckets=(2,),
                                 compiler_options=FAST_COMPILE)
  rows = [r for r in make_rows(3, 40) if 17 <= len(r[0]) <= 24][:2]
  assert len(rows) == 2
  # A pruning engine pads inputs to the coarse grid (its first switch picks the fine length);
  # a dense one pays padding in every layer, so it pads to the fine grid.
  pruned.predict(rows)
  dense.predict(rows)
  assert set(pruned.programs) == {(2, 32)} and set(dense.programs) == {(2, 24)}
  # One row runs the one-row form, every layer at its input's shape: the fine grid.
  one = engine_lib.Engine(CFG, params, prune=True, exits=False, length_buckets=fine,
                          batch_buckets=(1, 2), compiler_options=FAST_COMPILE,
                          schedule='fused')
  one.predict(rows[:1])
  assert set(one.programs) == {(1, 24)}
  assert one.program_shapes() == [(1, t) for t in fine] + [(2, t) for t in (16, 32, 64)]


CFG16 = CFG.replace(dtype='bfloat16')
# bfloat16 contract (engine == reference): the same labels, exit layers and kept-token counts,
# and logits within BF16_ATOL + BF16_RTOL * |logit|, for every row whose reference makes no
# near-tie decision: every pruning score more than SCORE_EPS from its threshold (2^-8, bfloat16's
# rounding, of the mean score 1/n), every exit uncertainty more than U_EPS from tau, a top-1
# minus top-2 logit margin above BF16_ATOL. A bfloat16 matmul's rounding depends on its shape
# (kernel choice, tiling, accumulation order), and the engine runs compacted shapes, so a
# near-tie may go either way (mr smoke on XLA:CPU: logits up to 5e-3 apart, no label or exit
# differences; experiments/bf16_agreement.py).
BF16_ATOL, BF16_RTOL, SCORE_EPS, U_EPS = 1e-2, 2 ** -7, 2 ** -8 / CFG.max_seq_length, 2 ** -8


@jax.jit
def _ref16(params, ids, types, mask):
  return bert.MagicPyramid(CFG16).apply({'params': params}, ids, types, mask, pruning='hard',
                                        exits=True)


def reference16(params, rows, tau=None):
  """bfloat16 reference outputs (tau None: mid-way in the widest gap between uncertainties)
  and `clear`: the rows with no decision within its epsilon."""
  n, (ids, types, mask) = len(rows), pad(rows)
  logits, aux = _ref16(params, ids, types, mask)
  u_ExN = np.asarray(exits_lib.uncertainty(aux['exit_logits']))[:, :n]
  if tau is None:
    u = np.sort(u_ExN.ravel())[u_ExN.size // 5:u_ExN.size // 2]
    tau = float((u[np.argmax(np.diff(u))] + u[np.argmax(np.diff(u)) + 1]) / 2)
  exit_B, logits = exits_lib.exit_layers(aux['exit_logits'], logits, tau)
  exit_N, logits = np.asarray(exit_B)[:n], np.asarray(logits)[:n]
  ran_LxN = np.arange(L)[:, None] < exit_N[None]
  alive_LxNxT = np.concatenate([mask[None], np.asarray(aux['masks'])[:-1]]).astype(bool)[:, :n]
  alive_LxNxT[:, :, 0] = False  # [CLS] is kept whatever its score
  gap = np.abs(np.asarray(aux['scores'])[:, :n] - params['thresholds'][:, None, None])
  tie_N = ((gap <= SCORE_EPS) & alive_LxNxT & ran_LxN[..., None]).any((0, 2))
  tie_N |= ((np.abs(u_ExN - tau) <= U_EPS) & ran_LxN[:-1]).any(0)
  top = np.sort(logits, -1)
  tie_N |= top[:, -1] - top[:, -2] <= BF16_ATOL
  return {'labels': logits.argmax(-1), 'logits': logits, 'exit_layer': exit_N,
          'n_attn': np.asarray(aux['n_attn'])[:, :n].T * ran_LxN.T,
          'n_ffn': np.asarray(aux['n_ffn'])[:, :n].T * ran_LxN.T, 'clear': ~tie_N, 'tau': tau}


def test_bfloat16_engine_matches_reference_off_near_ties(params, thresholds):
  eng = engine_lib.Engine(CFG16, params, prune=True, exits=True, length_buckets=LENGTHS,
                          batch_buckets=BATCHES, compiler_options=FAST_COMPILE)
  checked, exits_seen, max_diff = 0, set(), 0.0
  for seed, q in ((21, 0.25), (22, 0.5)):
    p = {**params, 'thresholds': thresholds[q]}
    rows = make_rows(seed, 12, max_len=24)
    ref = reference16(p, rows)
    eng.set_params(p)
    out, ok = eng.predict(rows, tau=ref['tau']), ref['clear']
    for k in ('labels', 'exit_layer', 'n_attn', 'n_ffn'):
      np.testing.assert_array_equal(out[k][ok], ref[k][ok], err_msg=k)
    np.testing.assert_allclose(out['logits'][ok], ref['logits'][ok], atol=BF16_ATOL,
                               rtol=BF16_RTOL)
    max_diff = max(max_diff, float(np.abs(out['logits'] - ref['logits'])[ok].max()))
    checked += int(ok.sum())
    exits_seen |= set(out['exit_layer'][ok].tolist())
    assert (out['n_ffn'][ok] < out['n_attn'][ok]).any()
  print(f'bfloat16 engine vs reference: {checked} of 24 rows off near-ties, '
        f'max |logit diff| {max_diff:.2e}')
  assert checked >= 12 and len(exits_seen) >= 2
  if jax.default_backend() == 'cpu':
    # At these shapes XLA:CPU's bfloat16 results come out the same in both paths (measured
    # 1.2e-7); a float32 engine would be 5e-3 to 1e-2 off, so this also shows the test can fail.
    assert max_diff <= 1e-3

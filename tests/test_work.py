"""mp_jax.serving.work: the padded MACs an engine's programs run, against its calls and by hand."""

import functools
import time

import jax
import numpy as np
import pytest

from mp_jax.data import batching
from mp_jax.model import bert, flops
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import grouping, programs, schedule, work
from tests.conftest import peaky_params, tiny_config

CFG = tiny_config(max_seq_length=64, max_position_embeddings=64)
L = CFG.num_layers
attn = lambda n: float(flops.model_layer_macs(CFG, n, 0))
ffn = lambda n: float(flops.model_layer_macs(CFG, 0, n))
head = lambda n: float(flops.exit_head_macs(CFG.hidden_size, CFG.exit_width, n, CFG.num_labels))
embed = lambda n: float(flops.embedding_macs(CFG.hidden_size, CFG.embedding_rank, n))
FAST_COMPILE = {'xla_backend_optimization_level': 0}


@pytest.fixture(scope='module')
def params():
  return bert.init_params(CFG)


def engine(params, **kw):
  kw = {'prune': True, 'exits': True, 'tau': 0.5, 'length_buckets': (16, 64),
        'batch_buckets': (2, 8), 'chunk_tokens': 0, 'schedule': 'fused', **kw}
  return engine_lib.Engine(CFG, params, **kw)


def random_counts(seed, n, max_len=64):
  """Consistent per-layer counts (kept <= entering, entering = previous kept) and exit layers."""
  rng = np.random.default_rng(seed)
  n_attn, n_ffn = np.zeros((n, L), np.int64), np.zeros((n, L), np.int64)
  cur = rng.integers(1, max_len + 1, n)
  for l in range(L):
    n_attn[:, l] = cur
    cur = np.maximum(1, cur - rng.integers(0, cur))
    n_ffn[:, l] = cur
  return n_attn, n_ffn, rng.integers(1, L + 1, n)


def test_fused_and_dense_counts_by_hand(params):
  """Three requests: 40 and 30 tokens share a (2, 64) call, 10 tokens runs at (2, 16)."""
  n_attn = np.array([[40, 20, 20], [30, 30, 12], [10, 10, 10]])
  n_ffn = np.array([[20, 20, 10], [30, 12, 12], [10, 10, 10]])
  exit_N = np.array([2, 3, 1])
  got = work.engine_macs(engine(params), n_attn, n_ffn, exit_N, np.full(L, 0.5, np.float32))
  full = attn(64) + ffn(64) + head(64)
  small = attn(16) + ffn(16)
  # Layer 3 is the last: no head. The batch bucket stays 2 (the smallest <= 2 holding 1 row).
  want = 2 * full + 2 * full + 2 * small + 2 * (small + head(16))
  assert got == pytest.approx(want)
  # With the head after layer 1 skipped (halt 0) no row can exit there; row 3 then runs on.
  got = work.engine_macs(engine(params), n_attn, n_ffn, np.array([2, 3, 2]),
                         np.array([0.0, 0.5, 0.5], np.float32))
  assert got == pytest.approx(2 * (attn(64) + ffn(64)) + 2 * full + 2 * small
                              + 2 * small + 2 * (small + head(16)))
  dense = engine_lib.DenseEngine(CFG, params, length_buckets=(16, 64), batch_buckets=(2, 8))
  assert work.engine_macs(dense, n_attn, n_ffn) == pytest.approx(
      2 * L * (attn(64) + ffn(64)) + 2 * L * (attn(16) + ffn(16)))
  # No request runs layer-major here: none of these MACs is the schedule's.
  assert not work.layer_major_macs(engine(params), n_attn, n_ffn, exit_N).any()


def test_layer_major_macs_are_the_layer_major_requests_only(params):
  """Requests longer than schedule_max_length run fused: the per-layer count leaves them out."""
  eng = engine(params, schedule='layers', schedule_max_length=16)
  n_attn, n_ffn, exit_N = random_counts(0, 24)
  short = np.flatnonzero(n_attn[:, 0] <= 16)
  assert 1 < len(short) < len(n_attn)
  pick = lambda idx: (n_attn[idx], n_ffn[idx], exit_N[idx])
  got_L = work.layer_major_macs(eng, n_attn, n_ffn, exit_N)
  assert got_L.sum() == pytest.approx(work.engine_macs(eng, *pick(short)))
  np.testing.assert_allclose(got_L, work.layer_major_macs(eng, *pick(short)))
  long = np.setdiff1d(np.arange(len(n_attn)), short)
  assert work.engine_macs(eng, n_attn, n_ffn, exit_N) == pytest.approx(
      work.engine_macs(eng, *pick(short)) + work.engine_macs(eng, *pick(long)))


@pytest.mark.parametrize('order', [*engine_lib.SCHEDULES, 'one-row'])
@pytest.mark.parametrize('seed', range(3))
def test_unit_buckets_leave_only_the_known_padding(params, order, seed, monkeypatch):
  """With a bucket for every length and batches of one row nothing pads (padded == counted)
  but, layer-major, the head over the pruned tokens and the packed FFN's grid, and in the
  one-row form (programs.UNROLL_MAX_ROWS) every layer and head at the input's length."""
  if order == 'fused':  # the while loop, at one row too
    monkeypatch.setattr(programs, 'UNROLL_MAX_ROWS', 0)
  n_attn, n_ffn, exit_N = random_counts(seed, 20)
  heads = np.array([seed != 1, True])  # seed 1: the exit plan skips the first head
  exit_N = np.where((exit_N == 1) & ~heads[0], 2, exit_N)
  halt_L = np.array([*np.where(heads, 0.5, 0.0), 0.5], np.float32)
  eng = engine(params, length_buckets=tuple(range(1, 65)), batch_buckets=(1,),
               schedule='fused' if order == 'one-row' else order, schedule_max_length=64)
  counted = exact = flops.example_macs(CFG, n_attn, n_ffn, exit_N, exits=heads).sum()
  if order == 'one-row':
    n_NxL = np.repeat(n_attn[:, :1], L, 1)  # each layer it runs at the input's length
    counted = flops.example_macs(CFG, n_NxL, n_NxL, exit_N, exits=heads).sum()
  if order == 'layers':
    # A layer program (groups of one row here) runs its head over the tokens entering it
    # (masked) and its FFN over the kept ones packed, at the first count of the pack grid.
    for r, l in zip(*np.nonzero(np.arange(L)[None] < exit_N[:, None])):
      m = batching.bucket_length(n_ffn[r, l], grouping.pack_grid(n_attn[r, l]))
      counted += ffn(m) - ffn(n_ffn[r, l])
      if l < L - 1 and heads[l]:
        counted += head(n_attn[r, l]) - head(n_ffn[r, l])
  assert work.engine_macs(eng, n_attn, n_ffn, exit_N, halt_L) == pytest.approx(counted)
  # Real buckets pad: never fewer MACs than the FLOPs count.
  real = engine(params, schedule='fused' if order == 'one-row' else order,
                schedule_max_length=64)
  assert work.engine_macs(real, n_attn, n_ffn, exit_N, halt_L) > exact


def test_the_layer_major_count_follows_the_schedules_row_order(params):
  """Rows of equal counts keep the previous layer's group order, as in the schedule: which rows
  share a group sets its packed FFN's size. Groups worked out by hand (buckets (16, 64), groups
  of 8 rows, a lone row in a group of 2; pack_grid(c): multiples of 64 up to c <= 1024)."""
  eng = engine(params, exits=False, schedule='layers', schedule_max_length=64)
  n_attn = np.zeros((9, L), np.int64)
  n_ffn = np.zeros((9, L), np.int64)
  n_attn[:, 0], n_ffn[:, 0] = [40] + [30] * 8, [17] + [20] * 8
  n_attn[:, 1], n_ffn[:, 1] = n_ffn[:, 0], 16
  n_attn[:, 2], n_ffn[:, 2] = 16, [16] + [7] * 8
  want = 10 * embed(64)
  # Layer 0, by length: rows 0-7 (40 and 30 tokens, 157 kept), row 8 (20 kept).
  want += 10 * attn(64) + ffn(192) + ffn(64)
  # Layer 1, by kept count: rows 1-8 (20 entering, 128 kept), then row 0 (17; 16 kept).
  want += 10 * attn(64) + ffn(128) + ffn(64)
  # Layer 2, all at 16: rows 1-8 still first (56 kept in 128 places), row 0 (16 in 32). In
  # length order rows 0-7 would share a group (65 kept: a grid step more).
  want += 10 * attn(16) + ffn(64) + ffn(32)
  assert work.engine_macs(eng, n_attn, n_ffn) == pytest.approx(want)


def make_rows(n, seed=0, longest=64):
  rng = np.random.default_rng(seed)
  rows = []
  for k in rng.integers(2, longest + 1, n):
    ids = rng.integers(5, CFG.vocab_size, k).astype(np.int32)
    ids[0] = 2
    rows.append(ids)
  return rows


def exiting_tau(eng, rows):
  """A random model's heads are nearly uniform: a tau just below 1 lets some rows exit."""
  return next(x for x in (0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999)
              if len(set(eng.predict(rows, tau=x)['exit_layer'].tolist())) >= 2)


# chunk 256: groups of up to 16 rows at 16 tokens; waves of 5 rows: several waves a call.
@pytest.mark.parametrize('chunk,wave_rows', [(0, 0), (256, 0), (0, 5)])
def test_the_schedule_count_is_the_sum_of_its_calls(chunk, wave_rows):
  """Layer-major: every (kind, batch, length) call the schedule makes, summed, is the count;
  per layer (the embeddings in layer 0's), the count layer_major_macs gives beside
  Schedule.log's time of each layer of each wave."""
  eng = engine(peaky_params(CFG), schedule='layers', schedule_max_length=64,
               compiler_options=FAST_COMPILE, chunk_tokens=chunk)
  if wave_rows:
    eng.schedule = schedule.Schedule(CFG, prune=True, exits=True, wave_rows=wave_rows,
                                     length_buckets=eng.schedule.lbs,
                                     batch_buckets=eng.batch_buckets,
                                     compiler_options=FAST_COMPILE, token_budget=chunk)
  rows = make_rows(19) + make_rows(12, seed=2, longest=16)
  calls, program = [], eng.schedule.program

  def record(sp, kind, nb, nt):
    fn = program(sp, kind, nb, nt)
    def run(*args):
      res = fn(*args)
      # layer(top, p, pe, theta, l, ...) -> (h, alive, kept_b, ...): the FFN packs the kept
      # tokens.
      kept_b = np.asarray(res[2]) if kind == 'layer' else np.zeros(1, np.int64)
      calls.append((kind, nb, nt, int(args[4]) if kind == 'layer' else -1, kept_b))
      return res
    return run

  tau = exiting_tau(eng, rows)
  eng.schedule.program = record
  eng.schedule.log = []
  start = time.perf_counter()
  out = eng.predict(rows, tau=tau)
  wall = time.perf_counter() - start
  assert len(set(out['exit_layer'].tolist())) >= 2 and (out['n_ffn'] < out['n_attn']).any()
  assert sum(k.sum() for *_, k in calls) == out['n_ffn'].sum()  # padding rows keep nothing
  # Each wave (longest rows first): one entry for each layer that one of its rows ran; the
  # entries are spans of the call, not running totals.
  order, step = np.argsort(-np.array([len(r) for r in rows]), kind='stable'), wave_rows or len(rows)
  waves = [order[i:i + step] for i in range(0, len(rows), step)]
  assert len(waves) == (7 if wave_rows else 1)
  want = [l for w in waves for l in range(out['exit_layer'][w].max())]
  assert [l for l, _ in eng.schedule.log] == want
  assert all(s > 0 for _, s in eng.schedule.log) and sum(s for _, s in eng.schedule.log) < wall
  want_L = np.zeros(L)
  for kind, nb, nt, l, kept_b in calls:
    if kind == 'embed':
      want_L[0] += nb * embed(nt)
    else:
      m = batching.bucket_length(kept_b.sum(), grouping.pack_grid(nb * nt))
      want_L[l] += nb * (attn(nt) + (head(nt) if l < L - 1 else 0.0)) + ffn(m)
  counts = (out['n_attn'], out['n_ffn'], out['exit_layer'], eng.halts(tau))
  assert work.engine_macs(eng, *counts) == pytest.approx(want_L.sum())
  np.testing.assert_allclose(work.layer_major_macs(eng, *counts), want_L)
  assert (max(nb for _, nb, *_ in calls) > max(eng.batch_buckets)) == (chunk > 0)


@pytest.mark.parametrize('prune,exits,chunk,tau', [
    (True, True, 32, None),  # row chunks of 1 (64 tokens) and 2 (16): some only padding
    (False, True, 0, None),  # exits alone: the length never shrinks
    (True, False, 32, 0.0),  # pruning alone: the batch never shrinks
    (False, True, 0, 0.0)])  # no head runs: the dense program
def test_the_fused_count_is_the_sum_of_the_branches_that_ran(monkeypatch, prune, exits, chunk,
                                                           tau):
  """Every half-layer and head the fused programs really run (a host callback in the branch
  taken), summed, is the count from the engine's own outputs."""
  calls, layer, run_head = [], programs._layer, programs._head  # pylint: disable=protected-access
  note = lambda *k: jax.debug.callback(functools.partial(calls.append, k))

  def recorded_layer(cfg, p, x, *args, method):
    note(method.__name__, *x.shape[:2])
    return layer(cfg, p, x, *args, method=method)

  def recorded_head(cfg, pe, y, k):
    note('head', *y.shape[:2])
    return run_head(cfg, pe, y, k)

  monkeypatch.setattr(programs, '_layer', recorded_layer)
  monkeypatch.setattr(programs, '_head', recorded_head)
  eng = engine(peaky_params(CFG), prune=prune, exits=exits, chunk_tokens=chunk,
               compiler_options=FAST_COMPILE)
  rows = make_rows(11, seed=1)
  tau = exiting_tau(eng, rows) if tau is None else tau
  calls.clear()
  out = eng.predict(rows, tau=tau)
  jax.effects_barrier()
  assert calls
  cost = {'attend': attn, 'ffn': ffn, 'head': head}
  want = sum(nb * cost[kind](nt) for kind, nb, nt in calls)
  got = work.engine_macs(eng, out['n_attn'], out['n_ffn'], out['exit_layer'], eng.halts(tau))
  assert got == pytest.approx(want)
  if prune:
    assert (out['n_ffn'] < out['n_attn']).any()  # tokens went: shorter branches ran

"""The exit plan (SPEC §3): heads that cannot pay for themselves are skipped, everywhere alike."""

import itertools

import numpy as np
import pytest

from mp_jax.evaluation import reference
from mp_jax.model import config as model_config
from mp_jax.model import exit_plan, flops
from tests import tiny

L = 4


def plan_of(u_NxE, weight=1.0, layer=100.0, head=10.0):
  """A plan with every layer costing `layer` and every head `head` FLOPs per example."""
  n = len(u_NxE)
  return exit_plan.ExitPlan(u_NxE, np.full((n, L), layer), np.full((n, L - 1), head), weight)


def all_sets(e):
  return [np.asarray(s, bool) for s in itertools.product((False, True), repeat=e)]


def test_halts():
  np.testing.assert_array_equal(exit_plan.halts(0.3, L), np.float32([0.3, 0.3, 0.3, 0]))
  np.testing.assert_array_equal(exit_plan.halts(0.3, L, [True, False, True]),
                                np.float32([0.3, 0, 0.3, 0]))
  np.testing.assert_array_equal(exit_plan.heads_at(np.float32([0.3, 0, 0.3, 0])),
                                [True, False, True])
  for tau in (0.0, -0.5, 1e-46):  # no head runs at tau <= 0, also below float32's smallest
    assert not exit_plan.halts(tau, L).any()
    assert not plan_of(np.zeros((3, L - 1))).heads(tau).any()
  with pytest.raises(ValueError, match='finite'):
    plan_of(np.zeros((3, L - 1))).heads(float('nan'))


def test_a_head_nobody_exits_at_is_dropped_and_a_busy_one_kept():
  # Every example is confident after layer 2 only: the heads at 1 and 3 cost and never answer.
  u = np.tile([0.9, 0.05, 0.9], (20, 1))
  plan = plan_of(u)
  np.testing.assert_array_equal(plan.heads(0.1), [False, True, False])
  assert plan.cost(plan.heads(0.1), 0.1) == 2 * 100 + 10  # two layers and one head
  assert not plan.heads(0.0).any()  # tau 0: no head can exit, so none runs
  # The same profile, heads that cost more than the two layers they save: none pays.
  assert not plan_of(u, weight=25.0).heads(0.1).any()
  assert plan_of(u, weight=19.0).heads(0.1).tolist() == [False, True, False]


def test_the_plan_is_a_local_minimum_no_worse_than_all_or_none():
  rng = np.random.default_rng(0)
  for seed in range(20):
    u = rng.beta(0.5, 0.5, (50, L - 1)).astype(np.float32)
    plan = plan_of(u, weight=float(rng.uniform(0, 8)))
    tau = float(rng.uniform(0.05, 0.9))
    s = plan.heads(tau)
    c = plan.cost(s, tau)
    assert c <= plan.cost(np.ones(L - 1, bool), tau) and c <= plan.cost(np.zeros(L - 1), tau)
    for j in np.flatnonzero(s):  # dropping any head it kept costs more
      assert plan.cost(np.where(np.arange(L - 1) == j, False, s), tau) >= c
    best = min(plan.cost(x, tau) for x in all_sets(L - 1))
    assert c <= 1.25 * best, seed  # greedy, close to the exhaustive optimum here


def test_cost_matches_the_flops_count():
  """The plan's cost of a head set is the FLOPs count of the examples' exits under it."""
  cfg = model_config.ModelConfig(vocab_size=50, hidden_size=16, num_layers=L, num_heads=2,
                                 intermediate_size=32, max_position_embeddings=64,
                                 max_seq_length=32, num_labels=3, exit_width=8)
  rng = np.random.default_rng(1)
  n = 30
  n_attn = np.sort(rng.integers(2, 33, (n, L)), axis=1)[:, ::-1]
  n_ffn = np.minimum(n_attn, np.roll(n_attn, -1, axis=1))
  n_ffn[:, -1] = n_attn[:, -1]
  logits = rng.normal(0, 2, (n, L - 1, 3)).astype(np.float32)
  res = {'exit_logits': logits, 'n_attn': n_attn, 'n_ffn': n_ffn,
         'logits': rng.normal(0, 1, (n, 3)).astype(np.float32),
         'labels': rng.integers(0, 3, n), 'lengths': n_attn[:, 0]}
  plan = exit_plan.ExitPlan.from_reference(cfg, res, 1.0)
  for heads in all_sets(L - 1):
    for tau in (0.0, 0.3, 0.7):
      fixed = tiny.FixedHeads(heads)
      exit_N, _ = reference.decide(res, tau, L, fixed)
      want = flops.example_flops(cfg, n_attn, n_ffn, exit_layer_N=exit_N,
                                 exits=heads & (tau > 0)).mean()
      assert plan.cost(heads, tau) == pytest.approx(want, rel=1e-12)
      m, _, _ = reference.metrics(res, cfg, tau, plan=fixed)
      assert m['gflops_per_example'] == pytest.approx(want / 1e9, rel=1e-12)
      assert m['heads'] == (heads & (tau > 0)).astype(int).tolist()
      early = exit_N < L
      assert heads[exit_N[early] - 1].all()  # no example answered at a skipped head


def test_save_load_and_bad_files(tmp_path):
  u = np.random.default_rng(2).uniform(size=(7, L - 1)).astype(np.float32)
  plan = plan_of(u, weight=3.0)
  plan.save(tmp_path / exit_plan.FILE)
  back = exit_plan.ExitPlan.load(tmp_path / exit_plan.FILE, 3.0)
  for tau in (0.2, 0.6):
    np.testing.assert_array_equal(back.heads(tau), plan.heads(tau))
  assert exit_plan.ExitPlan.load(tmp_path / exit_plan.FILE, 5.0).weight == 5.0
  assert exit_plan.ExitPlan.load(tmp_path / exit_plan.FILE).weight == exit_plan.DEFAULT_WEIGHT
  good = (tmp_path / exit_plan.FILE).read_bytes()
  for name, data in (('bad.npz', b'not a zip'), ('cut.npz', good[:len(good) // 2])):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=name):
      exit_plan.ExitPlan.load(tmp_path / name, 1.0)
  with pytest.raises(ValueError, match='head_weight'):
    plan_of(u, weight=float('nan'))
  with pytest.raises(ValueError, match=r'\(N, L-1\)'):
    exit_plan.ExitPlan(u, np.ones((7, L + 1)), np.ones((7, L - 1)), 1.0)
  assert exit_plan.head_weight(None) == exit_plan.DEFAULT_WEIGHT
  assert exit_plan.head_weight(2) == 2.0
  with pytest.raises(ValueError, match='at least one'):
    exit_plan.ExitPlan(np.zeros((0, L - 1)), np.zeros((0, L)), np.zeros((0, L - 1)), 1.0)

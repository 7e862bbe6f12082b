"""Selection rules, paired bootstrap intervals and Pareto fronts (mp_jax.evaluation.compare)."""

import numpy as np
import pytest

from mp_jax.evaluation import compare


def _sweep(*rows):
  return [{'tau': t, 'accuracy': a, 'flops_speedup': s} for t, a, s in rows]


def test_choose_takes_the_fastest_entry_that_reaches_the_floor():
  sweep = _sweep((0.0, 0.90, 1.0), (0.1, 0.895, 1.4), (0.2, 0.889, 1.9), (0.3, 0.85, 2.5))
  got = compare.choose(sweep, 0.89)
  assert got == {'tau': 0.1, 'accuracy': 0.895, 'flops_speedup': 1.4, 'qualified': True}
  assert 'qualified' not in sweep[1]  # a copy
  assert compare.choose(sweep, 0.85)['tau'] == 0.3
  # Float noise on an accuracy equal to the floor does not disqualify it.
  assert compare.choose(sweep, 0.889 + 1e-15)['tau'] == 0.2


def test_choose_breaks_ties_by_smaller_tau_and_falls_back_to_smallest_tau():
  sweep = _sweep((0.5, 0.9, 2.0), (0.2, 0.9, 2.0), (0.8, 0.7, 3.0), (0.1, 0.95, 1.0))
  assert compare.choose(sweep, 0.9) == {**sweep[1], 'qualified': True}
  assert compare.choose(sweep, 0.99) == {**sweep[3], 'qualified': False}
  with pytest.raises(ValueError, match='empty'):
    compare.choose([], 0.5)


def test_rule_floor():
  assert compare.rule_floor('bert-1', bert_acc=0.9) == pytest.approx(0.89)
  assert compare.rule_floor('ltp', bert_acc=0.9, ltp_acc=0.88) == 0.88
  with pytest.raises(ValueError, match="'ltp' needs ltp_acc"):
    compare.rule_floor('ltp', bert_acc=0.9)
  with pytest.raises(ValueError, match=r"unknown rule 'bert-2'.*'bert-1', 'ltp'"):
    compare.rule_floor('bert-2', bert_acc=0.9)
  assert set(compare.RULES) == {'bert-1', 'ltp'}


def test_bootstrap_of_identical_predictions_is_zero():
  a = np.random.default_rng(0).random(50) < 0.7
  assert compare.paired_bootstrap(a, a, samples=500) == {'diff': 0.0, 'lo': 0.0, 'hi': 0.0,
                                                         'n': 50}


def _ten_more_right(reps=1):
  """200 examples: both right on 150, a alone on 15, b alone on 5 (a: +10, diff 0.05)."""
  a = np.r_[np.ones(150), np.ones(15), np.zeros(5), np.zeros(30)].astype(bool)
  b = np.r_[np.ones(150), np.zeros(15), np.ones(5), np.zeros(30)].astype(bool)
  return np.tile(a, reps), np.tile(b, reps)


def test_bootstrap_known_difference_and_interval_shrinks_with_n():
  r = compare.paired_bootstrap(*_ten_more_right(), samples=4000, seed=1)
  assert r['n'] == 200 and r['diff'] == pytest.approx(0.05)
  assert r['lo'] < 0.05 < r['hi']
  # sd of the mean of d: sqrt((20/200 - 0.05^2) / 200) = 0.022; a 95% interval is about +-0.043.
  assert 0.06 < r['hi'] - r['lo'] < 0.11
  r4 = compare.paired_bootstrap(*_ten_more_right(4), samples=4000, seed=1)
  assert r4['diff'] == pytest.approx(0.05) and r4['lo'] < 0.05 < r4['hi']
  assert r4['hi'] - r4['lo'] < 0.7 * (r['hi'] - r['lo'])  # half the width at 4x the examples
  # Unpaired, the shared 150 would add noise: pairing is what makes this interval exclude 0.
  assert r4['lo'] > 0


def test_bootstrap_equals_a_slow_loop_and_is_deterministic(monkeypatch):
  rng = np.random.default_rng(5)
  a, b = rng.integers(0, 2, 37), rng.integers(0, 2, 37)
  draw = np.random.default_rng(11)
  stats = [np.mean(a[i] - b[i]) for i in (draw.integers(0, 37, 37) for _ in range(301))]
  lo, hi = np.percentile(stats, [5, 95])
  got = compare.paired_bootstrap(a, b, samples=301, seed=11, level=0.9)
  assert got == {'diff': np.mean(a - b), 'lo': lo, 'hi': hi, 'n': 37}
  monkeypatch.setattr(compare, '_CHUNK_ELEMS', 100)  # 2 samples per chunk: the same stream
  assert compare.paired_bootstrap(a, b, samples=301, seed=11, level=0.9) == got
  assert compare.paired_bootstrap(a, b, samples=301, seed=12, level=0.9) != got


def test_bootstrap_refuses_unpaired_or_non_binary_inputs():
  with pytest.raises(ValueError, match='correct_a has 3 examples, correct_b has 4'):
    compare.paired_bootstrap([1, 0, 1], [1, 0, 1, 1])
  with pytest.raises(ValueError, match='0/1'):
    compare.paired_bootstrap([1, 2], [1, 0])
  with pytest.raises(ValueError, match='no examples'):
    compare.paired_bootstrap([], [])


def test_pareto_front_on_a_hand_example():
  points = [(0.90, 1.0),   # 0: most accurate
            (0.89, 1.5),   # 1
            (0.85, 1.4),   # 2: dominated by 1
            (0.80, 3.0),   # 3: fastest
            (0.89, 1.2),   # 4: dominated by 1 (same accuracy, slower)
            (0.70, 2.0),   # 5: dominated by 3
            (0.89, 1.5)]   # 6: equal to 1, kept
  assert compare.pareto(points) == [0, 1, 6, 3]
  assert compare.pareto([]) == []
  assert compare.pareto([(0.5, 2.0)]) == [0]

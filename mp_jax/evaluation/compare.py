"""The paper's selection rules, paired bootstrap intervals and Pareto fronts (numpy only).

A rule turns the dev accuracy of a baseline into a floor; `choose` then takes, from a method's tau
sweep on dev, the point with the largest FLOPs speedup whose accuracy reaches the floor:

  tau* = argmax_{tau : acc(tau) >= floor} flops_speedup(tau)   (ties: the smaller tau)

`paired_bootstrap` puts a percentile interval on the accuracy difference of two models scored on
the same examples; `pareto` finds the points no other point beats in both accuracy and speedup.
"""

import numpy as np

# Rule name -> what it demands, as a reader sees it in the tables.
RULES = {'bert-1': 'within 1 point of bert on dev', 'ltp': "at least ltp's accuracy on dev"}

_EPS = 1e-12  # accuracies are ratios of counts: equal ones may differ in the last bits
_CHUNK_ELEMS = 1 << 21  # index draws per bootstrap chunk (16 MB of int64)


def rule_floor(rule, *, bert_acc, ltp_acc=None) -> float:
  """The dev-accuracy floor of `rule`: bert-1 -> bert_acc - 0.01, ltp -> ltp_acc."""
  if rule == 'bert-1':
    return float(bert_acc) - 0.01
  if rule == 'ltp':
    if ltp_acc is None:
      raise ValueError("rule 'ltp' needs ltp_acc (ltp's dev accuracy)")
    return float(ltp_acc)
  raise ValueError(f'unknown rule {rule!r}; RULES: {sorted(RULES)}')


def meets(accuracy, floor) -> bool:
  """accuracy >= floor, up to the last bits of a ratio of counts."""
  return accuracy >= floor - _EPS


def choose(sweep, floor) -> dict:
  """The sweep entry of largest flops_speedup with accuracy >= floor (ties: smaller tau).

  The copy carries 'qualified': True; when no entry reaches the floor it is the entry of smallest
  tau (the least early exiting) with 'qualified': False.
  """
  if not sweep:
    raise ValueError('choose: empty sweep')
  ok = [e for e in sweep if meets(e['accuracy'], floor)]
  if not ok:
    return {**min(sweep, key=lambda e: e['tau']), 'qualified': False}
  return {**max(ok, key=lambda e: (e['flops_speedup'], -e['tau'])), 'qualified': True}


def _as_correct(x, name):
  x_N = np.asarray(x)
  if x_N.ndim != 1:
    raise ValueError(f'{name}: expected a 1-D array of 0/1, got shape {x_N.shape}')
  if x_N.dtype != bool and not np.isin(x_N, (0, 1)).all():
    raise ValueError(f'{name}: expected booleans or 0/1 values')
  return x_N.astype(np.int8)


def paired_bootstrap(correct_a, correct_b, *, samples=10000, seed=0, level=0.95) -> dict:
  """acc(a) - acc(b) on the same N examples with a paired percentile bootstrap interval.

  d_i = a_i - b_i; diff = mean(d). Sample s draws N indices I_s uniformly with replacement (the
  same draw for a and b, so what the two get right together cancels) and computes
  D_s = mean(d[I_s]); [lo, hi] are the (1 - level)/2 and (1 + level)/2 quantiles of D (numpy's
  linear interpolation). The draws are rows of `default_rng(seed).integers(0, N, (samples, N))`,
  made in chunks (the stream does not depend on the chunking), so a seed fixes the result.
  """
  a_N, b_N = _as_correct(correct_a, 'correct_a'), _as_correct(correct_b, 'correct_b')
  if len(a_N) != len(b_N):
    raise ValueError(f'paired_bootstrap: correct_a has {len(a_N)} examples, correct_b has '
                     f'{len(b_N)}; a paired comparison needs the same examples')
  n = len(a_N)
  if n == 0:
    raise ValueError('paired_bootstrap: no examples')
  if not 0 < level < 1 or samples < 1:
    raise ValueError(f'paired_bootstrap: need 0 < level < 1 and samples >= 1, got level={level}'
                     f', samples={samples}')
  d_N = a_N - b_N  # int8 in {-1, 0, 1}: sums are exact integers
  rng = np.random.default_rng(seed)
  rows = max(1, _CHUNK_ELEMS // n)
  sums = []
  for start in range(0, samples, rows):
    idx_SxN = rng.integers(0, n, size=(min(rows, samples - start), n))
    sums.append(d_N[idx_SxN].sum(1, dtype=np.int64))
  d_S = np.concatenate(sums) / n
  q = round((1 - level) / 2, 12)  # level 0.9 -> exactly 0.05 (1 - 0.9 is 0.0999...98)
  lo, hi = np.quantile(d_S, [q, 1 - q])
  return {'diff': float(d_N.sum(dtype=np.int64) / n), 'lo': float(lo), 'hi': float(hi), 'n': n}


def pareto(points) -> list[int]:
  """Indices of the (accuracy, speedup) points no other point dominates, by speedup ascending.

  j dominates i when acc_j >= acc_i and sp_j >= sp_i with one of them strict; equal points are
  all kept.
  """
  if not len(points):
    return []
  p_Px2 = np.asarray(points, np.float64).reshape(-1, 2)
  acc, sp = p_Px2[:, 0], p_Px2[:, 1]
  ge_PxP = (acc[:, None] >= acc[None, :]) & (sp[:, None] >= sp[None, :])  # [j, i]: j >= i
  gt_PxP = (acc[:, None] > acc[None, :]) | (sp[:, None] > sp[None, :])
  keep = np.flatnonzero(~(ge_PxP & gt_PxP).any(0))
  return [int(i) for i in keep[np.argsort(sp[keep], kind='stable')]]

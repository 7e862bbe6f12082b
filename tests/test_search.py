"""experiments/search.py: the order, budget, choice and resume logic on fake dev metrics."""

import json

import pytest

from experiments import search

BASE = {'model.target_token_keep': 0.5, 'model.temperature': 1e-3, 'train.mask_lambda': 10.0}
BERT = 0.80  # bert's dev accuracy: the bert-1 floor is 0.79


def fake(metrics):
  """trial(settings, wd) returning metrics[target_token_keep] (or a default), logging calls."""
  calls = []

  def trial(settings, wd):
    calls.append((search.name(settings), wd.name))
    keep = settings['model.target_token_keep']
    acc, speed = metrics.get(keep, (0.795, 1.5))
    if settings['model.temperature'] != BASE['model.temperature']:
      acc -= 0.001 if settings['model.temperature'] > BASE['model.temperature'] else 0.0
      speed += 0.1
    return {'accuracy': acc, 'flops_speedup': speed}

  return trial, calls


def test_name_and_items_round_trip():
  s = dict(BASE, **{'train.mask_lambda': search._round(10.0 * 0.3)})
  assert search.name(s) == 'keep0.5_temp0.001_lam3'
  assert search.items(s) == ['model.target_token_keep=0.5', 'model.temperature=0.001',
                             'train.mask_lambda=3.0']


def test_choose_by_bert_minus_one_else_most_accurate():
  t = lambda n, a, s: {'name': n, 'dev': {'accuracy': a, 'flops_speedup': s}}
  trials = [t('a', 0.80, 1.5), t('b', 0.79, 2.5), t('c', 0.70, 4.0), t('d', 0.795, 2.5)]
  best = search.choose(trials, BERT)
  assert (best['name'], best['qualified']) == ('b', True)  # largest speedup at >= 0.79; ties: first
  best = search.choose([t('a', 0.70, 2.0), t('b', 0.75, 1.2), t('c', 0.75, 3.0)], BERT)
  assert (best['name'], best['qualified']) == ('b', False)  # none within 1 point: most accurate
  assert search.choose([], BERT) is None


def done(keeps, base=BASE):
  """Finished coarse trials: [(target, (dev accuracy, dev speedup))]."""
  return [{'settings': dict(base, **{'model.target_token_keep': k}),
           'dev': {'accuracy': a, 'flops_speedup': sp}} for k, (a, sp) in keeps]


def targets(settings):
  return [s['model.target_token_keep'] for s in settings]


def test_plan_starts_at_the_config_and_walks_to_more_pruning_while_within_the_floor():
  assert search.plan(BASE, [], 6, BERT) == [BASE]  # the next step depends on its accuracy
  assert search.plan(BASE, [], 0, BERT) == []
  trials = done([(0.5, (0.795, 2.0))])  # within 1 point of bert: try pruning more
  assert targets(search.plan(BASE, trials, 6, BERT)) == [0.5, 0.35]
  trials += done([(0.35, (0.792, 3.0))])  # still within: further
  assert targets(search.plan(BASE, trials, 6, BERT)) == [0.5, 0.35, 0.2]
  trials += done([(0.2, (0.70, 5.0))])  # crossed the floor: walk over, fine steps around 0.35
  around = dict(BASE, **{'model.target_token_keep': 0.35})
  assert search.plan(BASE, trials, 6, BERT)[3:] == [
      dict(around, **{'model.temperature': 5e-4}), dict(around, **{'model.temperature': 2e-3}),
      dict(around, **{'train.mask_lambda': 3.0})]
  assert len(search.plan(BASE, trials, 4, BERT)) == 4  # the budget cuts the fine steps
  assert search.next_settings(BASE, trials, 3, BERT) is None


def test_plan_walks_to_less_pruning_until_within_the_floor():
  trials = done([(0.5, (0.77, 2.0))])  # 3 points down: prune less
  assert targets(search.plan(BASE, trials, 6, BERT)) == [0.5, 0.7]
  trials += done([(0.7, (0.785, 1.5))])  # still below the floor (0.79)
  assert targets(search.plan(BASE, trials, 6, BERT)) == [0.5, 0.7, 0.85]
  trials += done([(0.85, (0.80, 1.2))])  # within: walk over, fine steps around 0.85
  fine = search.plan(BASE, trials, 6, BERT)[3:]
  assert targets(fine) == [0.85] * 3 and len(fine) == 3
  # No target qualifies: the ladder ends and the fine steps go around the most accurate.
  trials[-1]['dev']['accuracy'] = 0.788
  assert targets(search.plan(BASE, trials, 6, BERT)[3:]) == [0.85] * 3
  assert search.next_settings(BASE, trials, 3, BERT) is None


def test_plan_from_a_target_between_the_ladders_rungs():
  base = dict(BASE, **{'model.target_token_keep': 0.4})
  trials = done([(0.4, (0.80, 2.0))], base)
  assert targets(search.plan(base, trials, 6, BERT)) == [0.4, 0.35]
  # A trial at other settings (a fine step of an earlier, larger search) is not a coarse step.
  other = dict(base, **{'model.temperature': 2e-3})
  trials.append({'settings': other, 'dev': {'accuracy': 0.5, 'flops_speedup': 9.0}})
  assert targets(search.plan(base, trials, 6, BERT)) == [0.4, 0.35]


def test_run_records_every_trial_and_resumes_after_a_kill(tmp_path):
  metrics = {0.35: (0.792, 3.0), 0.2: (0.70, 5.0), 0.5: (0.795, 2.0)}
  trial, calls = fake(metrics)
  n = [0]

  def dies_at_trial_4(settings, wd):
    n[0] += 1
    if n[0] == 4:
      raise KeyboardInterrupt  # a kill mid-search
    return trial(settings, wd)

  with pytest.raises(KeyboardInterrupt):
    search.run(tmp_path, BASE, 6, BERT, dies_at_trial_4)
  rec = json.loads((tmp_path / search.RECORD).read_text())
  assert [t['name'] for t in rec['trials']] == [c[0] for c in calls] and len(calls) == 3
  assert rec['chosen'] == 'keep0.35_temp0.001_lam10' and rec['qualified']

  calls.clear()
  rec = search.run(tmp_path, BASE, 6, BERT, trial)  # run.py's trial reuses finished workdirs
  assert [c[0] for c in calls] == [t['name'] for t in rec['trials']]
  assert [c[0] == c[1] for c in calls] == [True] * 6  # each trial in its own folder
  assert [t['name'] for t in rec['trials']] == [
      'keep0.5_temp0.001_lam10', 'keep0.35_temp0.001_lam10', 'keep0.2_temp0.001_lam10',
      'keep0.35_temp0.0005_lam10', 'keep0.35_temp0.002_lam10', 'keep0.35_temp0.001_lam3']
  # temperature x0.5: same accuracy (0.792), 3.1x: the largest speedup within 1 point.
  assert (rec['chosen'], rec['qualified']) == ('keep0.35_temp0.0005_lam10', True)
  assert json.loads((tmp_path / search.RECORD).read_text()) == rec
  assert (rec['rule'], rec['budget'], rec['base']) == ('bert-1', 6, BASE)


def test_budget_caps_the_trials(tmp_path):
  trial, calls = fake({})  # every target at 0.795: within the floor, the walk prunes more
  rec = search.run(tmp_path, BASE, 2, BERT, trial)
  assert [t['settings']['model.target_token_keep'] for t in rec['trials']] == [0.5, 0.35]
  assert len(calls) == 2

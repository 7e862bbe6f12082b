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


def test_plan_is_coarse_then_fine_around_the_best_target_within_the_budget():
  done = lambda keeps: [{'settings': dict(BASE, **{'model.target_token_keep': k}),
                         'dev': {'accuracy': a, 'flops_speedup': s}} for k, (a, s) in keeps]
  assert [s['model.target_token_keep'] for s in search.plan(BASE, [], 6, BERT)] == [0.35, 0.5, 0.7]
  assert search.plan(BASE, [], 2, BERT) == search.plan(BASE, [], 6, BERT)[:2]
  assert search.plan(BASE, [], 0, BERT) == []
  trials = done([(0.35, (0.75, 3.0)), (0.5, (0.795, 2.0)), (0.7, (0.80, 1.4))])
  fine = search.plan(BASE, trials, 6, BERT)[3:]
  around = dict(BASE, **{'model.target_token_keep': 0.5})  # 0.35 is faster but 5 points down
  assert fine == [dict(around, **{'model.temperature': 5e-4}),
                  dict(around, **{'model.temperature': 2e-3}),
                  dict(around, **{'train.mask_lambda': 3.0})]
  assert search.plan(BASE, trials, 5, BERT)[3:] == fine[:2]
  # The fine steps wait for every coarse trial (the best one is not known before).
  assert len(search.plan(BASE, trials[:2], 6, BERT)) == 3
  assert search.next_settings(BASE, trials[:2], 6, BERT) == trials[2]['settings']
  assert search.next_settings(BASE, trials, 3, BERT) is None


def test_run_records_every_trial_and_resumes_after_a_kill(tmp_path):
  metrics = {0.35: (0.78, 3.0), 0.5: (0.795, 2.0), 0.7: (0.80, 1.4)}
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
  assert rec['chosen'] == 'keep0.5_temp0.001_lam10' and rec['qualified']

  calls.clear()
  rec = search.run(tmp_path, BASE, 6, BERT, trial)  # run.py's trial reuses finished workdirs
  assert [c[0] for c in calls] == [t['name'] for t in rec['trials']]
  assert [c[0] == c[1] for c in calls] == [True] * 6  # each trial in its own folder
  assert [t['name'] for t in rec['trials']][3:] == [
      'keep0.5_temp0.0005_lam10', 'keep0.5_temp0.002_lam10', 'keep0.5_temp0.001_lam3']
  # temperature x0.5: same accuracy (0.795), 2.1x: the largest speedup within 1 point.
  assert (rec['chosen'], rec['qualified']) == ('keep0.5_temp0.0005_lam10', True)
  assert json.loads((tmp_path / search.RECORD).read_text()) == rec
  assert (rec['rule'], rec['budget'], rec['base']) == ('bert-1', 6, BASE)


def test_budget_caps_the_trials(tmp_path):
  trial, calls = fake({})
  rec = search.run(tmp_path, BASE, 2, BERT, trial)
  assert [t['settings']['model.target_token_keep'] for t in rec['trials']] == [0.35, 0.5]
  assert len(calls) == 2

"""A budgeted, resumable search on dev over LTP's pruning hyperparameters (issue 18).

The paper searched the pruning target, the soft masks' temperature and the mask loss weight
lambda. Each trial is an LTP run (stage 1 shared with the task's other runs) judged on dev at
tau 0 and chosen by the `bert-1` rule: the largest dev FLOPs speedup within 1 point of bert's dev
accuracy, else the most accurate trial. The order is fixed by the finished trials, coarse to
fine, with the accuracy each target costs in view, and cut at the budget:

  1. the config's own settings (run.py reuses the task's `ltp` run: no extra training);
  2. model.target_token_keep walks the TARGETS ladder away from the config's: to more pruning
     while the rule holds, to less pruning until it holds; it stops at the first target on the
     other side of the floor (or at the ladder's end);
  3. around the best so far: temperature x0.5, temperature x2, mask_lambda x0.3.

Training and dev evaluation come in as a callable (experiments/run.py passes train_once plus its
cached dev evaluation), so a killed search resumes where it stopped and a finished one does no
work; `search.json` records the trials and the choice after every trial.
"""

import pathlib

from mp_jax import fsio
from mp_jax.evaluation import compare

KEYS = ('model.target_token_keep', 'model.temperature', 'train.mask_lambda')
SHORT = {'model.target_token_keep': 'keep', 'model.temperature': 'temp',
         'train.mask_lambda': 'lam'}
TARGETS = (0.2, 0.35, 0.5, 0.7, 0.85)
STEPS = (('model.temperature', 0.5), ('model.temperature', 2.0), ('train.mask_lambda', 0.3))
RULE = 'bert-1'
RECORD = 'search.json'


def _get(config, dotted):
  for k in dotted.split('.'):
    config = config[k]
  return config


def _round(x):
  # 10 * 0.3 is 3.0000000000000004: keep names, config items and JSON records identical.
  return float(f'{x:.10g}')


def base_settings(config):
  """The config's values of KEYS (the point the search starts from)."""
  return {k: _round(_get(config, k)) for k in KEYS}


def name(settings):
  """A short folder name, e.g. keep0.35_temp0.001_lam10."""
  return '_'.join(f'{SHORT[k]}{settings[k]:g}' for k in KEYS)


def items(settings):
  """Config variant items (configs/base.py `key=value`) for these settings."""
  return [f'{k}={settings[k]!r}' for k in KEYS]


def _qualifies(trial, bert_acc):
  return compare.meets(trial['dev']['accuracy'], compare.rule_floor(RULE, bert_acc=bert_acc))


def choose(trials, bert_acc):
  """The trial chosen by the bert-1 rule, with 'qualified' (None if there is no trial yet).

  Largest dev FLOPs speedup among trials within 1 point of bert's dev accuracy; if none is, the
  most accurate one. Ties go to the earlier trial.
  """
  if not trials:
    return None
  ok = [t for t in trials if _qualifies(t, bert_acc)]
  if ok:
    best = max(ok, key=lambda t: t['dev']['flops_speedup'])  # max keeps the first of equals
  else:
    best = max(trials, key=lambda t: t['dev']['accuracy'])
  return {**best, 'qualified': bool(ok)}


def _coarse(base, trials, bert_acc):
  """(target settings in order, as far as `trials` determine them; True once the walk ended)."""
  k0 = base[KEYS[0]]
  done = {t['settings'][KEYS[0]]: t for t in trials
          if t['settings'] == dict(base, **{KEYS[0]: t['settings'][KEYS[0]]})}
  out = [base]
  if k0 not in done:
    return out, False
  ok = _qualifies(done[k0], bert_acc)
  # Within the floor: prune more (smaller keep); below it: prune less.
  ladder = sorted((k for k in TARGETS if k < k0), reverse=True) if ok else sorted(
      k for k in TARGETS if k > k0)
  for k in ladder:
    out.append(dict(base, **{KEYS[0]: k}))
    if k not in done:
      return out, False
    if _qualifies(done[k], bert_acc) != ok:  # crossed the floor: the walk has bracketed it
      break
  return out, True


def plan(base, trials, budget, bert_acc):
  """Settings to try, in order, as far as the finished `trials` determine them.

  Each coarse step depends on the previous one's accuracy, and the fine steps on the best coarse
  trial, so the plan grows as trials finish.
  """
  out, walked = _coarse(base, trials, bert_acc)
  if walked and budget > len(out):
    coarse = [t for t in trials if t['settings'] in out]
    best = choose(coarse, bert_acc)['settings']
    out += [dict(best, **{k: _round(best[k] * f)}) for k, f in STEPS]
  unique = []
  for s in out:  # a fine step equal to a coarse trial must not be trained twice
    if s not in unique:
      unique.append(s)
  return unique[:budget]


def next_settings(base, trials, budget, bert_acc):
  """The first planned settings without a finished trial, or None when the search is done."""
  tried = [t['settings'] for t in trials]
  for s in plan(base, trials, budget, bert_acc):
    if s not in tried:
      return s
  return None


def run(root, base, budget, bert_acc, trial):
  """Runs the search in `root`; returns the record (also `root/search.json`).

  trial(settings, workdir) -> dev metrics {'accuracy', 'flops_speedup', ...}: trains (or
  resumes, or reuses) the LTP run in `workdir` and evaluates it on dev at tau 0.
  """
  root = pathlib.Path(root)
  trials = []
  while (s := next_settings(base, trials, budget, bert_acc)) is not None:
    n = name(s)
    trials.append({'name': n, 'settings': s, 'dev': trial(s, root / n)})
    rec = record(base, budget, bert_acc, trials)
    try:
      same = fsio.read_json(root / RECORD) == rec
    except (FileNotFoundError, fsio.UnreadableFile):
      same = False
    if not same:  # after every trial, so a kill leaves a record of the progress
      fsio.write_json(root / RECORD, rec, indent=1)
  return record(base, budget, bert_acc, trials)


def record(base, budget, bert_acc, trials):
  """What search.json holds: the rule, the trials and the choice."""
  best = choose(trials, bert_acc)
  return {'rule': RULE, 'rule_text': compare.RULES[RULE], 'budget': budget, 'base': base,
          'bert_dev_accuracy': bert_acc, 'trials': trials,
          'chosen': best and best['name'], 'qualified': best and best['qualified']}

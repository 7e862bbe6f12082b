"""Choosing tau on dev by the paper's rules, and judging the choice on test (experiments/run.py).

One reference sweep on dev per workdir (cached in <workdir>/eval/dev_sweep.json with per-example
correctness), each rule of mp_jax.evaluation.compare applied to it, one test report per method
with every rule's tau in its sweep, and a paired-bootstrap interval for every accuracy
difference to bert, on dev and on test.
"""

import numpy as np
from absl import logging

from mp_jax import fsio, methods
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading
from mp_jax.evaluation import compare, reference, report
from mp_jax.model import exit_plan
from mp_jax.serving import shapes
from mp_jax.training import runs

SELECT_TAUS = (0.05, 0.15, 0.25, 0.4)  # dev-only taus between the sweep's, for a finer choice
DEV_SWEEP = 'dev_sweep.json'


def dev_taus(method, config):
  """Halt values of the dev sweep: the config's sweep plus SELECT_TAUS (0 without exits)."""
  if not methods.has_exits(method):
    return [0.0]
  return sorted({float(t) for t in (*config.eval.tau_sweep, *SELECT_TAUS)})


def _exported(wd):
  """The stage fingerprints final/ was exported from (None for older workdirs)."""
  try:
    return fsio.read_json(workdir_lib.final_dir(wd) / workdir_lib.FINAL_META).get('stages')
  except (FileNotFoundError, fsio.UnreadableFile):
    return None


def dev_eval(c, wd):
  """(dev sweep, computed?): reference metrics on dev per tau and per-example correctness.

  Cached in <wd>/eval/dev_sweep.json with the stages final/ was exported from and the exit
  plan's head weight; an unreadable or stale file (other taus, another model or weight) is
  recomputed.
  """
  path, taus, stages = wd / 'eval' / DEV_SWEEP, dev_taus(c.method, c), _exported(wd)
  weight = exit_plan.head_weight(c.eval.head_weight) if methods.has_exits(c.method) else None
  try:
    rec = fsio.read_json(path)
    if (rec.get('taus') == taus and rec.get('stages') == stages
        and rec.get('head_weight') == weight and len(rec.get('correct', ())) == len(taus)):
      return rec, False
    logging.info('%s: swept other taus or another model; evaluating again', path)
  except FileNotFoundError:
    pass
  except fsio.UnreadableFile as e:
    logging.warning('%s; evaluating again', e)
  _, cfg, params, tok, names, plan = workdir_lib.load(wd)
  plan = plan and plan.reweighted(weight)
  ds = loading.load_task(c.data)
  report.check_labels(names, ds, c, wd)
  enc = batching.encode(tok, ds['dev'], cfg.max_seq_length)
  pruning, exits = methods.eval_modes(c.method)
  res = reference.run(params, cfg, enc, pruning=pruning, exits=exits,
                      batch_size=c.eval.batch_size, length_buckets=shapes.train_lengths(c.data))
  sweep, correct = [], []
  for tau in taus:
    m, _, pred = reference.metrics(res, cfg, tau, plan=plan)
    sweep.append({k: m[k] for k in ('tau', 'accuracy', 'gflops_per_example',
                                    'dense_gflops_per_example', 'flops_speedup', 'heads')
                  if k in m})
    correct.append(''.join('1' if ok else '0' for ok in pred == res['labels']))  # compact
  rec = {'split': 'dev', 'num_examples': len(res['labels']), 'taus': taus, 'stages': stages,
         'head_weight': weight, 'sweep': sweep, 'correct': correct}
  fsio.write_json(path, rec, indent=1)
  return rec, True


def at(dev, tau):
  """(sweep entry, correct_N) of a dev sweep at `tau`."""
  i = int(np.flatnonzero(np.isclose(dev['taus'], tau, rtol=0, atol=1e-9))[0])
  return dev['sweep'][i], np.frombuffer(dev['correct'][i].encode(), np.uint8) == ord('1')


def select(method, dev, bert_dev, ltp_dev):
  """{rule: tau, qualified, dev accuracy, FLOPs speedup (vs bert's dense) and Δ vs bert [CI]}.

  Exit methods choose tau by the rule (compare.choose); the others run at tau 0, and
  'qualified' says whether their dev accuracy meets the rule's floor.
  """
  bert, bert_ok = at(bert_dev, 0.0)
  floors = {r: compare.rule_floor(r, bert_acc=bert['accuracy'],
                                  ltp_acc=at(ltp_dev, 0.0)[0]['accuracy']) for r in compare.RULES}
  out = {}
  for rule, floor in floors.items():
    if methods.has_exits(method):
      pick = compare.choose(dev['sweep'], floor)
    else:
      e = at(dev, 0.0)[0]
      pick = {**e, 'qualified': compare.meets(e['accuracy'], floor)}
    e, ok = at(dev, pick['tau'])
    out[rule] = {'tau': float(pick['tau']), 'qualified': bool(pick['qualified']),
                 'floor': floor, 'dev': {
                     'accuracy': e['accuracy'],
                     'flops_speedup': bert['dense_gflops_per_example'] / e['gflops_per_example'],
                     **compare.paired_bootstrap(ok, bert_ok)}}
  return out


def _covers(rep, wd, taus, method, weight=None):
  """The written report was evaluated at taus[0] and has all `taus` in its sweep, with
  per-example predictions beside it (and, with exits, under head weight `weight`)."""
  want = {float(t) for t in taus}
  if rep.get('stages') != _exported(wd):  # final/ was re-exported since (e.g. a shared stage)
    return False
  if not runs.current_format(method, rep):  # timed against the cut model's own dense
    return False
  if methods.has_exits(method) and rep.get('head_weight') != exit_plan.head_weight(weight):
    return False  # another exit plan's heads
  pred = report.load_predictions(wd / 'eval')
  return (rep.get('tau') == float(taus[0]) and want <= {e['tau'] for e in rep['tau_sweep']}
          and pred is not None and want <= set(pred['tau'].tolist()))


def evaluate_once(c, wd, tau, extra=()):
  """(report, computed?) at `tau` with `extra` taus in its sweep; a written report is reused."""
  path = wd / 'eval' / 'report.json'
  if not methods.has_exits(c.method):
    tau, extra = 0.0, ()
  try:
    rep = fsio.read_json(path)
    if _covers(rep, wd, (tau, *extra), c.method, c.eval.head_weight):
      return rep, False
    logging.info('%s: not evaluated at tau %s (or no predictions.npz); evaluating again', path,
                 (tau, *extra))
  except FileNotFoundError:
    pass
  except fsio.UnreadableFile as e:  # e.g. a truncated write by an older version: evaluate again
    logging.warning('%s; evaluating again', e)
  rep = report.build(c, wd, tau=tau, extra_taus=tuple(extra))
  rep['stages'] = _exported(wd)  # the model this report is of (_covers)
  rep['format'] = runs.FINAL_FORMAT
  report.write(rep, wd / 'eval')
  return rep, True


def speeds(rep, entry, bert):
  """FLOPs speedup over bert's dense model and measured speedup of one tau-sweep entry.

  Every report times its engine against the unpruned model's dense program (SPEC §5), bert's;
  a report whose dense model is another (written before that rule) has no measured speedup here.
  """
  same = bool(np.isclose(rep['dense_gflops_per_example'], bert['dense_gflops_per_example']))
  return {'flops_speedup': bert['dense_gflops_per_example'] / entry['gflops_per_example'],
          'wallclock_speedup': entry.get('wallclock_speedup') if same else None}


def _pred_correct(wd, tau, labels=None):
  """Per-example correctness at `tau`; `labels`: what they must equal (a paired comparison)."""
  p = report.load_predictions(wd / 'eval')
  i = int(np.flatnonzero(np.isclose(p['tau'], tau, rtol=0, atol=1e-9))[0])
  if labels is not None and not np.array_equal(p['labels'], labels):
    raise ValueError(f'{wd}/eval: evaluated on other examples than bert (labels differ); '
                     'a paired comparison needs the same split')
  return p['pred'][i] == p['labels']


def judge(sel, reps, wds):
  """Adds each rule's test numbers to `sel`: accuracy, speedups and Δ vs bert [paired CI]."""
  bert = reps['bert']
  bert_ok = _pred_correct(wds['bert'], 0.0)
  labels = report.load_predictions(wds['bert'] / 'eval')['labels']
  for name, rules in sel.items():
    for s in rules.values():
      e = next(e for e in reps[name]['tau_sweep'] if abs(e['tau'] - s['tau']) < 1e-9)
      s['test'] = {'accuracy': e['accuracy'], 'gflops_per_example': e['gflops_per_example'],
                   **speeds(reps[name], e, bert),
                   **compare.paired_bootstrap(_pred_correct(wds[name], s['tau'], labels), bert_ok)}

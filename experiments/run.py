"""One command: train + evaluate every method on any task config, write docs/RESULTS.md.

  python experiments/run.py --out=runs/paper                      # mr + bbc (CPU: hours)
  python experiments/run.py --out=/tmp/p --smoke --tasks=mr       # a couple of minutes
  python experiments/run.py --tasks=qqp --set=qqp:data.path=/data/QQP \
      --set=qqp:model.init=/models/bert-base-uncased              # any task in configs/

Stages are shared where the methods agree (SPEC §4: each stage starts from the previous one):
each method links the leading stages it has in common with an earlier method (bert's fine-tune
is mp's stage 1, ltp's stages up to hard are mp's, fastbert and static share stage 1). A shared
stage is a symlink to the same checkpoints, so results equal separate runs, at a fraction of the
cost. Each exit method's tau is chosen on dev by both rules of
mp_jax.evaluation.compare (one dev sweep per method, cached in <workdir>/eval/dev_sweep.json) and
evaluated once on test with both choices in its sweep; every accuracy difference to bert carries
a paired-bootstrap 95% interval. experiments/search.py searches the pruning hyperparameters on dev
(off with --smoke or --search=false) and adds the rows `ltp (searched)` (the chosen trial) and
`mp (searched)` (MP's exits trained on it). Killed at any point, the
same command continues where it stopped; run again, it trains and evaluates nothing.
"""

import importlib
import os
import pathlib
import platform
import sys
import time

from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import base
from experiments import search, selection, tables
from mp_jax import cli, fsio, methods
from mp_jax import workdir as workdir_lib
from mp_jax.evaluation import compare, timing
from mp_jax.training import runs, trainer

_OUT = flags.DEFINE_string('out', 'runs/paper', 'Directory for all workdirs.')
_TASKS = flags.DEFINE_list('tasks', ['mr', 'bbc'], 'Tasks to run: config names in configs/.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny models and steps (tests, quick looks).')
_RESULTS = flags.DEFINE_string('results', 'docs/RESULTS.md', 'Markdown file to write.')
_OVERRIDES = flags.DEFINE_string('overrides', '', 'Extra config variant items for every run, '
                                  'e.g. train.epochs.hard=1 (a CPU budget cut).')
_SET = flags.DEFINE_multi_string(
    'set', [], 'TASK:key=value config item for that task only (repeatable; after --overrides), '
    'e.g. --set=qqp:data.path=/data/QQP --set=qqp:model.init=/models/bert-base-uncased.')
_LTP_THRESHOLDS = flags.DEFINE_list(
    'ltp_thresholds', [], 'Extra LTP runs for a trade-off curve: task:final_threshold, optionally '
    'followed by +key=value config items for that run only (e.g. bbc:0.005+train.epochs.hard=2).')
_WIDTH_KEEPS = flags.DEFINE_list(
    'width_keeps', [], 'Extra costeff runs: task:keep keeps that fraction of the heads and of '
    'the FFN neurons (model.head_keep = model.ffn_keep), optionally followed by +key=value '
    'config items for that run only (e.g. mr:0.25+train.epochs.width=2). Rows `costeff@keep`.')
_SEARCH = flags.DEFINE_bool('search', True, 'Search the pruning hyperparameters on dev '
                            '(experiments/search.py) and add the row `mp (searched)`.')
_SEARCH_TRIALS = flags.DEFINE_integer('search_trials', 6, 'Search budget: LTP runs per task '
                                      '(at most 6 distinct; 0 with --smoke).')

CONFIGS = {}  # task -> config module (get_config), imported from configs/ on first use
ORDER = ('mp', *(m for m in methods.METHODS if m != 'mp'))  # mp first: the others reuse its stages
SEARCHED, SEARCHED_DIR = 'mp (searched)', 'mp_searched'
SEARCHED_LTP = 'ltp (searched)'  # the chosen trial itself: a single-axis row beside mp (searched)


def available_tasks():
  """Task config names in configs/ (every module but base)."""
  return sorted(p.stem for p in (ROOT / 'configs').glob('*.py')
                if p.stem not in ('base', '__init__'))


def task_config(task):
  """The config module of `task`; a UsageError naming the available ones if there is none."""
  if task not in CONFIGS:
    if task not in available_tasks():
      raise app.UsageError(f'unknown task {task!r}: --tasks takes task configs in configs/: '
                           f'{", ".join(available_tasks())}')
    CONFIGS[task] = importlib.import_module(f'configs.{task}')
  return CONFIGS[task]


def parse_sets(values, tasks):
  """--set values -> {task: [key=value, ...]} for every task in `tasks`."""
  out = {t: [] for t in tasks}
  for v in values:
    task, sep, rest = v.partition(':')
    if not sep or not task or not rest:
      raise app.UsageError(f'--set={v!r}: expected TASK:key=value, e.g. qqp:data.path=/data/QQP')
    if task not in out:
      raise app.UsageError(f'--set={v!r}: task {task!r} is not in --tasks ({", ".join(tasks)})')
    for item in base.variant_items(rest):
      key, eq, _ = item.partition('=')
      if not eq or not key.strip():
        raise app.UsageError(f'--set={v!r}: {item!r} is not key=value (a dotted config key, e.g. '
                             'model.init=/models/bert-base-uncased)')
      if key.strip() == 'method':  # each run's method is this script's to set
        raise app.UsageError(f'--set={v!r}: the method is set per run; --set takes other keys')
      out[task].append(item.strip())
  return out


def config_for(task, method, smoke, *items):
  """The task's config: method, smoke, --overrides, then `items` (later items win)."""
  overrides = _OVERRIDES.value if flags.FLAGS.is_parsed() else ''
  arg = ','.join(filter(None, [f'method={method}', 'smoke' if smoke else '', overrides, *items]))
  return task_config(task).get_config(arg)


def stage_source(method, earlier):
  """(method of `earlier`, stages) sharing the most leading stages with `method` (None, ())."""
  best = max(earlier, key=lambda m: len(methods.shared_stages(method, base=m)), default=None)
  shared = methods.shared_stages(method, base=best) if best else ()
  return (best, shared) if shared else (None, ())


def link_stages(src, dst, names):
  """dst/<stage> -> src/<stage> for stages two runs share."""
  dst.mkdir(parents=True, exist_ok=True)
  for s in names:
    if not (dst / s).exists():
      (src / s).mkdir(parents=True, exist_ok=True)
      os.symlink(os.path.relpath(src / s, dst), dst / s)


def trained(wd, c):
  """final/ was exported from `c`'s stages as they are recorded now (no data or weights read).

  Workdirs from before stage fingerprints: every stage done and final/ exported after them.
  """
  if runs.up_to_date(wd, c):
    return True
  final = workdir_lib.final_dir(wd)
  summary, meta = final / workdir_lib.SUMMARY, final / workdir_lib.FINAL_META
  done = [wd / s / 'done.json' for s in methods.STAGES[c.method]]
  return (not meta.exists() and summary.exists() and all(d.exists() for d in done)
          and not any((wd / s / runs.FINGERPRINT).exists() for s in methods.STAGES[c.method])
          and summary.stat().st_mtime >= max(d.stat().st_mtime for d in done))


def train_once(c, wd):
  """Trains (or resumes) unless already trained; True if it did any work."""
  if trained(wd, c):  # else run() resumes, or refuses a stage trained with another setup
    return False
  trainer.run(c, wd)
  return True


class Timings(dict):
  """Seconds of real work per step, kept in <out>/timings.json so a re-run reports the first."""

  def __init__(self, path):
    super().__init__()
    try:
      self.update(fsio.read_json(path))
    except FileNotFoundError:
      pass
    except fsio.UnreadableFile as e:  # only a record of times: never a reason to stop
      logging.warning('%s; timings start afresh', e)
    self.path = path

  def run(self, key, fn):
    """fn() -> (result, did_work); its time is recorded when it did work."""
    start = time.time()
    result, did_work = fn()
    if did_work or key not in self:
      self[key] = time.time() - start
      fsio.write_json(self.path, self, indent=1)
    return result


def run_search(task, root, conf, budget, bert_acc, timings):
  """experiments/search.py on this task: LTP trials sharing mp's stage 1; the record."""
  if conf('ltp').model.final_threshold is not None:
    logging.warning('%s: model.final_threshold is set, so no calibration: the trials differ in '
                    'temperature and mask_lambda only', task)

  base = search.base_settings(conf('ltp'))

  def trial(settings, wd):
    if settings == base:  # the task's default LTP run is this trial: reuse it, never retrain
      if not wd.exists():
        wd.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(root / 'ltp', wd.parent), wd)
    else:
      link_stages(root / 'mp', wd, ('finetune',))
    c = conf('ltp', *search.items(settings))
    key = f'{task}/search {wd.name}'
    timings.run(f'{key} train', lambda: (None, train_once(c, wd)))
    dev = timings.run(f'{key} dev', lambda: selection.dev_eval(c, wd))
    e = selection.at(dev, 0.0)[0]
    return {k: e[k] for k in ('accuracy', 'flops_speedup', 'gflops_per_example')}

  return search.run(root / 'search', base, budget, bert_acc, trial)


def chosen_trial(root, conf, rec):
  """(settings, config, workdir) of the search's chosen LTP trial."""
  t = next(t for t in rec['trials'] if t['name'] == rec['chosen'])
  return t['settings'], conf('ltp', *search.items(t['settings'])), root / 'search' / t['name']


def train_searched(task, root, conf, rec, timings):
  """MP's exits on the chosen trial's backbone (its stages up to hard linked): (config, wd)."""
  settings, _, src = chosen_trial(root, conf, rec)
  wd = root / SEARCHED_DIR
  stages = methods.shared_stages('mp', base='ltp')
  if any((wd / s).is_symlink() and (wd / s).resolve() != (src / s).resolve() for s in stages):
    # Another trial was chosen before (a larger budget now): keep that run aside, start afresh.
    old = wd.with_name(f'{SEARCHED_DIR}.replaced-{time.strftime("%Y%m%d-%H%M%S")}')
    logging.warning('%s was built on another search trial; moved to %s', wd, old)
    wd.rename(old)
  link_stages(src, wd, stages)
  c = conf('mp', *search.items(settings))
  timings.run(f'{task}/{SEARCHED} train', lambda: (None, train_once(c, wd)))
  return c, wd


def parse_runs(flag, values, tasks, what):
  """--ltp_thresholds / --width_keeps values 'task:spec' -> {task: [spec, ...]}."""
  out = {}
  for item in values:
    task, sep, spec = item.partition(':')
    if not sep or not spec or task not in tasks:
      raise app.UsageError(f'--{flag} item {item!r}: expected task:{what} with task one of '
                           f'--tasks {tasks}')
    out.setdefault(task, []).append(spec)
  return out


def ltp_run_items(spec):
  """Config items of an --ltp_thresholds run 'final_threshold[+key=value...]'."""
  thr, *extra = spec.split('+')
  return [f'model.final_threshold={thr}', *extra]


def width_run_items(spec):
  """Config items of a --width_keeps run 'keep[+key=value...]'."""
  keep, *extra = spec.split('+')
  return [f'model.head_keep={keep}', f'model.ffn_keep={keep}', *extra]


def run_task(task, out, smoke, timings, ltp_runs=(), items=(), search_trials=0, width_runs=()):
  """Trains, selects and evaluates every method on one task.

  items: config items for this task (--set); ltp_runs: extra LTP runs, each
  'final_threshold[+key=value...]'; width_runs: extra costeff runs, each 'keep[+key=value...]'
  (selected and judged like the methods); search_trials: the search budget (0: no search).
  Returns {'reports': {name: report}, 'selection': {name: {rule: ...}}, 'search': record}.
  """
  root = out / task
  conf = lambda method, *extra: config_for(task, method, smoke, *items, *extra)
  todo = {}  # name -> (config, workdir)
  for i, method in enumerate(ORDER):
    wd = root / method
    src, shared = stage_source(method, ORDER[:i])
    if shared:  # e.g. ltp's stages up to hard are mp's; pyramid's width is costeff's
      link_stages(root / src, wd, shared)
    c = conf(method)
    timings.run(f'{task}/{method} train', lambda c=c, wd=wd: (None, train_once(c, wd)))
    todo[method] = (c, wd)
  for spec in width_runs:  # more width: a point further along costeff's trade-off
    wd = root / f'costeff_k{spec}'
    link_stages(root / 'mp', wd, ('finetune',))
    c = conf('costeff', *width_run_items(spec))
    timings.run(f'{task}/costeff@{spec} train', lambda c=c, wd=wd: (None, train_once(c, wd)))
    todo[f'costeff@{spec}'] = (c, wd)
  dev = {}
  for name, (c, wd) in todo.items():
    dev[name] = timings.run(f'{task}/{name} dev', lambda c=c, wd=wd: selection.dev_eval(c, wd))
  rec = None
  if search_trials > 0:
    bert_acc = selection.at(dev['bert'], 0.0)[0]['accuracy']
    rec = run_search(task, root, conf, search_trials, bert_acc, timings)
    if rec['chosen'] and chosen_trial(root, conf, rec)[0] == rec['base']:
      # The defaults won: the searched rows are the default rows (same runs, no extra work).
      todo[SEARCHED_LTP], todo[SEARCHED] = todo['ltp'], todo['mp']
    elif rec['chosen']:
      todo[SEARCHED_LTP] = chosen_trial(root, conf, rec)[1:]
      todo[SEARCHED] = train_searched(task, root, conf, rec, timings)
    if rec['chosen']:
      for name in (SEARCHED_LTP, SEARCHED):  # the trial's dev sweep is cached: no work
        dev[name] = timings.run(f'{task}/{name} dev',
                                lambda name=name: selection.dev_eval(*todo[name]))
  todo = {n: todo[n] for n in (*methods.METHODS, *todo) if n in todo}  # as the tables show them
  sel = {name: selection.select(c.method, dev[name], dev['bert'], dev['ltp'])
         for name, (c, _) in todo.items()}
  reps = {}
  for name, (c, wd) in todo.items():
    taus = [sel[name][r]['tau'] for r in compare.RULES]  # the first (bert-1) is the report's
    reps[name] = timings.run(f'{task}/{name} eval', lambda c=c, wd=wd, taus=taus: (
        selection.evaluate_once(c, wd, taus[0], taus[1:])))
  selection.judge(sel, reps, {name: wd for name, (_, wd) in todo.items()})
  for spec in ltp_runs:
    name = f'ltp@{spec}'
    wd = root / f'ltp_t{spec}'
    link_stages(root / 'mp', wd, ('finetune',))
    c = conf('ltp', *ltp_run_items(spec))
    timings.run(f'{task}/{name} train', lambda c=c, wd=wd: (None, train_once(c, wd)))
    reps[name] = timings.run(f'{task}/{name} eval',
                             lambda c=c, wd=wd: selection.evaluate_once(c, wd, 0.0))
  return {'reports': reps, 'selection': sel, 'search': rec}


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  out, tasks = pathlib.Path(_OUT.value), _TASKS.value
  if not tasks:
    raise app.UsageError(f'--tasks is empty; available: {", ".join(available_tasks())}')
  for task in tasks:
    task_config(task)
  sets = parse_sets(_SET.value, tasks)
  ltp_runs = parse_runs('ltp_thresholds', _LTP_THRESHOLDS.value, tasks, 'final_threshold')
  width_runs = parse_runs('width_keeps', _WIDTH_KEEPS.value, tasks, 'keep')
  if _SEARCH_TRIALS.value < 0:
    raise app.UsageError(f'--search_trials must be >= 0, got {_SEARCH_TRIALS.value}')
  trials = 0 if _SMOKE.value or not _SEARCH.value else _SEARCH_TRIALS.value
  for task in tasks:  # a typo in --set, --overrides, --ltp_thresholds or --width_keeps fails now
    for method in methods.METHODS:
      config_for(task, method, _SMOKE.value, *sets[task])
    for spec in ltp_runs.get(task, ()):
      config_for(task, 'ltp', _SMOKE.value, *sets[task], *ltp_run_items(spec))
    for spec in width_runs.get(task, ()):
      config_for(task, 'costeff', _SMOKE.value, *sets[task], *width_run_items(spec))
  timings, results = Timings(out / 'timings.json'), {}
  for task in tasks:
    results[task] = run_task(task, out, _SMOKE.value, timings, ltp_runs.get(task, ()),
                             sets[task], trials, width_runs.get(task, ()))
  fsio.write_json(out / 'results.json', results, indent=2)
  md = write_results(results, out, timings, sum(timings.values()), _SMOKE.value,
                     ' '.join(sys.argv), pathlib.Path(_RESULTS.value))
  print(md)


def write_results(results, out, timings, wall, smoke, command, results_md):
  """Splices the generated tables into `results_md`; returns the generated block."""
  machine = f'{timing.machine()}, Python {platform.python_version()}'
  md = tables.results_markdown(results, out, timings, machine, wall, smoke=smoke,
                               command=command, docs=results_md.parent)
  fsio.write_text(results_md,
                  tables.splice(results_md.read_text() if results_md.exists() else '', md))
  return md


if __name__ == '__main__':
  cli.run(main)

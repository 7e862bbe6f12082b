"""One command: train + evaluate BERT / LTP / FastBERT / MP on mr and bbc, write docs/RESULTS.md.

  python experiments/run.py --out=runs/paper                      # the full run (CPU: ~1 h+)
  python experiments/run.py --out=/tmp/p --smoke --tasks=mr       # a couple of minutes

Stages are shared where the methods agree (SPEC §4: each stage starts from the previous one):
bert's fine-tune is mp's stage 1, ltp's stages 1-3 are mp's, fastbert shares stage 1. A shared
stage is a symlink to the same checkpoints, so results equal separate runs, at half the cost.
Killed at any point, the same command continues where it stopped.
"""

import os
import pathlib
import platform
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from configs import bbc as bbc_config
from configs import mr as mr_config
from experiments import tables
from mp_jax import cli, fsio, methods
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading
from mp_jax.evaluation import reference, report
from mp_jax.training import runs, trainer

_OUT = flags.DEFINE_string('out', 'runs/paper', 'Directory for all workdirs.')
_TASKS = flags.DEFINE_list('tasks', ['mr', 'bbc'], 'Tasks to run.')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Tiny models and steps (tests, quick looks).')
_RESULTS = flags.DEFINE_string('results', 'docs/RESULTS.md', 'Markdown file to write.')
_OVERRIDES = flags.DEFINE_string('overrides', '', 'Extra config variant items for every run, '
                                  'e.g. train.epochs.hard=1 (a CPU budget cut).')
_LTP_THRESHOLDS = flags.DEFINE_list(
    'ltp_thresholds', [], 'Extra LTP runs for a trade-off curve: task:final_threshold, optionally '
    'followed by +key=value config items for that run only (e.g. bbc:0.005+train.epochs.hard=2).')

CONFIGS = {'mr': mr_config, 'bbc': bbc_config}
ORDER = ('mp', *(m for m in methods.METHODS if m != 'mp'))  # mp first: the others reuse its stages


def config_for(task, method, smoke, extra=''):
  overrides = _OVERRIDES.value if flags.FLAGS.is_parsed() else ''
  arg = ','.join(filter(None, [f'method={method}', 'smoke' if smoke else '', overrides, extra]))
  return CONFIGS[task].get_config(arg)


def link_stages(src, dst, names):
  """dst/<stage> -> src/<stage> for stages two methods share."""
  dst.mkdir(parents=True, exist_ok=True)
  for s in names:
    if not (dst / s).exists():
      (src / s).mkdir(parents=True, exist_ok=True)
      os.symlink(os.path.relpath(src / s, dst), dst / s)


def select_tau(config, workdir, base_acc):
  """Largest FLOPs speedup on dev whose accuracy is within 1 point of bert (paper §4)."""
  _, cfg, params, tok, _ = workdir_lib.load(workdir)
  ds = loading.load_task(config.data)
  enc = batching.encode(tok, ds['dev'], cfg.max_seq_length)
  pruning, exits = methods.eval_modes(config.method)
  res = reference.run(params, cfg, enc, pruning=pruning, exits=exits,
                      batch_size=config.eval.batch_size,
                      length_buckets=config.data.length_buckets)
  best = (0.0, 1.0)
  for tau in sorted(set(config.eval.tau_sweep) | {0.05, 0.15, 0.25, 0.4}):
    m, _, _ = reference.metrics(res, cfg, tau)
    if m['accuracy'] >= base_acc - 0.01 and m['flops_speedup'] > best[1]:
      best = (tau, m['flops_speedup'])
  return best[0]


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


def evaluate_once(c, wd, tau):
  """(report, computed?); tau: a value or a callable choosing one; a written report is reused."""
  path = wd / 'eval' / 'report.json'
  try:
    return fsio.read_json(path), False
  except FileNotFoundError:
    pass
  except fsio.UnreadableFile as e:  # e.g. a truncated write by an older version: evaluate again
    logging.warning('%s; evaluating again', e)
  rep = report.build(c, wd, tau=tau() if callable(tau) else tau)
  report.write(rep, wd / 'eval')
  return rep, True


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


def run_task(task, out, smoke, timings, ltp_runs=()):
  """Trains and evaluates every method on one task; returns {name: report}.

  ltp_runs: extra LTP runs, each 'final_threshold[+key=value...]'.
  """
  reports = {}
  for method in ORDER:
    wd = out / task / method
    if method != 'mp':
      link_stages(out / task / 'mp', wd, methods.shared_stages(method))
    c = config_for(task, method, smoke)
    timings.run(f'{task}/{method} train', lambda c=c, wd=wd: (None, train_once(c, wd)))
  dev_bert = fsio.read_json(out / task / 'bert' / 'finetune' / 'done.json')['accuracy']
  for method in ORDER:
    wd = out / task / method
    c = config_for(task, method, smoke)
    tau = lambda c=c, wd=wd, method=method: (select_tau(c, wd, dev_bert)
                                             if methods.has_exits(method) else 0.0)
    reports[method] = timings.run(f'{task}/{method} eval',
                                  lambda c=c, wd=wd, tau=tau: evaluate_once(c, wd, tau))
  for spec in ltp_runs:
    thr, *items = spec.split('+')
    name = f'ltp@{spec}'
    wd = out / task / f'ltp_t{spec}'
    link_stages(out / task / 'mp', wd, ('finetune',))
    c = config_for(task, 'ltp', smoke, ','.join([f'model.final_threshold={thr}', *items]))
    timings.run(f'{task}/{name} train', lambda c=c, wd=wd: (None, train_once(c, wd)))
    reports[name] = timings.run(f'{task}/{name} eval',
                                lambda c=c, wd=wd: evaluate_once(c, wd, 0.0))
  return reports


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  out = pathlib.Path(_OUT.value)
  ltp_runs = {}
  for item in _LTP_THRESHOLDS.value:
    task, sep, spec = item.partition(':')
    if not sep or not spec or task not in _TASKS.value:
      raise app.UsageError(f'--ltp_thresholds item {item!r}: expected task:final_threshold with '
                           f'task one of --tasks {_TASKS.value}')
    ltp_runs.setdefault(task, []).append(spec)
  timings, results = Timings(out / 'timings.json'), {}
  for task in _TASKS.value:
    results[task] = run_task(task, out, _SMOKE.value, timings, ltp_runs.get(task, ()))
  fsio.write_json(out / 'results.json', results, indent=2)
  md = write_results(results, out, timings, sum(timings.values()), _SMOKE.value,
                     ' '.join(sys.argv), pathlib.Path(_RESULTS.value))
  print(md)


def write_results(results, out, timings, wall, smoke, command, results_md):
  """Splices the generated tables into `results_md`; returns the generated block."""
  machine = (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
             f'Python {platform.python_version()}')
  md = tables.results_markdown(results, out, timings, machine, wall, smoke=smoke,
                               command=command, docs=results_md.parent)
  fsio.write_text(results_md,
                  tables.splice(results_md.read_text() if results_md.exists() else '', md))
  return md


if __name__ == '__main__':
  cli.run(main)

"""Every saved FLOP on the clock: FLOPs speedup against measured speedup, per method and task.

  python experiments/clock.py --out=runs/clock                 # models of experiments/run.py
  python experiments/clock.py --out=/tmp/clock --smoke --tasks=mr  # random tiny models, ~2 minutes

For bert, ltp, fastbert and mp on each task (their final/ in --runs/<task>/<method>, tau the
bert-1 rule's choice in --runs/results.json, else the model's own): the FLOPs
speedup, the measured speedup over the unpruned dense compiled model at batch 32 and at batch 1
(a sample of single requests), their ratios, the batch-32 speedup at every tau of
eval.tau_sweep, and the dense model against HF PyTorch for inference and for a training step
(mp_jax.evaluation.clock, mp_jax.training.speed). Per task the frameworks go first, then the
methods, each in a fresh process of its own (as a server holds one model): in one process that
had timed the others first, mp's engine on `mr` ran 1.44x and the dense program 1.35x slower
than fresh, the engine more (docs/RESULTS.md, session 33). With --nofresh all run in this one,
each method's compiled programs freed before the next. --processes=N times every part in N
processes, the parts in turn, and reports each number's median over them (and each goal's
reading process by process): the same programs read up to 11% apart from one process to the
next (docs/RESULTS.md, session 40). Each part's memory maps and resident memory are recorded.
Writes DIR/clock.json (after each task) and DIR/clock.md.
A benchmark: never run it beside another training or benchmark (2 cores: XLA processes thrash).
"""

import importlib
import itertools
import math
import os
import pathlib
import subprocess
import sys
import time
import types

import numpy as np
from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp_jax import cli, fsio, methods
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading
from mp_jax.evaluation import clock, reference, report, timing
from mp_jax.model import cpu_gemm, exit_plan, hf, pruning
from mp_jax.serving import shapes
from mp_jax.training import speed, trainer

F = {}  # the flags, defined when this file runs as a script (tests import run.py's as well)


def define_flags():
  """This script's flags (not at import: experiments/run.py defines --out and --tasks too)."""
  F.update(
      out=flags.DEFINE_string('out', None, 'Directory for clock.json and clock.md.'),
      runs=flags.DEFINE_string('runs', 'runs/paper', 'experiments/run.py --out of the models.'),
      tasks=flags.DEFINE_list('tasks', ['mr', 'bbc'], 'Task configs in configs/.'),
      methods=flags.DEFINE_list('methods', ['bert', 'ltp', 'fastbert', 'mp'], 'Methods to time.'),
      smoke=flags.DEFINE_bool('smoke', False, 'Random tiny models of the smoke configs.'),
      repeats=flags.DEFINE_integer('repeats', 5, 'Interleaved repeats (medians).'),
      single_rows=flags.DEFINE_integer('single_rows', 64, 'Single requests timed for batch 1.'),
      single_repeats=flags.DEFINE_integer(
          'single_repeats', 9, 'Interleaved repeats of the batch-1 timing (short rounds).'),
      train_batches=flags.DEFINE_integer('train_batches', 8, 'Training batches per round.'),
      torch=flags.DEFINE_bool('torch', True, 'Also time HF PyTorch (inference and training).'),
      fresh=flags.DEFINE_bool(
          'fresh', True, 'Each part of a task (the frameworks, each method) in a process of its '
          'own, as a server holds one model; else all in this one.'),
      processes=flags.DEFINE_integer('processes', 1, 'With --fresh: each part in this many '
                                     'processes, the parts in turn; medians.', lower_bound=1),
      part=flags.DEFINE_string(
          'part', None, 'Internal (--fresh): time only this part of the one task in --tasks, '
          '"frameworks" or a method, into --out/clock.json.'))
  flags.mark_flag_as_required('out')

FRAMEWORKS = clock.FRAMEWORKS  # the --part that times dense JAX against PyTorch
SMOKE_THRESHOLD = 0.02  # a random smoke model's final-layer threshold: some tokens go


def config_for(task, method, smoke):
  """configs/<task>.py's config for `method` (its smoke variant with `smoke`)."""
  try:
    module = importlib.import_module(f'configs.{task}')
  except ModuleNotFoundError as e:
    raise app.UsageError(f'--tasks: no task config configs/{task}.py') from e
  return module.get_config(','.join(filter(None, [f'method={method}', 'smoke' * smoke])))


def documented_tau(runs, task, method):
  """The bert-1 rule's tau in runs/results.json (experiments/run.py), or None."""
  try:
    sel = fsio.read_json(pathlib.Path(runs) / 'results.json')[task]['selection'][method]
  except (FileNotFoundError, KeyError):
    return None
  return float(sel['bert-1']['tau'])


def subjects(task, smoke, runs, names, tmp):
  """{method: (config, cfg, params, tau, exit plan)} and the HF directory of bert's model."""
  out = {}
  if smoke:  # one random model serves every method (speed does not depend on the values)
    config = config_for(task, 'bert', True)
    _, cfg, params, tok = trainer.build(config)
    params = dict(params, thresholds=pruning.init_thresholds(cfg.num_layers, SMOKE_THRESHOLD))
    hf_dir = tmp / task / 'hf'
    hf.save(hf_dir, cfg, params, tok)
    for m in names:
      c = config_for(task, m, True)
      out[m] = (c, cfg, params, float(c.eval.tau), None)  # the plan: fitted on the timed rows
    return out, hf_dir, tok
  tok = None
  for m in names:
    wd = pathlib.Path(runs) / task / m
    run_config, cfg, params, tok, _, plan = workdir_lib.load(wd)
    tau = documented_tau(runs, task, m)
    if tau is None:
      tau = float(run_config['eval']['tau'])
      logging.warning('%s/%s: no selection in %s/results.json; tau %g of its final/', task, m,
                      runs, tau)
    c = config_for(task, m, False)
    out[m] = (c, cfg, params, tau, exit_plan.for_eval(plan, c.eval))
  return out, workdir_lib.final_dir(pathlib.Path(runs) / task / 'bert'), tok


def measure_task(task, smoke, runs, names, tmp, *, repeats, single_rows, train_batches, torch,
                 single_repeats=None, time_methods=True):
  """The clock record of one task (`time_methods` False: the frameworks alone)."""
  subj, hf_dir, tok = subjects(task, smoke, runs, names, tmp)
  config = next(iter(subj.values()))[0]
  ds = loading.load_task(config.data)
  split = report.eval_split(config, ds)
  max_len = next(iter(subj.values()))[1].max_seq_length
  enc = batching.encode(tok, ds[split], max_len)
  rng = np.random.default_rng(0)
  single = rng.choice(len(enc), min(single_rows, len(enc)), replace=False)
  rec = {'split': split, 'num_examples': len(enc), 'mean_tokens': float(enc.lengths.mean()),
         'methods': {}}
  # The frameworks first, before this task's engines, and each method's programs freed before
  # the next: at the end of a process holding every engine of the clock, the dense program ran
  # at 0.6x its speed in a fresh one (docs/RESULTS.md, session 16; cause not isolated). The
  # process's maps and memory are recorded beside each measurement.
  rec['process'] = {'start': timing.process_state()}
  if torch:
    c, cfg, params, *_ = subj['bert'] if 'bert' in subj else next(iter(subj.values()))
    grid = shapes.for_model(shapes.resolve(c.eval), cfg.max_seq_length)
    rows = list(zip(enc.ids, enc.type_ids))
    rec['dense_vs_torch'] = clock.dense_vs_torch(cfg, params, hf_dir, rows, grid=grid,
                                                 repeats=repeats)
    train = batching.encode(tok, ds['train'], max_len)
    buckets = batching.upto(shapes.train_lengths(c.data), max_len)
    bs = int(c.train.batch_size)
    # only the batches timed are built (islice), not the whole epoch
    batches = list(itertools.islice(batching.batches(train, bs, buckets=buckets, shuffle=True,
                                                     drop_last=True), train_batches))
    rec['train_vs_torch'] = speed.train_vs_torch(c, cfg, params, hf_dir, batches,
                                                 repeats=repeats)
    release()
  for m, (c, cfg, params, tau, plan) in (subj.items() if time_methods else ()):
    grid = shapes.for_model(shapes.resolve(c.eval), cfg.max_seq_length)
    taus = c.eval.tau_sweep if methods.has_exits(m) else ()
    if smoke and methods.has_exits(m):  # a random model has no dev profile: the timed rows'
      res = reference.run(params, cfg, enc, pruning=methods.eval_modes(m)[0], exits=True,
                          batch_size=32, length_buckets=grid.length_buckets)
      plan = exit_plan.ExitPlan.from_reference(cfg, res, exit_plan.head_weight(c.eval.head_weight))
    logging.info('%s/%s: timing at tau %g', task, m, tau)
    rec['methods'][m] = clock.measure(cfg, params, m, tau, enc, grid=grid, taus=taus,
                                      repeats=repeats, single=single, plan=plan,
                                      single_repeats=single_repeats)
    release()
  rec['process']['end'] = timing.process_state()
  return rec


def release():
  """Frees the compiled programs of what was timed (engines, reference forwards)."""
  reference.clear_programs()
  timing.release()


def _batch1(r):
  """The batch-1 speedup, and the layer-count bound of its timed rows where it differs."""
  b, bound = r.get('batch1'), r.get('layer_speedup_batch1')
  if b is None or bound is None or abs(bound - r['layer_speedup']) < 5e-3:
    return _x(b)
  return f'{_x(b)} (rows timed: {_x(bound)} by layers)'


def _kept(v, goal):
  """v to 2 decimals, more where fewer would put it onto or across GOALS[goal] (0.8951: 0.895)."""
  g = GOALS[goal]
  for n in (2, 3, 4):
    text = f'{v:.{n}f}'
    if (float(text) >= g) == (v >= g):
      return text
  return f'{math.floor(v * 1e4) / 1e4:.4f}'  # below the goal by less than 5e-5: cut, not rounded


def _rounds(lo_hi, bound, goal):
  """'single rounds a-b; ': the kept fraction's range (*_range / bound, ends as _kept), or ''."""
  if not lo_hi:
    return ''
  return f'single rounds {_kept(lo_hi[0] / bound, goal)}-{_kept(lo_hi[1] / bound, goal)}; '


def _procs(values, goal):
  """'processes a, b, c; ': each process's reading (as _kept), or '' (one process)."""
  return '' if not values else f'processes {", ".join(_kept(v, goal) for v in values)}; '


def _x(v):
  return '-' if v is None else f'{v:.2f}x'


def _r(v):
  return '-' if v is None else f'{v:.2f}'


GOALS = {'kept_batch32': 0.9, 'kept_batch1_exits': 0.8, 'sweep_min': 1.0, 'dense_vs_torch': 1.1,
         'train_vs_torch': 1.0}


def markdown(res):
  """The clock table and the goal lines (issue 17)."""
  lines = ['| task | method | τ | FLOPs speedup | batch 32 | kept | shapes allow | '
           'kept by shapes | MAC rate | batch 32 fused | layer speedup | batch 1 | '
           'kept (vs rows timed, exits) | slowest τ of the sweep (batch 32) |',
           '|---' * 14 + '|']
  goals = []
  for task, t in res['tasks'].items():
    for m, r in t['methods'].items():
      sweep = r.get('sweep') or []
      # A τ where the engine runs the dense program itself is 1x by construction: its reading
      # is shown beside, not held against the goal.
      own = [e for e in sweep if not e.get('dense_program')]
      same = ', '.join(f'τ {e["tau"]:g}' for e in sweep if e.get('dense_program'))
      low = min(own, key=lambda e: e['batch32']) if own else None
      slow = '-' if low is None else f'τ {low["tau"]:g}: {_x(low["batch32"])}'
      if same:
        slow += f' ({same}: the dense program)'
      lines.append(
          f'| {task} | {m} | {r["tau"]:g} | {_x(r["flops_speedup"])} | {_x(r["batch32"])} | '
          f'{_r(r["kept_batch32"])} | {_x(r.get("shape_speedup"))} | '
          f'{_r(r.get("kept_shapes"))} | {_r(r.get("mac_rate"))} | {_x(r.get("batch32_fused"))} | '
          f'{_x(r["layer_speedup"])} | {_batch1(r)} | '
          f'{_r(r.get("kept_batch1") if methods.has_exits(m) else None)} | '
          f'{slow} |')
      if m != 'bert':
        ok = r['kept_batch32'] >= GOALS['kept_batch32']
        goals.append(f'{task} {m}: batch 32 keeps {_kept(r["kept_batch32"], "kept_batch32")} '
                     'of its FLOPs speedup '
                     f'({_procs(r.get("processes", {}).get("kept_batch32"), "kept_batch32")}'
                     f'{_rounds(r.get("batch32_range"), r["flops_speedup"], "kept_batch32")}'
                     f'goal >= {GOALS["kept_batch32"]}): {"met" if ok else "**missed**"}')
      if methods.has_exits(m) and 'kept_batch1' in r:
        ok = r['kept_batch1'] >= GOALS['kept_batch1_exits']
        bound = r.get('layer_speedup_batch1', r['layer_speedup'])
        spread = (_procs(r.get('processes', {}).get('kept_batch1'), 'kept_batch1_exits')
                  + _rounds(r.get('batch1_range'), bound, 'kept_batch1_exits'))
        goals.append(f'{task} {m}: batch 1 keeps {_kept(r["kept_batch1"], "kept_batch1_exits")} '
                     f'of its timed rows\' layer-count speedup ({spread}'
                     f'goal >= {GOALS["kept_batch1_exits"]}): '
                     f'{"met" if ok else "**missed**"}')
      if 'own_dense' in r:  # a cut model: what its smaller dense program alone gives
        o = r['own_dense']
        goals.append(f'{task} {m}: its own dense program (no exits, no pruning) runs '
                     f'{o["batch32"]:.2f}x the unpruned one at {o["flops_speedup"]:.2f}x fewer '
                     f'FLOPs (kept {o["batch32"] / o["flops_speedup"]:.2f})')
      if low is not None:
        ok = low['batch32'] >= GOALS['sweep_min']
        goals.append(f'{task} {m}: slowest τ of the sweep {low["tau"]:g} at '
                     f'{low["batch32"]:.2f}x (goal >= 1.0): {"met" if ok else "**missed**"}')
      for e in sweep:
        if e.get('dense_program'):
          goals.append(f'{task} {m}: at τ {e["tau"]:g} no head runs and nothing prunes: the '
                       f'engine runs the dense program itself, 1x by construction (measured '
                       f'{e["batch32"]:.3f}x: two timings of one program)')
  lines += ['', 'Shapes allow: the dense engine\'s padded MACs over the engine\'s (its batch and '
            'length buckets; mp_jax.serving.work); kept = kept by shapes x MAC rate.', '',
            'The sweeps (batch 32): the exit plan\'s heads (1: runs) against every head.', '',
            '| task | method | τ | heads | FLOPs speedup | shapes allow | batch 32 | '
            'every head: FLOPs | batch 32 |', '|---' * 9 + '|']
  for task, t in res['tasks'].items():
    for m, r in t['methods'].items():
      for e in r.get('sweep') or []:
        a = e.get('all_heads', {})  # absent: a record of every head (no plan)
        heads = ''.join(map(str, e['heads'])) if 'heads' in e else '-'
        lines.append(f'| {task} | {m} | {e["tau"]:g} | {heads} | '
                     f'{_x(e.get("flops_speedup"))} | {_x(e.get("shape_speedup"))} | '
                     f'{_x(e["batch32"])}{" (the dense program)" * bool(e.get("dense_program"))} | '
                     f'{_x(a.get("flops_speedup"))} | {_x(a.get("batch32"))} |')
  lines.append('')
  for task, t in res['tasks'].items():
    for key, what in (('dense_vs_torch', 'dense inference'), ('train_vs_torch', 'training step')):
      if key in t:
        v = t[key]
        ok = v['ratio'] >= GOALS[key]
        lines.append(f'- {task}, {what}: JAX {v["jax_examples_per_s"]:.1f} ex/s, PyTorch '
                     f'{v["torch_examples_per_s"]:.1f} ex/s: **{v["ratio"]:.2f}x** '
                     f'({_procs(v.get("processes"), key)}goal >= '
                     f'{GOALS[key]}x: {"met" if ok else "missed"})')
  for task, t in res['tasks'].items():
    if 'process' in t:  # at the start, with each method's engines, at the end
      p = t['process']
      head = f'- {task}, the process: '
      marks = [('start', p.get('start'))] + [(m, r['process']) for m, r in t['methods'].items()
                                             if 'process' in r] + [('end', p.get('end'))]
      if 'fresh' in p:  # a process a part: each one's state at its end
        head, marks = f'- {task}, a fresh process a part, each at its end: ', p['fresh'].items()
      lines.append(head + ', '.join(
          f'{k} {v["memory_maps"]} maps / {v["rss_gb"]:.2f} GB' for k, v in marks
          if v and v['memory_maps'] is not None))
    dense = [(m, r['seconds']['dense']) for m, r in t['methods'].items() if 'seconds' in r]
    if 'dense_vs_torch' in t and 'num_examples' in t:  # timed first, before any engine
      v = t['dense_vs_torch']
      dense.insert(0, ('beside PyTorch (bert config)',
                       t['num_examples'] / v['jax_examples_per_s']))
    if dense:
      lines.append(f'- {task}, the dense program, seconds per batch-32 pass: ' + ', '.join(
          f'{k} {v:.2f}' for k, v in dense))
  lines += ['', 'Goals (issue 17):', ''] + [f'- {g}' for g in goals]
  return '\n'.join(lines) + '\n'


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  a = types.SimpleNamespace(**{k: f.value for k, f in F.items()})
  out = pathlib.Path(a.out)
  for task in a.tasks:
    config_for(task, 'bert', a.smoke)
  if unknown := set(a.methods) - set(methods.METHODS):
    raise app.UsageError(f'--methods: unknown {sorted(unknown)}; one of {methods.METHODS}')
  if a.processes > 1 and not a.fresh:
    raise app.UsageError(f'--processes={a.processes} needs --fresh (a process a part)')
  if not a.smoke and not pathlib.Path(a.runs).is_dir():
    raise app.UsageError(f'--runs={a.runs}: no such directory (experiments/run.py --out); '
                         'or --smoke for random models')
  if a.part is not None and (len(a.tasks) != 1 or a.part not in (FRAMEWORKS, *a.methods)):
    raise app.UsageError(f'--part={a.part!r} needs one --tasks and one of {FRAMEWORKS!r} or '
                         f'--methods ({", ".join(a.methods)})')
  for f in ('clock.json', 'clock.md'):  # a run that fails leaves none of an earlier one's
    (out / f).unlink(missing_ok=True)
  res = {'command': ' '.join(sys.argv), 'date': time.strftime('%Y-%m-%d %H:%M'),
         'machine': timing.machine(), 'cpu_gemm': cpu_gemm.which(),
         'glibc_tunables': os.environ.get('GLIBC_TUNABLES'), 'smoke': a.smoke, 'tasks': {}}
  for task in a.tasks:
    if a.fresh and a.part is None:
      res['tasks'][task] = fresh_task(a, task, out / 'parts')
    else:
      names = a.methods if a.part in (None, FRAMEWORKS) else [a.part]
      if a.part == FRAMEWORKS:  # the frameworks time bert's model (else the first method's)
        names = ['bert'] if 'bert' in a.methods else a.methods[:1]
      res['tasks'][task] = measure_task(
          task, a.smoke, a.runs, names, out / 'tmp', repeats=a.repeats,
          single_rows=a.single_rows, train_batches=a.train_batches,
          torch=a.torch and a.part in (None, FRAMEWORKS), single_repeats=a.single_repeats,
          time_methods=a.part != FRAMEWORKS)
    fsio.write_json(out / 'clock.json', res, indent=2)  # after each task: a kill keeps those
  if a.part is not None:
    return
  md = markdown(res)
  fsio.write_text(out / 'clock.md', f'Generated {res["date"]} by `{res["command"]}` on '
                  f'{res["machine"]} ({res["cpu_gemm"]}).\n\n{md}')
  print(md)


def part_command(a, task, part, out) -> list[str]:
  """The command that times `part` of `task` into out/clock.json, other flags as this run's."""
  args = []
  for k, v in sorted(vars(a).items()):
    if k in ('out', 'tasks', 'fresh', 'part', 'processes') or v is None:
      continue
    if isinstance(v, bool):
      args.append(f'--{"" if v else "no"}{k}')
    else:
      args.append(f'--{k}={",".join(v) if isinstance(v, list) else v}')
  return [sys.executable, str(pathlib.Path(__file__).resolve()), f'--out={out}',
          f'--tasks={task}', *args, '--nofresh', f'--part={part}']


def fresh_task(a, task, parts_dir) -> dict:
  """The task's record, each part timed by --processes processes of its own (part_command), the
  parts in turn (so drift over the run hits each alike); medians merged."""
  parts = [FRAMEWORKS] * bool(a.torch) + list(a.methods)
  recs = {part: [] for part in parts}
  for i, part in itertools.product(range(a.processes), parts):
    out = parts_dir / (f'{task}-{part}' + (f'-{i + 1}' if i else ''))
    (out / 'clock.json').unlink(missing_ok=True)  # never a stale one read as this run's
    logging.info('%s: timing %s in a fresh process (%d)', task, part, i + 1)
    cmd = part_command(a, task, part, out)
    done = subprocess.run(cmd, check=False)
    if done.returncode:
      raise RuntimeError(f'{task}/{part}: its process exited with {done.returncode} '
                         f'({" ".join(cmd)})')
    recs[part].append(fsio.read_json(out / 'clock.json')['tasks'][task])
  return clock.merge_parts({p: clock.median_record(r) for p, r in recs.items()})


if __name__ == '__main__':
  define_flags()
  cli.run(main)

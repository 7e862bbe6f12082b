"""eval.py's report: accuracy, FLOPs and *measured* wall-clock speed, by tau and by length."""

import io
import pathlib
import zipfile

import numpy as np

from mp_jax import fsio, methods
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading, sources, tasks
from mp_jax.evaluation import plots, reference, timing
from mp_jax.model import exit_plan, width
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import shapes


def _subset(res, idx):
  return {k: v[idx] for k, v in res.items()}


def _row(m, keys=('accuracy', 'f1', 'gflops_per_example', 'dense_gflops_per_example',
                  'flops_speedup', 'mean_exit_layer', 'heads')):
  return {k: m[k] for k in keys if k in m}


class Timer:
  """Engine vs dense compiled model on the same rows, warm-up excluded."""

  def __init__(self, eng, dense, repeats):
    self.eng, self.dense, self.repeats = eng, dense, repeats

  def __call__(self, rows, tau=None, warmup=True):
    """warmup: one untimed call each first (compiles whatever programs these rows need at this
    tau: tau never recompiles, but where no head runs an engine with exits alone runs the dense
    program instead)."""
    t = timing.interleaved({'engine': lambda: self.eng.predict(rows, tau=tau),
                            'dense': lambda: self.dense.predict(rows)}, self.repeats,
                           warmup=warmup)
    n = len(rows)
    return {'examples_per_s': n / t['engine'], 'dense_examples_per_s': n / t['dense'],
            'wallclock_speedup': t['dense'] / t['engine']}


def eval_split(config, ds):
  """`eval.split` (or dev when the data has no such split); a clear error when it is empty."""
  split = config.eval.split if config.eval.split in ds else 'dev'
  if not ds.get(split):
    raise sources.DataError(
        f'eval.split={config.eval.split!r}: no examples to evaluate (source '
        f'{config.data.source!r}, path {config.data.path!r}; splits: '
        + ', '.join(f'{k} {len(v)}' for k, v in ds.items()) + ')')
  return split


def check_labels(names, ds, config, workdir):
  """tasks.check_labels of the workdir's model against the evaluation data (named by config)."""
  d = config.data
  tasks.check_labels(names, ds.label_names, f'{workdir_lib.final_dir(workdir)}',
                     f'config.data source={d.source!r} task={d.get("task")!r} '
                     f'path={d.get("path")!r}')


def build(config, workdir, tau=None, measure=True, extra_taus=()):
  """The full report dict for a trained workdir evaluated on `config.eval.split`.

  extra_taus: more halt values for the sweep of an exit method (e.g. a tau chosen elsewhere).
  `rep['_predictions']` holds per-example arrays; `write` saves them beside report.json.
  """
  _, cfg, params, tok, names, plan = workdir_lib.load(workdir)
  plan = exit_plan.for_eval(plan, config.eval)
  # The config says how to run (like tau): a float32-trained model can be served in bfloat16.
  cfg = cfg.replace(dtype=config.model.dtype)
  ds = loading.load_task(config.data)
  check_labels(names, ds, config, workdir)
  params = engine_lib.on_device(params)  # once, for the reference run and both engines
  split = eval_split(config, ds)
  enc = batching.encode(tok, ds[split], cfg.max_seq_length)
  pruning, exits = methods.eval_modes(config.method)
  # None keys: this platform's serving defaults; lengths up to the model's max_seq_length.
  grid = shapes.for_model(shapes.resolve(config.eval), cfg.max_seq_length)
  res = reference.run(params, cfg, enc, pruning=pruning, exits=exits,
                      batch_size=config.eval.batch_size, length_buckets=grid.length_buckets)
  tau = float(config.eval.tau if tau is None else tau) if exits else 0.0
  f1 = tasks.has_f1(config.data.task)
  main, exit_layer, pred = reference.metrics(res, cfg, tau, with_f1=f1, plan=plan)
  rep = {'method': config.method, 'split': split, 'dtype': cfg.dtype, **main,
         **({'head_weight': plan.weight} if plan else {}),
         # served backbone (no exit heads) against the unpruned model it was cut from
         'params': width.served_params(params), 'dense_params': width.unpruned_params(cfg)}

  kw = grid.engine_kw()
  shared = engine_lib.prepare(cfg, params)
  eng = engine_lib.Engine(cfg, shared, prune=pruning == 'hard', exits=exits, tau=tau, plan=plan,
                          **kw)
  rows = list(zip(enc.ids, enc.type_ids))
  out = eng.predict(rows)
  rep['engine_agreement'] = {
      'labels': float(np.mean(out['labels'] == pred)),
      'exit_layers': float(np.mean(out['exit_layer'] == exit_layer)),
  }
  timer = None
  if measure:
    dense = engine_lib.unpruned_dense(cfg, shared, **kw)
    timer = Timer(eng, dense, int(config.eval.bench_repeats))
    rep.update(timer(rows))
    timer.repeats = min(timer.repeats, 3)  # the sweep and length groups: 3 interleaved repeats
    rep['batch_size'] = max(grid.batch_buckets)

  sweep = {float(t) for t in (*config.eval.tau_sweep, *extra_taus)} | {tau}
  taus = sorted(sweep) if exits else [0.0]
  rep['tau_sweep'], pred_TxN, exit_TxN = [], [], []
  for t in taus:
    m, exit_N, pred_N = reference.metrics(res, cfg, t, with_f1=f1, plan=plan)
    entry = {'tau': t, **_row(m)}
    if timer:
      # One untimed call first: an engine with exits alone switches to the dense program where
      # no head runs (a set of programs the rows above may not have compiled).
      entry.update(timer(rows, tau=t))
    rep['tau_sweep'].append(entry)
    pred_TxN.append(pred_N)
    exit_TxN.append(exit_N)
  # Per example, for paired comparisons between methods (compare.paired_bootstrap).
  i32 = lambda x: np.asarray(x, np.int32)
  rep['_predictions'] = {'tau': np.asarray(taus, np.float64), 'pred': i32(pred_TxN),
                         'exit_layer': i32(exit_TxN), 'labels': i32(res['labels']),
                         'lengths': i32(res['lengths'])}

  edges = tuple(config.eval.length_groups)
  g_N = reference.length_groups(res['lengths'], edges)
  rep['by_length_bucket'] = {}
  for gi, name in enumerate(reference.GROUPS):
    idx = np.flatnonzero(g_N == gi)
    if not len(idx):
      continue
    m, _, _ = reference.metrics(_subset(res, idx), cfg, tau, with_f1=f1, plan=plan)
    entry = {'num_examples': int(len(idx)), **_row(m)}
    if timer:
      entry.update(timer([rows[i] for i in idx]))
    rep['by_length_bucket'][name] = entry
  rep['length_group_edges'] = list(edges)

  rep['tokens_kept_per_layer'] = res['n_ffn'].mean(0).tolist()
  rep['tokens_in_mean'] = float(res['lengths'].mean())
  rep['tokens_kept_fraction_per_layer'] = (res['n_ffn'].sum(0) / res['lengths'].sum()).tolist()
  return rep


def markdown(rep):
  """The report as Markdown tables (also printed by eval.py)."""
  # heads: 1 where the exit plan runs the head after that layer (SPEC §3), e.g. 01011
  f = lambda x: (f'{x:.3f}' if isinstance(x, float)
                 else ''.join(map(str, x)) if isinstance(x, list) else str(x))
  lines = [f'# {rep["method"]} on {rep["split"]} ({rep["num_examples"]} examples)', '',
           '| metric | value |', '|---|---|']
  for k in ('accuracy', 'f1', 'tau', 'gflops_per_example', 'dense_gflops_per_example',
            'flops_speedup', 'wallclock_speedup', 'examples_per_s', 'dense_examples_per_s',
            'mean_exit_layer', 'heads', 'batch_size', 'params', 'dense_params'):
    if k in rep:
      lines.append(f'| {k} | {f(rep[k])} |')
  lines.append(f'| engine agreement (labels, exit layers) | '
               f'{f(rep["engine_agreement"]["labels"])}, '
               f'{f(rep["engine_agreement"]["exit_layers"])} |')
  lines += ['', f'Exit layer histogram (layers 1..L): {rep["exit_layer_histogram"]}', '',
            'Tokens kept per layer (mean; input mean '
            f'{rep["tokens_in_mean"]:.1f}): '
            + ', '.join(f'{x:.1f}' for x in rep['tokens_kept_per_layer']), '']
  cols = ['accuracy', 'gflops_per_example', 'flops_speedup', 'wallclock_speedup',
          'mean_exit_layer', 'heads']
  lines += ['## tau sweep', '', '| tau | ' + ' | '.join(cols) + ' |',
            '|---' * (len(cols) + 1) + '|']
  for e in rep['tau_sweep']:
    lines.append(f'| {e["tau"]} | ' + ' | '.join(f(e.get(c, '-')) for c in cols) + ' |')
  lines += ['', f'## by input length (edges {rep["length_group_edges"]} tokens)', '',
            '| group | n | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 2) + '|']
  labels = reference.group_labels(rep['length_group_edges'])
  for g, e in rep['by_length_bucket'].items():
    lines.append(f'| {labels[g]} | {e["num_examples"]} | '
                 + ' | '.join(f(e.get(c, '-')) for c in cols) + ' |')
  return '\n'.join(lines) + '\n'


PREDICTIONS = 'predictions.npz'


def write(rep, outdir):
  """predictions.npz (popped from `rep`), report.md, the PNG plots, then report.json."""
  outdir = pathlib.Path(outdir)
  # A report.json left by an earlier evaluation must not vouch for the files written below.
  (outdir / 'report.json').unlink(missing_ok=True)
  preds = rep.pop('_predictions', None)
  if preds is not None:
    buf = io.BytesIO()
    np.savez(buf, **preds)
    fsio.write_bytes(outdir / PREDICTIONS, buf.getvalue())
  else:  # no stale predictions of an earlier evaluation beside this report
    (outdir / PREDICTIONS).unlink(missing_ok=True)
  md = markdown(rep)
  pngs = plots.all_plots(rep, outdir)
  fsio.write_text(outdir / 'report.md', md + '\n' + ''.join(
      f'![{p.stem}]({p.name})\n' for p in pngs))
  # Last: report.json is what experiments/run.py takes as "this evaluation is done".
  fsio.write_json(outdir / 'report.json', rep, indent=2)
  return md


def load_predictions(outdir):
  """The `_predictions` dict `write` saved in `outdir` (numpy arrays), or None if there is none."""
  path = pathlib.Path(outdir) / PREDICTIONS
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except FileNotFoundError:
    return None
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise fsio.UnreadableFile(f'{path}: not a readable .npz ({e})') from None

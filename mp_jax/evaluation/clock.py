"""Counted savings against the clock: one model's FLOPs speedup beside its measured ones.

For a model, a method and a tau, on the same rows (issue 17's table, experiments/clock.py):
  flops_speedup       dense GFLOPs / actual GFLOPs per example (SPEC §5, the reference run)
  layer_speedup       L / mean exit layer: the bound of exits at batch 1, where one request
                      streams every weight of each layer it runs (token pruning saves no weight
                      traffic there, its bound is 1)
  batch32 / batch1    dense seconds / engine seconds: the batch at the largest batch bucket, and
                      each request alone (sum over a sample of single requests)
  batch32_range / batch1_range
                      [lowest, highest] of the same ratio taken round by round (dense and engine
                      of one interleaved round): the clock's spread beside the medians' ratio
  layer_speedup_batch1
                      L / mean exit layer of that sample's rows: the bound batch1 is held to
  kept_batch32        batch32 / flops_speedup; kept_batch1 = batch1 / layer_speedup_batch1
  batch32_fused       the same engine with schedule='fused' (no layer-major schedule), when the
                      engine has one: the schedule's gain, timed against the dense program in
                      interleaved rounds of their own (not in the engine's)
  sweep               batch-32 speedup at every tau in eval.tau_sweep (exit methods);
                      dense_program: at that tau no head runs and nothing prunes, so the engine
                      runs the dense program itself (its speedup is 1 by construction, the
                      measured one is the noise of timing one program twice)
  own_dense           a cut model's own dense program (no pruning, no exits) against the unpruned
                      one: its FLOPs and batch-32 speedups, what the cut alone gives on the clock
                      (timed against the dense program in the rounds of batch32_fused)
  shape_speedup       the dense engine's padded MACs / the engine's (mp_jax.serving.work): the
                      batch-32 speedup its (batch bucket, length bucket) shapes allow
  kept_shapes         shape_speedup / flops_speedup: the part of kept_batch32 the shapes explain;
                      mac_rate = batch32 / shape_speedup is the rest (the programs' MACs/s
                      against the dense program's); kept_batch32 = kept_shapes * mac_rate
  seconds             median seconds per batch-32 pass over the rows of each program timed
                      (dense_side: the dense program's in the rounds of fused and own)
  process             the process's memory maps and resident GB with the most of this method's
                      engines alive (after the batch-32 rounds or the sweep's)
The dense program is the unpruned model's (engine.unpruned_dense), timed interleaved with the
engine (mp_jax.evaluation.timing), warm-up (compilation) excluded.

And the dense model against HF PyTorch on the same rows (inference at batch 32, each with its
usual padding; > 1: JAX is faster). The training step's ratio: mp_jax.training.speed.

experiments/clock.py times each part of a task (the frameworks, each method) in processes of
its own; `merge_parts` joins their records, `median_record` one part's records from several
processes (the same programs read up to 11% apart process to process: docs/RESULTS.md, session
40).
"""

import statistics

import numpy as np

from mp_jax import methods
from mp_jax.evaluation import benchmark, reference, timing
from mp_jax.model import flops
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import work


def measure(cfg, params, method, tau, enc, *, grid, taus=(), repeats=5, single=(), plan=None,
            single_repeats=None):
  """The clock record of one model on `enc` (module docstring); `single`: indices of the rows
  timed one request at a time, in `single_repeats` rounds (None: `repeats`); `plan`: the exit
  plan (the sweep also times every head)."""
  pruning, exits = methods.eval_modes(method)
  tau = float(tau) if exits else 0.0
  kw = grid.engine_kw()
  shared = engine_lib.prepare(cfg, params)
  eng = engine_lib.Engine(cfg, shared, prune=pruning == 'hard', exits=exits, tau=tau, plan=plan,
                          **kw)
  dense = engine_lib.unpruned_dense(cfg, shared, **kw)
  rows = list(zip(enc.ids, enc.type_ids))
  res = reference.run(params, cfg, enc, pruning=pruning, exits=exits,
                      batch_size=max(grid.batch_buckets), length_buckets=grid.length_buckets)
  m, exit_N, _ = reference.metrics(res, cfg, tau, plan=plan)
  out = {'method': method, 'tau': tau, 'num_examples': len(rows),
         'mean_tokens': float(np.mean([len(r[0]) for r in rows])),
         'batch_size': max(grid.batch_buckets), 'accuracy': m['accuracy'],
         'flops_speedup': m['flops_speedup'], 'mean_exit_layer': m['mean_exit_layer'],
         'layer_speedup': cfg.num_layers / m['mean_exit_layer']}
  call = lambda e: lambda: e.predict(rows)
  side = {}  # timed against the dense program in rounds of their own, after the engine's
  if eng.schedule is not None:
    fused = engine_lib.Engine(cfg, shared, prune=pruning == 'hard', exits=exits, tau=tau,
                              schedule='fused', plan=plan, **kw)
    side['fused'] = call(fused)
  cut = cfg.unpruned() != cfg  # static or width: its own dense program is smaller
  if cut:
    own = engine_lib.DenseEngine(cfg, shared, **kw)
    side['own'] = call(own)
  # The engine's rounds hold the engine and the dense program only, as a server holds no fused
  # engine beside its engine. Timed right after the fused one, mp's `mr` engine lost 7% against
  # the dense program in one process of three (docs/RESULTS.md, session 40; session 32 saw no
  # such effect).
  rounds = {}
  t = timing.interleaved({'engine': call(eng), 'dense': call(dense)}, repeats, warmup=True,
                         rounds=rounds)
  if side:
    # The dense program is warm from the engine's rounds: only the side programs are warmed.
    t_side = timing.interleaved({**side, 'dense': call(dense)}, repeats, warmup=tuple(side))
    t.update({k: t_side[k] for k in side}, dense_side=t_side['dense'])
  states = [timing.process_state()]  # the most engines alive at once: the process's peak
  out['seconds'] = t  # beside the others' (experiments/clock.py --nofresh): a process's drift
  out['batch32'] = t['dense'] / t['engine']
  out['batch32_range'] = timing.paired_range(rounds, 'dense', 'engine')
  out['kept_batch32'] = out['batch32'] / out['flops_speedup']
  shape = shape_speedups(cfg, res, dense)
  out['shape_speedup'] = shape(eng, tau)
  out['kept_shapes'] = out['shape_speedup'] / out['flops_speedup']
  out['mac_rate'] = out['batch32'] / out['shape_speedup']
  if 'fused' in t:
    out['batch32_fused'] = t['dense_side'] / t['fused']
    out['shape_speedup_fused'] = shape(fused, tau)
  if cut:
    n_NxL = np.repeat(enc.lengths[:, None], cfg.num_layers, 1)
    own_flops = flops.example_flops(cfg, n_NxL, n_NxL, exits=False).sum()
    out['own_dense'] = {'flops_speedup': float(flops.dense_flops(cfg, enc.lengths).sum()
                                               / own_flops),
                        'batch32': t['dense_side'] / t['own']}
  # Done with them: XLA:CPU maps memory per compiled kernel, and a process may hold at most
  # vm.max_map_count maps (65530 here; one mp engine's programs take thousands).
  fused = own = side = None
  if len(single):
    one = lambda e: lambda: [e.predict([rows[i]]) for i in single]
    # Its own rounds: a round of single requests is short (64 of mr's: under a second).
    rounds = {}
    t = timing.interleaved({'engine': one(eng), 'dense': one(dense)},
                           repeats if single_repeats is None else single_repeats, warmup=True,
                           rounds=rounds)
    out['batch1'] = t['dense'] / t['engine']
    out['batch1_range'] = timing.paired_range(rounds, 'dense', 'engine')
    # The sample's own bound: its rows exit earlier or later than the whole split's (64 of
    # bbc's 213 test rows: 2.84x against 3.19x for mp at tau 0.3; docs/RESULTS.md, session 27).
    out['layer_speedup_batch1'] = cfg.num_layers / float(exit_N[np.asarray(single)].mean())
    out['kept_batch1'] = out['batch1'] / out['layer_speedup_batch1']
    out['single_rows'] = len(single)
  if exits and taus:
    calls = {f'{float(x):g}': (lambda x=x: eng.predict(rows, tau=float(x))) for x in taus}
    every = None
    if plan is not None:  # the same engine running every head: before/after the plan
      every = engine_lib.Engine(cfg, shared, prune=pruning == 'hard', exits=exits, tau=tau, **kw)
      calls.update({f'all {float(x):g}': (lambda x=x: every.predict(rows, tau=float(x)))
                    for x in taus})
    t = timing.interleaved({**calls, 'dense': lambda: dense.predict(rows)}, repeats,
                           warmup=every is not None)
    out['sweep'] = []
    for x in taus:
      mx = reference.metrics(res, cfg, float(x), plan=plan)[0]
      entry = {'tau': float(x), 'flops_speedup': mx['flops_speedup'], 'heads': mx['heads'],
               'accuracy': mx['accuracy'], 'batch32': t['dense'] / t[f'{float(x):g}'],
               'shape_speedup': shape(eng, float(x)),
               # No head runs and nothing prunes: the engine hands its rows to the very program
               # it is timed against (a cut model's own dense program is smaller: not that).
               'dense_program': not cut and eng.route(enc.lengths, eng.halts(float(x))).engine
               is not eng}
      if every is not None:
        ma = reference.metrics(res, cfg, float(x))[0]
        entry['all_heads'] = {'flops_speedup': ma['flops_speedup'], 'accuracy': ma['accuracy'],
                              'batch32': t['dense'] / t[f'all {float(x):g}'],
                              'shape_speedup': shape(every, float(x))}
      out['sweep'].append(entry)
    states.append(timing.process_state())
  out['process'] = max(states, key=lambda s: s['memory_maps'] or 0)
  return out


def shape_speedups(cfg, res, dense):
  """shape(engine, tau): the dense engine's padded MACs over the engine's on a reference run.

  Exit layers are the reference's at tau under the engine's exit plan (mp_jax.serving.work).
  """
  n_NxL = np.repeat(res['lengths'][:, None], dense.cfg.num_layers, 1)
  dense_macs = work.engine_macs(dense, n_NxL, n_NxL)

  def shape(e, x):
    halt_L = e.halts(x)
    exit_N = reference.decide(res, x, cfg.num_layers, e.plan)[0] if e.exits else None
    return dense_macs / work.engine_macs(e, res['n_attn'], res['n_ffn'], exit_N, halt_L)
  return shape


def dense_vs_torch(cfg, params, hf_dir, rows, *, grid, repeats=5):
  """Dense JAX (the unpruned model's program) over HF PyTorch, examples/s ratio at batch 32."""
  kw = grid.engine_kw()
  dense = engine_lib.DenseEngine(cfg, engine_lib.prepare(cfg, params, stacked=False), **kw)
  tr = benchmark.TorchRunner(hf_dir)
  b = max(grid.batch_buckets)
  t = timing.interleaved({'jax': lambda: dense.predict(rows),
                          'torch': lambda: tr.predict(rows, b)}, repeats, warmup=True)
  return {'jax_examples_per_s': len(rows) / t['jax'],
          'torch_examples_per_s': len(rows) / t['torch'], 'ratio': t['torch'] / t['jax']}


FRAMEWORKS = 'frameworks'  # the part that times dense JAX against PyTorch (and a training step)
ROWS = ('split', 'num_examples', 'mean_tokens')  # which rows a part timed: alike in every part


def _rows(rec: dict) -> dict:
  return {k: rec[k] for k in ROWS}


def merge_parts(recs: dict) -> dict:
  """One task record from its parts' ({part: record}, in timing order; module docstring)."""
  first = next(iter(recs))
  rec = _rows(recs[first])
  for part, r in recs.items():  # each part encodes the rows with its own config
    if _rows(r) != rec:
      raise ValueError(f'part {part} timed other rows than {first}: {_rows(r)} against {rec}')
  rec['methods'] = {m: r['methods'][m] for m, r in recs.items() if m != FRAMEWORKS}
  rec.update({k: recs[FRAMEWORKS][k] for k in ('dense_vs_torch', 'train_vs_torch')
              if FRAMEWORKS in recs})
  rec['process'] = {'fresh': {p: r['process']['end'] for p, r in recs.items()}}
  return rec


def _median(xs, key=''):
  """xs (one value a process, alike in structure) as one: numbers their median (integers the
  lower median, so counts stay counts), `*_range` pairs [lowest, highest], the rest the first's."""
  x0 = xs[0]
  if isinstance(x0, dict):
    return {k: _median([x[k] for x in xs if k in x], k) for k in x0}
  if isinstance(x0, list) and all(isinstance(x, list) and len(x) == len(x0) for x in xs):
    if key.endswith('_range') and len(x0) == 2:
      return [min(x[0] for x in xs), max(x[1] for x in xs)]
    return [_median(list(v), key) for v in zip(*xs)]
  if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
    return statistics.median_low(xs) if all(isinstance(x, int) for x in xs) else (
        statistics.median(xs))
  return x0


def median_record(recs: list[dict]) -> dict:
  """One part's record (a task's, as measure_task writes it) from its runs in several processes.

  Every number is the median over the processes (a ratio's median, not a ratio of medians: the
  rows and the FLOPs and layer bounds must be the same in each, so kept = speedup / bound still
  holds), every `*_range` the lowest and highest round of any process. A framework ratio is the
  record of the process of the (lower) median ratio, whole, so its examples/s agree with it; the
  process state is the one of the most resident memory at its end. With more than one, each
  method's `processes` and each framework ratio's list the goal readings process by process.
  """
  same = lambda r: (_rows(r),
                    {m: (v.get('flops_speedup'), v.get('layer_speedup_batch1'))
                     for m, v in r['methods'].items()})
  for i, r in enumerate(recs[1:], 2):
    if same(r) != same(recs[0]):
      raise ValueError(f'process {i} timed other rows or bounds than process 1: {same(r)} '
                       f'against {same(recs[0])}')
  out = _median(recs)
  if len(recs) > 1:
    for m, r in out['methods'].items():
      each = {k: [x['methods'][m][k] for x in recs] for k in ('kept_batch32', 'kept_batch1')
              if k in r}
      if each:
        r['processes'] = each
    for k in ('dense_vs_torch', 'train_vs_torch'):
      if k in out:
        ratios = [x[k]['ratio'] for x in recs]
        mid = sorted(range(len(recs)), key=ratios.__getitem__)[(len(recs) - 1) // 2]
        out[k] = dict(recs[mid][k], processes=ratios)
    if 'process' in out:
      out['process'] = max((x['process'] for x in recs),
                           key=lambda p: (p.get('end') or {}).get('rss_gb') or 0)
  return out

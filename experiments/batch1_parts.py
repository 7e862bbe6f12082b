"""Where an exit engine's single requests lose against their layer bound: heads, conds, score, host.

  python experiments/batch1_parts.py --workdir=runs/paper/mr/fastbert --repeats=15

The clock's batch-1 sample (its seed-0 draw of --rows eval rows, one request at a time) through
the workdir's engine at final/'s tau and through the unpruned dense engine, each row's compiled
program called directly (host inputs, as `Engine.predict` passes them) in the forms:
  dense       the dense program
  engine      the engine's program at its halt values (each row exits where it does)
  every head  the heads the plan runs at tau (after layers 1..L-1) all running, none exiting
              (halt 1e-12: a head's normalised entropy u exits only at u <= 1e-12)
  no head     halt 0: every layer under its cond, no head (with pruning: the score and the
              hard keep too)
  no score    (pruning models) the same program built without pruning: layers and conds only
and both engines through `predict` (Ep, Dp), all in --repeats interleaved rounds (medians). With
D, N0, NP, H, E the forms' seconds over the rows and k the rows' mean exit layer of L, the kept
fraction against the rows' layer bound L/k splits exactly into factors:
  kept = (D/E) / (L/k) = D/NP [conds] * NP/N0 [score] * N0/H [heads] * (H k/L)/E [per request]
With H = F + L l (a cost F a request pays whatever its exit, l a layer's with its head) and
E = F + k l, the last is 1 - F (1 - k/L) / E: below 1 whenever F > 0. Through `predict`, the
host's steps multiply kept by (Dp/Ep)/(D/E). --age=N: then N batch-32 passes of the same engine
and dense engine over the whole split (the clock runs about 6 before its batch-1 rounds), and the
rounds again. Never run it beside another training or benchmark.
"""

import pathlib
import sys

import jax
import numpy as np
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp_jax import cli
from mp_jax.evaluation import served, timing
from mp_jax.serving import engine as engine_lib

F = {}  # the flags, defined when this file runs as a script (tests import its functions)
TINY_HALT = 1e-12  # > 0: the head runs; u <= it almost never holds


def factors(sec: dict, k_N, num_layers: int) -> dict:
  """The kept fraction's factors (module docstring) from the forms' total seconds `sec`."""
  d, e, h, n0 = sec['dense'], sec['engine'], sec['every head'], sec['no head']
  np_ = sec.get('no score', n0)
  k = float(np.mean(k_N))
  out = {'layer bound': num_layers / k, 'speedup': d / e, 'conds': d / np_, 'score': np_ / n0,
         'heads': n0 / h, 'per request': h * k / num_layers / e}
  out['kept'] = out['speedup'] / out['layer bound']
  if 'predict dense' in sec:
    out['host'] = sec['predict dense'] / sec['predict engine'] / out['speedup']
    out['kept through predict'] = out['kept'] * out['host']
  return out


def one_row(eng: engine_lib.Engine, row, halt_L):
  """A call of the compiled program `eng.predict([row])` calls, at halt values `halt_L` (host
  inputs, halts on the device)."""
  route = eng.route([len(row[0])], eng.halts())
  (_, b, t), = route.calls
  x_3xBxT = np.zeros((3, b, t), np.int32)
  n = len(row[0])
  x_3xBxT[:2, 0, :n], x_3xBxT[2, 0, :n] = row, 1
  program, ops, halt = eng.program(b, t), eng.operands(b, t), jax.device_put(halt_L)

  def call():
    with jax.transfer_guard_host_to_device('allow'):
      return jax.block_until_ready(program(ops, *x_3xBxT, halt))
  return call


def forms(sv, rows):
  """({form: a call running every row}, the rows' exit layers at the engine's tau, the engine,
  the dense engine); `sv`: a served.Served (its engine() and dense())."""
  eng, dense = sv.engine(), sv.dense()
  n_layers = eng.cfg.num_layers
  halt_L = eng.halts()
  if any(eng.route([len(r[0])], halt_L).engine is not eng for r in rows):
    raise SystemExit(f'tau {eng.tau:g}: no head runs, so predict runs the dense program')
  heads_L = np.where(halt_L > 0, TINY_HALT, 0.0).astype(np.float32)
  zero_L = np.zeros_like(halt_L)
  each = lambda e, h: [one_row(e, r, h) for r in rows]
  calls = {'dense': each(dense, zero_L), 'engine': each(eng, halt_L),
           'every head': each(eng, heads_L), 'no head': each(eng, zero_L)}
  if eng.prune:
    calls['no score'] = each(sv.engine(prune=False), zero_L)
  calls['predict engine'] = [lambda r=r: eng.predict([r]) for r in rows]
  calls['predict dense'] = [lambda r=r: dense.predict([r]) for r in rows]
  k_N = np.asarray([int(eng.predict([r])['exit_layer'][0]) for r in rows])
  early = sum(int(np.asarray(c()['exit_layer'])[0]) < n_layers for c in calls['every head'])
  if early:  # its heads' factor would hold fewer layers than the dense program's
    raise SystemExit(f'every head: {early} rows exit at halt {TINY_HALT:g} (u = 0)')
  run = lambda cs: lambda: [c() for c in cs]
  return {k: run(cs) for k, cs in calls.items()}, k_N, eng, dense


def timed(fns: dict, repeats: int, k_N, num_layers: int) -> tuple[dict, dict]:
  """(the forms' median seconds a round, {factor: [lowest, highest] over the rounds})."""
  rounds = {}
  sec = timing.interleaved(fns, repeats, warmup=True, rounds=rounds)
  per = [factors({k: v[i] for k, v in rounds.items()}, k_N, num_layers)
         for i in range(len(rounds['dense']))]
  return sec, {k: [min(f[k] for f in per), max(f[k] for f in per)] for k in per[0]}


def main(argv):
  del argv
  sv = served.load(F['workdir'].value)
  if not sv.exits:
    raise SystemExit(f'{F["workdir"].value}: {sv.task.method} has no exits')
  rng = np.random.default_rng(0)  # the clock's sample (experiments/clock.py measure_task)
  idx = rng.choice(len(sv.rows), min(F['rows'].value, len(sv.rows)), replace=False)
  rows = [sv.rows[i] for i in idx]
  fns, k_N, eng, dense = forms(sv, rows)
  n, n_layers = len(rows), sv.cfg.num_layers
  print(f'{F["workdir"].value} ({sv.task.method}, tau {sv.tau:g}): {n} single requests, '
        f'mean {np.mean([len(r[0]) for r in rows]):.1f} tokens, mean exit layer '
        f'{k_N.mean():.2f} of {n_layers}; {F["repeats"].value} rounds')
  runs = {'fresh': timed(fns, F['repeats'].value, k_N, n_layers)}
  if F['age'].value:
    for _ in range(F['age'].value):  # the same engines' batch-32 programs, as in the clock
      eng.predict(sv.rows)
      dense.predict(sv.rows)
    runs[f'after {F["age"].value} batch-32 passes'] = timed(fns, F['repeats'].value, k_N,
                                                            n_layers)
  cols = ' | '.join(runs)
  print(f'\n| form | ms a request: {cols} |\n|---|' + '---|' * len(runs))
  for k in fns:
    print(f'| {k} | ' + ' | '.join(f'{s[k] / n * 1e3:.3f}' for s, _ in runs.values()) + ' |')
  fs = {name: factors(s, k_N, n_layers) for name, (s, _) in runs.items()}
  print(f'\n| factor (rounds: lowest-highest) | {cols} |\n|---|' + '---|' * len(runs))
  for k in fs['fresh']:
    cells = [f'{fs[name][k]:.3f} ({r[k][0]:.3f}-{r[k][1]:.3f})' for name, (_, r) in runs.items()]
    print(f'| {k} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  F.update(workdir=flags.DEFINE_string('workdir', None, 'A trained workdir with exits.'),
           rows=flags.DEFINE_integer('rows', 64, 'Single requests (the clock samples 64).'),
           repeats=flags.DEFINE_integer('repeats', 15, 'Interleaved rounds (medians).'),
           age=flags.DEFINE_integer('age', 0, 'Then this many batch-32 passes of the engine and '
                                    'the dense program over the split, and the rounds again.'))
  flags.mark_flag_as_required('workdir')
  cli.run(main)

"""Where an exit engine's single requests lose against their layer bound: heads, conds, score, host.

  python experiments/batch1_parts.py --workdir=runs/paper/mr/fastbert --repeats=15

The clock's batch-1 sample (its seed-0 draw of --rows eval rows, one request at a time) through
the workdir's engine at final/'s tau and through the unpruned dense engine, each row's compiled
program called directly (host inputs, as `Engine.predict` passes them) in the forms:
  dense       the dense program
  engine      the engine's program at its halt values (each row exits where it does)
  every head  the same heads running at every layer, none exiting (halt 1e-12: a head's
              normalised entropy u exits only at u <= 1e-12)
  no head     halt 0: every layer under its cond, no head (with pruning: the score and the
              hard keep too)
  no score    (pruning models) the same program built without pruning: layers and conds only
and both engines through `predict`, all in --repeats interleaved rounds (medians a row). With D,
N0, NP, H, E the forms' seconds over the rows and k the rows' mean exit layer of L, the kept
fraction against the rows' layer bound L/k splits exactly into factors:
  kept = (D/E) / (L/k) = D/NP [conds] * NP/N0 [score] * N0/H [heads] * (H k/L)/E [skipped layers]
The last is below 1 where what a request pays regardless of its exit (embeddings, the program's
call, its outputs) takes a share of H larger than its layers'. Through `predict`, the host's
steps multiply it by (Dp/Ep)/(D/E). --age=N: then N batch-32 passes of the engine and the dense
engine over the whole split (what the clock runs before its batch-1 rounds), and the rounds again.
Never run it beside another training or benchmark.
"""

import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp_jax import cli
from mp_jax.evaluation import served
from mp_jax.serving import engine as engine_lib

F = {}  # the flags, defined when this file runs as a script (tests import its functions)
TINY_HALT = 1e-12  # > 0: the head runs; u <= it almost never holds


def factors(sec: dict, k_N, num_layers: int) -> dict:
  """The kept fraction's factors (module docstring) from the forms' total seconds `sec`."""
  d, e, h, n0 = sec['dense'], sec['engine'], sec['every head'], sec['no head']
  np_ = sec.get('no score', n0)
  k = float(np.mean(k_N))
  out = {'layer bound': num_layers / k, 'speedup': d / e, 'conds': d / np_, 'score': np_ / n0,
         'heads': n0 / h, 'skipped layers': h * k / num_layers / e}
  out['kept'] = out['speedup'] / out['layer bound']
  if 'predict dense' in sec:
    out['host'] = sec['predict dense'] / sec['predict engine'] / out['speedup']
    out['kept through predict'] = out['kept'] * out['host']
  return out


def one_row(eng: engine_lib.Engine, row, halt_L):
  """A call of `eng`'s compiled one-row program on `row` (host inputs, halts on the device)."""
  (_, b, t), = eng.route([len(row[0])], eng.halts()).calls
  x_3xBxT = np.zeros((3, b, t), np.int32)
  n = len(row[0])
  x_3xBxT[:2, 0, :n], x_3xBxT[2, 0, :n] = row, 1
  program, ops, halt = eng.program(b, t), eng.operands(b, t), jax.device_put(halt_L)

  def call():
    with jax.transfer_guard_host_to_device('allow'):
      return jax.block_until_ready(program(ops, *x_3xBxT, halt))
  return call


def forms(sv: served.Served, rows) -> tuple[dict, np.ndarray]:
  """{form: [a call per row]} (module docstring) and the rows' exit layers at the engine's tau."""
  eng, dense = sv.engine(), sv.dense()
  halt_L = eng.halts()
  heads_L = np.where(halt_L > 0, TINY_HALT, 0.0).astype(np.float32)
  zero_L = np.zeros_like(halt_L)
  out = {'dense': [one_row(dense, r, zero_L) for r in rows],
         'engine': [one_row(eng, r, halt_L) for r in rows],
         'every head': [one_row(eng, r, heads_L) for r in rows],
         'no head': [one_row(eng, r, zero_L) for r in rows]}
  if eng.prune:
    bare = sv.engine(prune=False)
    out['no score'] = [one_row(bare, r, zero_L) for r in rows]
  out['predict engine'] = [lambda r=r: eng.predict([r]) for r in rows]
  out['predict dense'] = [lambda r=r: dense.predict([r]) for r in rows]
  k_N = np.asarray([int(eng.predict([r])['exit_layer'][0]) for r in rows])
  every = [int(np.asarray(c()['exit_layer'])[0]) for c in out['every head']]
  if min(every) < sv.cfg.num_layers:
    print(f'every head: {sum(e < sv.cfg.num_layers for e in every)} rows exit anyway (u = 0)')
  return out, k_N


def timed(calls: dict, repeats: int) -> dict:
  """{form: median seconds a round over all its rows}, forms interleaved round by round."""
  for cs in calls.values():  # compiled and warm
    for c in cs:
      c()
  rounds = {k: [] for k in calls}
  for _ in range(repeats):
    for k, cs in calls.items():
      start = time.perf_counter()
      for c in cs:
        c()
      rounds[k].append(time.perf_counter() - start)
  return {k: statistics.median(v) for k, v in rounds.items()}


def main(argv):
  del argv
  sv = served.load(F['workdir'].value)
  if not sv.exits:
    raise SystemExit(f'{F["workdir"].value}: {sv.task.method} has no exits')
  rng = np.random.default_rng(0)  # the clock's sample (experiments/clock.py measure_task)
  idx = rng.choice(len(sv.rows), min(F['rows'].value, len(sv.rows)), replace=False)
  rows = [sv.rows[i] for i in idx]
  calls, k_N = forms(sv, rows)
  n = len(rows)
  print(f'{F["workdir"].value} ({sv.task.method}, tau {sv.tau:g}): {n} single requests, '
        f'mean {np.mean([len(r[0]) for r in rows]):.1f} tokens, mean exit layer '
        f'{k_N.mean():.2f} of {sv.cfg.num_layers}; {F["repeats"].value} rounds')
  secs = {'fresh': timed(calls, F['repeats'].value)}
  if F['age'].value:
    # What the clock runs in a method's process before its batch-1 rounds: the batch-32 rounds.
    eng, dense = sv.engine(), sv.dense()
    for _ in range(F['age'].value):
      eng.predict(sv.rows)
      dense.predict(sv.rows)
    secs[f'after {F["age"].value} batch-32 passes'] = timed(calls, F['repeats'].value)
  print('\n| form | ' + ' | '.join(f'ms a request, {k}' for k in secs) + ' |\n|---|'
        + '---|' * len(secs))
  for k in secs['fresh']:
    print(f'| {k} | ' + ' | '.join(f'{s[k] / n * 1e3:.3f}' for s in secs.values()) + ' |')
  fs = {k: factors(s, k_N, sv.cfg.num_layers) for k, s in secs.items()}
  print('\n| factor | ' + ' | '.join(secs) + ' |\n|---|' + '---|' * len(secs))
  for k in fs['fresh']:
    print(f'| {k} | ' + ' | '.join(f'{f[k]:.3f}' for f in fs.values()) + ' |')


if __name__ == '__main__':
  F.update(workdir=flags.DEFINE_string('workdir', None, 'A trained workdir with exits.'),
           rows=flags.DEFINE_integer('rows', 64, 'Single requests (the clock samples 64).'),
           repeats=flags.DEFINE_integer('repeats', 15, 'Interleaved rounds (medians).'),
           age=flags.DEFINE_integer('age', 0, 'Then this many batch-32 passes of the engine and '
                                    'the dense program over the split, and the rounds again.'))
  flags.mark_flag_as_required('workdir')
  cli.run(main)

"""Does the program timed just before an engine change the engine's time? The clock's rounds.

  python experiments/round_neighbours.py --workdir=runs/paper/mr/mp --blocks=9

The workdir's engine (E: its method at its final/ tau, its exit plan, the eval config's serving
shapes), the unpruned dense program (D) and the same engine with schedule='fused' (F) predict
the eval split at batch 32, all built and warm before any timing, after one reference pass over
the split (as experiments/clock.py runs them). Then blocks of --repeats interleaved rounds, the
kinds in turn (KINDS), each block after one untimed round of its own: A times E and D alone; B
adds F after D, so E follows F from the round before (the clock's rounds before session 40); C
puts F between E and D, so E follows D. Prints each block (medians, the dense/engine speedup,
E's rounds) and per kind the median over its blocks. Never run it beside another training or
benchmark (2 cores: XLA processes thrash).
"""

import json
import pathlib
import statistics
import sys

from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp_jax import cli
from mp_jax.evaluation import reference, served, timing

F = {}  # the flags, defined when this file runs as a script (tests import its functions)
# Each kind's call order within a round; rounds repeat it, so the last call precedes the first.
KINDS = {'A': ('engine', 'dense'), 'B': ('engine', 'dense', 'fused'),
         'C': ('engine', 'fused', 'dense')}


def define_flags():
  """This script's flags."""
  F.update(workdir=flags.DEFINE_string('workdir', None, 'A trained workdir with exits or '
                                       'pruning (its final/ weights).'),
           blocks=flags.DEFINE_integer('blocks', 9, 'Blocks, the kinds in turn.', lower_bound=1),
           repeats=flags.DEFINE_integer('repeats', 5, 'Interleaved rounds a block.',
                                        lower_bound=1))
  flags.mark_flag_as_required('workdir')


def before(kind: str, name: str) -> str:
  """The call that runs just before `name` in a kind's rounds (the round before's last)."""
  order = KINDS[kind]
  return order[order.index(name) - 1]


def summary(blocks: list[dict]) -> dict:
  """{kind: {'blocks', 'speedup', 'engine_s', 'dense_s'}}: medians over each kind's blocks."""
  out = {}
  for kind in KINDS:
    own = [b for b in blocks if b['kind'] == kind]
    if own:
      med = lambda k, own=own: statistics.median(b[k] for b in own)
      out[kind] = {'blocks': len(own), 'speedup': med('speedup'), 'engine_s': med('engine'),
                   'dense_s': med('dense')}
  return out


def main(argv):
  del argv
  wd = F['workdir'].value
  sv = served.load(wd)
  rows, tau = sv.rows, sv.tau
  eng = sv.engine()
  if eng.schedule is None:  # nothing prunes or exits, or these serving shapes run no schedule
    raise SystemExit(f'{wd}: its engine ({sv.task.method}) has no layer-major schedule: its '
                     'fused engine is the engine itself')
  programs = {'engine': eng, 'dense': sv.dense(), 'fused': sv.engine(schedule='fused')}
  reference.run(sv.trained.params, sv.cfg, sv.enc, pruning=sv.pruning, exits=sv.exits,
                batch_size=max(eng.batch_buckets), length_buckets=eng.length_buckets)
  calls = {k: (lambda e=e: e.predict(rows)) for k, e in programs.items()}
  for fn in calls.values():
    fn()
  print(f'{wd} ({sv.task.method}, tau {tau:g}): {len(rows)} rows, {F["repeats"].value} rounds a '
        'block', flush=True)
  blocks = []
  for i in range(F['blocks'].value):
    kind = list(KINDS)[i % len(KINDS)]
    rounds = {}
    # An untimed round first, so that every timed one follows the kind's own last call.
    t = timing.interleaved({k: calls[k] for k in KINDS[kind]}, F['repeats'].value,
                           warmup=True, rounds=rounds)
    blocks.append({'block': i, 'kind': kind, 'engine_after': before(kind, 'engine'),
                   'engine': t['engine'], 'dense': t['dense'],
                   'speedup': t['dense'] / t['engine'],
                   'engine_rounds': [round(x, 4) for x in rounds['engine']]})
    print(json.dumps(blocks[-1]), flush=True)
  print('\n| kind | engine follows | blocks | speedup (median) | engine s | dense s |\n'
        '|---|---|---|---|---|---|')
  for kind, s in summary(blocks).items():
    print(f'| {kind} | {before(kind, "engine")} | {s["blocks"]} | {s["speedup"]:.3f}x | '
          f'{s["engine_s"]:.3f} | {s["dense_s"]:.3f} |')


if __name__ == '__main__':
  define_flags()
  cli.run(main)

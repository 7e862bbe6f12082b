"""How much of a predict pass the device spends idle, waiting for the host: engine and dense.

  python experiments/host_gaps.py --workdir=runs/paper/mr/ltp

The workdir's engine (its method, its eval tau and exit plan, the eval config's serving shapes)
and the unpruned dense program each predict the eval split, warm, under jax.profiler.trace,
--passes times. In each trace, XLA:CPU's `ThunkExecutor::Execute` events (and the client
thread's `... (wait for completion)`) are the programs running; merged over threads, their union
is the time the device had work. The pass is the span of its own annotation (PASS); the rest of
it is host time the device waited through: the input assembly before the first program,
Engine.route's and the layer-major schedule's planning between two layers (the host waits for
every call of a layer, then plans the next), and each call's dispatch. Prints, per program, the
pass of median busy share: its wall ms, busy share, idle ms, idle in gaps over 1 ms, and its five
largest gaps with their offsets from its start. Busy means some program was running, not that
every core was. The trace (Python's events included) slows the host, so the idle read here is
an upper bound; time programs with experiments/clock.py. Never run it beside another training
or benchmark (2 cores: XLA processes thrash).
"""

import gzip
import json
import pathlib
import sys
import tempfile

import jax
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp_jax import cli
from mp_jax.evaluation import served

F = {}  # the flags, defined when this file runs as a script (tests import its functions)
# XLA:CPU's events for a program (or a nested part) running: its thunks' `Execute` on the pool,
# and the client thread's `Execute (wait for completion)`, which spans the whole program.
EXECUTE = 'ThunkExecutor::Execute'
PASS = 'host_gaps.pass'  # the annotation around one traced pass: its span in the trace's clock


def define_flags():
  F.update(workdir=flags.DEFINE_string('workdir', None, 'A trained workdir (its final/ weights).'),
           passes=flags.DEFINE_integer('passes', 3, 'Traced passes a program (the median\'s '
                                       'row).', lower_bound=1))
  flags.mark_flag_as_required('workdir')


def busy_intervals(events) -> list[list[float]]:
  """The union of the programs' running intervals [start, end] (us), sorted."""
  spans = sorted((e['ts'], e['ts'] + e['dur']) for e in events
                 if e.get('ph') == 'X' and e.get('name', '').startswith(EXECUTE))
  out = []
  for a, b in spans:
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return out


def gaps(busy, start, end) -> list[tuple[float, float]]:
  """[(idle us, its offset from `start` in us)] of [start, end] outside the busy intervals."""
  busy = [[max(a, start), min(b, end)] for a, b in busy if b > start and a < end]
  edges = [start, *[x for span in busy for x in span], end]
  return [(b - a, a - start) for a, b in zip(edges[0::2], edges[1::2]) if b > a]


def traced_pass(predict):
  """(wall us, gaps) of one predict() under the profiler, both in the trace's clock."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True), jax.profiler.TraceAnnotation(PASS):
      predict()
    with gzip.open(next(pathlib.Path(d).rglob('perfetto_trace.json.gz'))) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  busy = busy_intervals(events)
  if not busy:  # a JAX that names its events otherwise: say so rather than read 0% busy
    raise SystemExit(f'no {EXECUTE!r} events in the trace: XLA:CPU renamed them?')
  own = [e for e in events if e.get('ph') == 'X' and e.get('name') == PASS]
  if len(own) != 1:
    raise SystemExit(f'{len(own)} {PASS!r} events in the trace, expected 1')
  start, end = own[0]['ts'], own[0]['ts'] + own[0]['dur']
  return end - start, gaps(busy, start, end)


def main(argv):
  del argv
  wd, passes = F['workdir'].value, F['passes'].value
  sv = served.load(wd)
  rows, tau = sv.rows, sv.tau
  programs = {'engine': sv.engine(), 'dense': sv.dense()}
  for eng in programs.values():  # compiled and warm before any trace
    eng.predict(rows)
    eng.predict(rows)
  print(f'{wd} ({sv.task.method}, tau {tau:g}): {len(rows)} requests, {passes} traced passes '
        'each\n')
  print('| program | wall ms | busy | idle ms | idle in gaps > 1 ms | largest gaps: ms at ms |\n'
        '|---|---|---|---|---|---|')
  for name, eng in programs.items():
    traced = [traced_pass(lambda eng=eng: eng.predict(rows)) for _ in range(passes)]
    idle = [sum(g for g, _ in gs) for _, gs in traced]
    # One pass for every column: the one of median busy share (the upper median if even).
    i = sorted(range(passes), key=lambda j: idle[j] / traced[j][0])[passes // 2]
    (wall, gs), idle = traced[i], idle[i]
    big = sum(g for g, _ in gs if g > 1e3)
    top = ', '.join(f'{g / 1e3:.1f} at {t / 1e3:.0f}' for g, t in sorted(gs, reverse=True)[:5])
    print(f'| {name} | {wall / 1e3:.0f} | {1 - idle / wall:.1%} | {idle / 1e3:.1f} | '
          f'{big / 1e3:.1f} | {top} |')


if __name__ == '__main__':
  define_flags()
  cli.run(main)

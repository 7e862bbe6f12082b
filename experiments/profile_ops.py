"""Where a program's time goes, kernel by kernel: XLA:CPU's own trace events, summed.

  python experiments/profile_ops.py --workdir=runs/paper/mr/bert --program=train
  python experiments/profile_ops.py --workdir=runs/paper/mr/mp --program=engine --shape=1x28

XLA:CPU emits one trace event per executed kernel (thunk) under
--xla_cpu_enable_xprof_traceme (set here, before JAX starts); jax.profiler writes them as a
Perfetto trace. Each event's self time (its duration minus its children's, per thread) is summed
per kernel over --rounds calls after three untimed ones, then grouped by (kind, shape, source op):
the kernel's name without its number, and its shape and op_name in the program's optimised HLO.
Programs, at --shape (B x T):
  train   the fine-tuning step (speed.finetune_step, the one train_vs_torch times) on
          shuffled train batches of the workdir's task padded to T (rows longer than T dropped)
  dense   the unpruned dense program on the task's eval rows of at most T tokens, padded to T
  engine  the workdir's fused program (its pruning and exits at its tau, the serving shapes of its
          eval config) on the same rows; Engine.predict may run short requests layer-major
          instead (mp_jax.serving.schedule)
Events that are not the program's kernels (the runtime's, Python's) are left out of the table.
Kernels of a dot handed to a library (ynn_fusion) run on the intra-op pool, so their event is
their wall time; plain `dot` kernels (Eigen) may run partly outside their event. The trace adds
overhead: compare kernels within one profile, and time programs with the clock. Never run it
beside another training or benchmark (2 cores: XLA processes thrash).
"""

import os

if 'xla_cpu_enable_xprof_traceme' not in os.environ.get('XLA_FLAGS', ''):  # cli.run re-executes
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                             + ' --xla_cpu_enable_xprof_traceme=true').strip()

import collections
import gzip
import itertools
import json
import pathlib
import re
import sys
import tempfile

import jax
import ml_collections
import numpy as np
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp_jax import cli
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading
from mp_jax.evaluation import served
from mp_jax.training import speed

PROGRAMS = ('train', 'dense', 'engine')
_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir (its final/ weights).')
_PROGRAM = flags.DEFINE_enum('program', 'train', PROGRAMS, 'Which program.')
_SHAPE = flags.DEFINE_string('shape', '32x56', 'batch x length.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Traced calls (after three untimed).')
_TOP = flags.DEFINE_integer('top', 25, 'Rows of the table.')
flags.mark_flag_as_required('workdir')


def self_ms(events, calls):
  """{kernel name: self ms per call} from Perfetto 'X' events (nesting per thread)."""
  by_thread = collections.defaultdict(list)
  for e in events:
    if e.get('ph') == 'X':
      by_thread[e['pid'], e['tid']].append(dict(e, child=0))
  out = collections.Counter()
  for es in by_thread.values():
    es.sort(key=lambda e: (e['ts'], -e['dur']))
    stack = []
    for e in es:
      while stack and stack[-1]['ts'] + stack[-1]['dur'] <= e['ts']:
        stack.pop()
      if stack:
        stack[-1]['child'] += e['dur']
      stack.append(e)
    for e in es:
      out[e['name']] += (e['dur'] - e['child']) / 1e3 / calls
  return out


def hlo_index(text):
  """{instruction name: (shape, op_name tail)} of an optimised HLO module's text."""
  out = {}
  # A multi-output fusion's shape is a tuple: (f32[384]{0}, f32[384]{0}).
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) [\w-]+\((.*)$', text, re.M):
    op = re.search(r'op_name="([^"]*)"', m.group(3))
    tail = re.sub(r'layer_\d+', 'layer_*', '/'.join(op.group(1).split('/')[-3:])) if op else ''
    out[m.group(1)] = (re.sub(r'\{[^}]*\}', '', m.group(2)), tail)
  return out


def program(wd, kind, b, t):
  """(compiled program, a zero-arg call of it on real rows) of the workdir's model at b x t."""
  if kind == 'train':
    tr = workdir_lib.load(wd)
    cfg = tr.cfg
    task = ml_collections.ConfigDict(tr.config)  # the run's own config (its workdir's config.json)
    ds = loading.load_task(task.data)
    enc = batching.encode(tr.tokenizer, ds['train'], cfg.max_seq_length)
    keep = np.flatnonzero(enc.lengths <= t)
    enc = batching.Encoded([enc.ids[i] for i in keep], [enc.type_ids[i] for i in keep],
                           enc.labels[keep], enc.lengths[keep], enc.pad_id)
    if len(keep) < b:
      raise SystemExit(f'--shape={b}x{t}: only {len(keep)} train rows of <= {t} tokens')
    batch = next(batching.batches(enc, b, buckets=(t,), shuffle=True, drop_last=True))
    step, state, frozen = speed.finetune_step(task, cfg, tr.params)
    args = [jax.device_put(state), frozen, jax.device_put(batch), jax.random.PRNGKey(0)]
    compiled = step.lower(*args).compile()

    def call():  # the state is donated: each call feeds the next its own
      args[0], _ = compiled(*args)
      return args[0]
    return compiled, call
  sv = served.load(wd)
  enc = sv.enc
  rng = np.random.default_rng(0)
  rows = rng.permutation(np.flatnonzero(enc.lengths <= t))[:b]
  if len(rows) < b:
    raise SystemExit(f'--shape={b}x{t}: only {len(rows)} eval rows of <= {t} tokens')
  ids, types, mask = (np.zeros((b, t), np.int32) for _ in range(3))
  for i, r in enumerate(rows):
    n = enc.lengths[r]
    ids[i, :n], types[i, :n], mask[i, :n] = enc.ids[r], enc.type_ids[r], 1
  eng = sv.dense() if kind == 'dense' else sv.engine(schedule='fused')
  compiled = eng.program(b, t)
  halt = jax.device_put(eng.halts())
  ops, x = eng.operands(b, t), [jax.device_put(a) for a in (ids, types, mask)]
  return compiled, lambda: compiled(ops, *x, halt)


def main(argv):
  del argv
  b, t = (int(v) for v in _SHAPE.value.split('x'))
  compiled, call = program(_WORKDIR.value, _PROGRAM.value, b, t)
  for _ in range(3):  # compiled above; warm: the allocator's pages, the threads
    jax.block_until_ready(call())
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(_ROUNDS.value):
        jax.block_until_ready(call())
    trace = next(pathlib.Path(d).rglob('perfetto_trace.json.gz'))
    with gzip.open(trace) as f:
      events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  ms = self_ms(events, _ROUNDS.value)
  index = hlo_index(compiled.as_text())
  groups = collections.defaultdict(lambda: [0.0, 0])
  for name, v in ms.items():
    if name in index:  # kernels of the program (not the runtime's or Python's own events)
      shape, op = index[name]
      g = groups[re.sub(r'(\.\d+)+$', '', name), shape, op]
      g[0] += v
      g[1] += 1
  if not groups:
    raise SystemExit('no kernel events in the trace: did --xla_cpu_enable_xprof_traceme apply?')
  total = sum(v for v, _ in groups.values())
  print(f'{_WORKDIR.value} {_PROGRAM.value} {b} x {t}: kernels {total:.2f} ms per call (self '
        f'time, {_ROUNDS.value} traced calls)\n')
  print('| kernel | shape | source op | kernels | ms per call | share |\n|---|---|---|---|---|---|')
  for (kind, shape, op), (v, n) in itertools.islice(
      sorted(groups.items(), key=lambda kv: -kv[1][0]), _TOP.value):
    print(f'| {kind} | {shape} | {op} | {n} | {v:.2f} | {v / total:.1%} |')
  kinds = collections.Counter()
  for (kind, _, _), (v, _) in groups.items():
    kinds[kind] += v
  print('\nby kind: ' + ', '.join(f'{k} {v:.1f} ms' for k, v in kinds.most_common(8)))


if __name__ == '__main__':
  cli.run(main)

"""Warm-up cost of a bert-base-shaped engine: programs, compile seconds, compiled memory.

  python experiments/warmup.py --out=runs/warmup/cpu.json                # CPU serving defaults
  python experiments/warmup.py --platform=tpu --train_stages= --out=runs/warmup/accel.json

Builds BERT-base (vocab 30522, 12 layers, 768 wide, 12 heads, FFN 3072) at max_seq_length 128
with random parameters, then runs a full `warmup()` of the pruning + exits `Engine` and of the
`DenseEngine` under the serving shapes `mp_jax.serving.shapes.defaults(--platform)` (or explicit
--length_buckets/--batch_buckets/--chunk_tokens), and compiles the train step of each of
--train_stages at --batch x 128. Everything compiles for the local backend: on this machine the
memory figures are XLA:CPU's `memory_analysis()`, a CPU-compiled estimate of what the same
program needs on an accelerator, not a measurement there. The persistent compilation cache is
switched off (a cache hit would fake the compile seconds); each program must show one XLA
backend compile. Writes a JSON and prints markdown tables.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

sys.path.insert(0, __file__.rsplit('/', 2)[0])

from mp_jax import cli, fsio
from mp_jax.data import batching
from mp_jax.evaluation import timing
from mp_jax.model import bert
from mp_jax.model import config as model_config
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import programs, shapes
from mp_jax.training import stages, trainer

MEMORY_FIELDS = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
                 'temp_size_in_bytes', 'generated_code_size_in_bytes')


def bert_base(max_seq_length=128, num_layers=12, **kw) -> model_config.ModelConfig:
  """bert-base-uncased's shape (random weights need no download)."""
  return model_config.ModelConfig(vocab_size=30522, hidden_size=768, num_layers=num_layers,
                                  num_heads=12, intermediate_size=3072, num_labels=2,
                                  max_seq_length=max_seq_length, **kw)


def disable_compilation_cache():
  """Every compile below must really compile: no persistent cache reads or writes."""
  jax.config.update('jax_enable_compilation_cache', False)
  return {'JAX_COMPILATION_CACHE_DIR': os.environ.get('JAX_COMPILATION_CACHE_DIR'),
          'jax_enable_compilation_cache': jax.config.jax_enable_compilation_cache}


def memory(compiled) -> dict:
  """memory_analysis() fields of a compiled program, plus peak = args + out - alias + temp."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, k)) for k in MEMORY_FIELDS}
  out['peak_bytes'] = (out['argument_size_in_bytes'] + out['output_size_in_bytes']
                       - out['alias_size_in_bytes'] + out['temp_size_in_bytes'])
  return out


def num_branches(eng, batch, length) -> int:
  """Branches of each per-layer lax.switch in the (batch, length) program (1: no switch)."""
  if isinstance(eng, engine_lib.DenseEngine) or programs.unrolls(batch, length,
                                                                   eng.chunk_tokens):
    return 1  # the dense program, the one-row form: no switch
  rows = programs.chunk_rows(batch, length, eng.chunk_tokens)
  bbs = batching.upto(eng.batch_buckets, rows) if eng.exits else (rows,)
  lbs = batching.upto(eng.length_buckets, length) if eng.prune else (length,)
  return len(bbs) * len(lbs)


def warm(eng) -> list[dict]:
  """Full warm-up, one program at a time; per program compile seconds and memory."""
  rows = []
  for b, t in eng.program_shapes():
    before, cpu = timing.backend_compiles(), time.process_time()
    compiled = eng.program(b, t)
    rows.append(dict(batch=b, length=t, compile_s=eng.compile_seconds[(b, t)],
                     compile_cpu_s=time.process_time() - cpu,
                     backend_compiles=timing.backend_compiles() - before,
                     branches=num_branches(eng, b, t), **memory(compiled)))
  return rows


def summary(rows) -> dict:
  return {'programs': len(rows), 'compile_s': sum(r['compile_s'] for r in rows),
          'compile_cpu_s': sum(r['compile_cpu_s'] for r in rows),
          'max_peak_bytes': max(r['peak_bytes'] for r in rows),
          'max_temp_bytes': max(r['temp_size_in_bytes'] for r in rows),
          'code_bytes': sum(r['generated_code_size_in_bytes'] for r in rows),
          'backend_compiles': sum(r['backend_compiles'] for r in rows)}


def tree_bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def train_step_memory(cfg, params, stage, batch, length, method='mp') -> dict:
  """Compiles train.make_step's step of `stage` (donated state, as run_stage) for its memory."""
  tc = _train_config()
  train_p, frozen = stages.split(params, stage)
  tx = stages.optimizer(stage, train_p, 1000, tc)
  state = {'params': train_p, 'opt_state': tx.init(train_p), 'step': np.asarray(0, np.int32)}
  spec = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), t)
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  b = {'input_ids': ids, 'token_type_ids': ids, 'attention_mask': ids,
       'labels': jax.ShapeDtypeStruct((batch,), jnp.int32),
       'weights': jax.ShapeDtypeStruct((batch,), jnp.float32)}
  target = 0.5 if stage == 'soft' else None  # a value only (the soft loss's token keep)
  step = jax.jit(trainer.make_step(cfg, method, stage, tc, tx, target), donate_argnums=0)
  start, cpu = time.perf_counter(), time.process_time()
  compiled = step.lower(spec(state), spec(frozen), b,
                        jax.ShapeDtypeStruct((2,), jnp.uint32)).compile()
  return dict(stage=stage, batch=batch, length=length, compile_s=time.perf_counter() - start,
              compile_cpu_s=time.process_time() - cpu,
              param_bytes=tree_bytes(state['params']), frozen_bytes=tree_bytes(frozen),
              opt_state_bytes=tree_bytes(state['opt_state']), **memory(compiled))


def _train_config():
  """The `train` section of configs/base.py (the optimizer reads lr, clip, decay, ...)."""
  from configs import base  # pylint: disable=g-import-not-at-top
  return base.defaults().train


def settings(platform=None, length_buckets=None, batch_buckets=None, chunk_tokens=None):
  """Serving shapes: the platform's defaults with explicit overrides, as the configs resolve."""
  return shapes.resolve({'length_buckets': length_buckets, 'batch_buckets': batch_buckets,
                         'chunk_tokens': chunk_tokens}, platform)


def measure(cfg, params, grid, engines=('engine', 'dense'), train_stages=(), batch=32):
  """The whole measurement as a JSON-able dict."""
  lengths = batching.upto(grid.length_buckets, cfg.max_seq_length)
  kw = dict(grid.engine_kw(), length_buckets=lengths)
  out = {'model': dict(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                       max_seq_length=cfg.max_seq_length, dtype=getattr(cfg, 'dtype', 'float32')),
         'serving': dict(kw, input_buckets=None), 'engines': {}, 'train_steps': []}
  for name in engines:
    cls = engine_lib.Engine if name == 'engine' else engine_lib.DenseEngine
    eng = cls(cfg, params, **kw)
    if name == 'engine':
      out['serving']['input_buckets'] = list(eng.input_buckets)
    rows = warm(eng)
    out['engines'][name] = {'programs': rows, 'total': summary(rows)}
    print(f'{name}: {summary(rows)}', flush=True)
  for stage in train_stages:
    out['train_steps'].append(train_step_memory(cfg, params, stage, batch, cfg.max_seq_length))
    print(f'train step {stage}: {out["train_steps"][-1]}', flush=True)
  return out


def markdown(res) -> str:
  """Tables: per engine program, then per train step (wall and process CPU seconds, MiB)."""
  mb = lambda x: f'{x / 2**20:.1f}'
  lines = []
  for name, e in res['engines'].items():
    tot = e['total']
    lines += [f'\n{name}: {tot["programs"]} programs, compile (trace + lower + XLA) '
              f'{tot["compile_s"]:.1f} s wall, {tot["compile_cpu_s"]:.1f} s CPU\n',
              '| batch | length | branches | compile s | CPU s | temp MiB | argument MiB | '
              'output MiB | peak MiB |', '|---|---|---|---|---|---|---|---|---|']
    lines += [f'| {r["batch"]} | {r["length"]} | {r["branches"]} | {r["compile_s"]:.1f} | '
              f'{r["compile_cpu_s"]:.1f} | {mb(r["temp_size_in_bytes"])} | '
              f'{mb(r["argument_size_in_bytes"])} | {mb(r["output_size_in_bytes"])} | '
              f'{mb(r["peak_bytes"])} |' for r in e['programs']]
  if res['train_steps']:
    lines += ['\n| train step | compile s | CPU s | params MiB | frozen MiB | opt state MiB | '
              'temp MiB | argument MiB | output MiB | alias MiB | peak MiB |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
    lines += [f'| {r["stage"]} b={r["batch"]} t={r["length"]} | {r["compile_s"]:.1f} | '
              f'{r["compile_cpu_s"]:.1f} | {mb(r["param_bytes"])} | {mb(r["frozen_bytes"])} | '
              f'{mb(r["opt_state_bytes"])} | {mb(r["temp_size_in_bytes"])} | '
              f'{mb(r["argument_size_in_bytes"])} | {mb(r["output_size_in_bytes"])} | '
              f'{mb(r["alias_size_in_bytes"])} | {mb(r["peak_bytes"])} |'
              for r in res['train_steps']]
  return '\n'.join(lines)


def _define_flags():
  """The script's flags, defined only when it runs (tests import this module beside run.py)."""
  global _OUT, _PLATFORM, _LENGTHS, _BATCHES, _CHUNK, _ENGINES, _STAGES, _BATCH, _LAYERS, _DTYPE
  _OUT = flags.DEFINE_string('out', 'runs/warmup/warmup.json', 'JSON output path.')
  _PLATFORM = flags.DEFINE_string('platform', None, 'Serving defaults of this platform (cpu, gpu, '
                                  'tpu); default: the local backend. Compilation is always local.')
  _LENGTHS = flags.DEFINE_list('length_buckets', None, 'Override the length buckets.')
  _BATCHES = flags.DEFINE_list('batch_buckets', None, 'Override the batch buckets.')
  _CHUNK = flags.DEFINE_integer('chunk_tokens', None, 'Override chunk_tokens (0: no chunks).')
  _ENGINES = flags.DEFINE_list('engines', ['engine', 'dense'], 'Which engines to warm up.')
  _STAGES = flags.DEFINE_list('train_stages', ['finetune', 'soft'], 'Train steps to compile.')
  _BATCH = flags.DEFINE_integer('batch', 32, 'Train step batch size (per device).')
  _LAYERS = flags.DEFINE_integer('num_layers', 12, 'Layers (12 = bert-base; fewer for a check).')
  _DTYPE = flags.DEFINE_string('dtype', 'float32', 'model.dtype (compute dtype).')


def main(argv):
  del argv
  cache = disable_compilation_cache()
  platform = _PLATFORM.value or jax.default_backend()
  grid = settings(platform, _LENGTHS.value and [int(x) for x in _LENGTHS.value],
                    _BATCHES.value and [int(x) for x in _BATCHES.value], _CHUNK.value)
  cfg = bert_base(num_layers=_LAYERS.value, dtype=_DTYPE.value)
  params = bert.init_params(cfg, 0)
  load_before = os.getloadavg()
  start = time.time()
  res = measure(cfg, params, grid, _ENGINES.value, [s for s in _STAGES.value if s],
                _BATCH.value)
  res.update(platform_defaults=platform, compiled_on=jax.default_backend(),
             devices=str(jax.devices()[0]), jax_version=jax.__version__, cache=cache,
             loadavg_before=load_before, loadavg_after=os.getloadavg(),
             wall_s=time.time() - start, cpu_count=os.cpu_count(), argv=sys.argv[1:])
  bad = [(n, r['batch'], r['length']) for n, e in res['engines'].items() for r in e['programs']
         if r['backend_compiles'] != 1]
  if bad:
    print(f'warning: programs without exactly one XLA compile (cache?): {bad}')
  path = fsio.write_json(_OUT.value, res, indent=1)
  print(markdown(res))
  print(f'\nload average before/after: {load_before} / {res["loadavg_after"]}; wrote {path}')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)

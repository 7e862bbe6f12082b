"""MKL's GEMM custom call against XLA:CPU's own dot, in one process, interleaved.

  python experiments/cpu_gemm.py --repeats=7
  python experiments/cpu_gemm.py --gemms=false --model_tasks=mr,bbc --repeats=5 [--xla_first]

GFLOP/s of one [M, K] x [K, N] float32 GEMM jitted alone at BERT-layer shapes (MiniLM: D 384,
I 1536; M = batch x tokens), then ms of a 4-layer FFN stack (x W1 + b, exact GELU, W2 + b,
residual) forward and forward+backward, each program once with the custom call
(mp_jax/model/cpu_gemm.py) and once traced under `cpu_gemm.enabled(False)`. Medians over
interleaved rounds; ratio > 1: the custom call is faster.

--model_tasks: the whole model of each task's config (configs/<task>.py, method=bert, its
pretrained weights), with HF PyTorch as the common yardstick: the dense engine over 512 rows of
the eval split, and three fine-tuning steps (mp_jax.training.speed). Each side is built in turn,
MKL's first unless --xla_first (compiled in the warm-up, and timed in each round, in that order):
run both orders (on `bbc` the training step warmed first read 17-18% slower, either GEMM).
"""

import functools
import importlib
import itertools
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

sys.path.insert(0, __file__.rsplit('/', 2)[0])

from mp_jax import cli
from mp_jax.data import batching, loading
from mp_jax.evaluation import benchmark, report, timing
from mp_jax.model import bert, cpu_gemm, hf, matmul
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import shapes
from mp_jax.training import speed, trainer

_REPEATS = flags.DEFINE_integer('repeats', 7, 'Interleaved rounds (medians).')
_CALLS = flags.DEFINE_integer('calls', 10, 'Calls a round.')
_GEMMS = flags.DEFINE_bool('gemms', True, 'Time single GEMMs and FFN stacks.')
_MODEL_TASKS = flags.DEFINE_list('model_tasks', [], 'Tasks whose whole model to time.')
_XLA_FIRST = flags.DEFINE_bool('xla_first', False, 'Build the XLA side first (whole model).')
_MODEL_ROWS = flags.DEFINE_integer('model_rows', 512, 'Eval rows the dense engine predicts.')
_TRAIN_BATCHES = flags.DEFINE_integer('train_batches', 3, 'Fine-tuning steps a round.')

GEMMS = [(1, 384, 1536), (26, 384, 1536), (32, 384, 1536), (832, 384, 384), (832, 384, 1536),
         (832, 1536, 384), (8192, 384, 1536), (8192, 1536, 384)]
FFN_ROWS = (26, 832, 8192)


def _dense(x, w):
  return matmul.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _both(fn, *args):
  """fn jitted with the custom call and without; the first checked to hold it."""
  with cpu_gemm.enabled(True):  # on any CPU (`auto` is XLA's dot off Intel)
    mkl = jax.jit(fn).lower(*args)
  if 'mp_cpu_gemm' not in mkl.as_text():
    raise SystemExit(f'no custom call in the program: {cpu_gemm.which()}')
  with cpu_gemm.enabled(False):
    xla = jax.jit(fn).lower(*args).compile()
  mkl = mkl.compile()
  return {'mkl': lambda: jax.block_until_ready(mkl(*args)),
          'xla': lambda: jax.block_until_ready(xla(*args))}


def _time(fns, calls, repeats):
  def many(fn):
    return lambda: [fn() for _ in range(calls)]
  t = timing.interleaved({k: many(f) for k, f in fns.items()}, repeats, warmup=True)
  return {k: v / calls for k, v in t.items()}


def gemms():
  """Single GEMMs and FFN stacks."""
  rng = np.random.default_rng(0)
  print('| M x K x N | XLA GFLOP/s | MKL GFLOP/s | MKL / XLA |\n|---|---|---|---|')
  for m, k, n in GEMMS:
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    t = _time(_both(_dense, x, w), max(_CALLS.value, int(2e9 / (2 * m * k * n))), _REPEATS.value)
    gf = {key: 2 * m * k * n / s / 1e9 for key, s in t.items()}
    print(f'| {m} x {k} x {n} | {gf["xla"]:.0f} | {gf["mkl"]:.0f} | {t["xla"] / t["mkl"]:.2f} |',
          flush=True)
  print('\n| FFN x 4, rows | pass | XLA ms | MKL ms | XLA / MKL |\n|---|---|---|---|---|')
  for rows in FFN_ROWS:
    x = jnp.asarray(rng.standard_normal((rows, 384)), jnp.float32)
    ws = [(jnp.asarray(rng.standard_normal((384, 1536)) * 0.05, jnp.float32), jnp.zeros(1536),
           jnp.asarray(rng.standard_normal((1536, 384)) * 0.05, jnp.float32), jnp.zeros(384))
          for _ in range(4)]

    def ffn(x, ws):
      for w1, b1, w2, b2 in ws:
        x = x + _dense(bert.gelu(_dense(x, w1) + b1), w2) + b2
      return x

    def grad(x, ws):
      return jax.grad(lambda x, ws: jnp.sum(ffn(x, ws) ** 2), argnums=(0, 1))(x, ws)

    for name, fn in (('forward', ffn), ('forward + backward', grad)):
      t = _time(_both(fn, x, ws), _CALLS.value, _REPEATS.value)
      print(f'| {rows} | {name} | {t["xla"] * 1e3:.3f} | {t["mkl"] * 1e3:.3f} | '
            f'{t["xla"] / t["mkl"]:.3f} |', flush=True)


def _ratios(what, t):
  print(f'| {what} | ' + ' | '.join(f'{t[k]:.3f}' for k in ('mkl', 'xla', 'torch')) +
        f' | {t["xla"] / t["mkl"]:.3f} | {t["torch"] / t["mkl"]:.3f} | '
        f'{t["torch"] / t["xla"]:.3f} |', flush=True)


def model(task, tmp):
  """The task's dense model and fine-tuning step: MKL, XLA and PyTorch, interleaved."""
  config = importlib.import_module(f'configs.{task}').get_config('method=bert')
  _, cfg, params, tok = trainer.build(config)
  hf_dir = pathlib.Path(tmp) / task
  hf.save(hf_dir, cfg, params, tok)
  ds = loading.load_task(config.data)
  enc = batching.encode(tok, ds[report.eval_split(config, ds)], cfg.max_seq_length)
  rows = list(zip(enc.ids, enc.type_ids))[:_MODEL_ROWS.value]
  grid = shapes.for_model(shapes.resolve(config.eval), cfg.max_seq_length)
  sides = {'xla': False, 'mkl': True}
  order = ('xla', 'mkl') if _XLA_FIRST.value else ('mkl', 'xla')  # warmed, and timed, in order

  def under(on, fn):
    def run():
      with cpu_gemm.enabled(on):  # in the jit key: each side traces and runs its own programs
        return fn()
    return run

  fns = {}
  for k in order:
    eng = engine_lib.DenseEngine(cfg, engine_lib.prepare(cfg, params, stacked=False),
                                 **grid.engine_kw())  # compiles at its first predict
    fns[k] = under(sides[k], functools.partial(eng.predict, rows))
  tr = benchmark.TorchRunner(hf_dir)
  fns['torch'] = functools.partial(tr.predict, rows, max(grid.batch_buckets))
  n = len(rows)
  _ratios(f'{task}: dense, {n} rows of {enc.lengths[:n].mean():.1f} tokens',
          timing.interleaved(fns, _REPEATS.value, warmup=True))
  fns.clear()
  train = batching.encode(tok, ds['train'], cfg.max_seq_length)
  buckets = batching.upto(shapes.train_lengths(config.data), cfg.max_seq_length)
  batches = batching.batches(train, int(config.train.batch_size), buckets=buckets, shuffle=True,
                             drop_last=True)
  batches = list(itertools.islice(batches, _TRAIN_BATCHES.value))
  for k in order:
    fns[k] = under(sides[k], speed.jax_trainer(config, cfg, params, batches))
  fns['torch'] = speed.torch_trainer(config, hf_dir, batches)
  _ratios(f'{task}: {len(batches)} fine-tuning steps of {config.train.batch_size}',
          timing.interleaved(fns, _REPEATS.value, warmup=True))


def main(_):
  print(f'{timing.machine()}; {cpu_gemm.ENV}={cpu_gemm.mode()} ({cpu_gemm.which()})')
  if _GEMMS.value:
    gemms()
  if _MODEL_TASKS.value:
    print(f'\n| model (built first: {"XLA" if _XLA_FIRST.value else "MKL"}) | MKL s | XLA s | '
          'torch s | XLA / MKL | torch / MKL | torch / XLA |\n|---|---|---|---|---|---|---|')
    with tempfile.TemporaryDirectory() as tmp:
      for task in _MODEL_TASKS.value:
        model(task, tmp)


if __name__ == '__main__':
  cli.run(main)

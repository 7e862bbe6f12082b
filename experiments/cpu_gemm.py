"""MKL's GEMM custom call against XLA:CPU's own dot, in one process, interleaved.

  python experiments/cpu_gemm.py --repeats=7

GFLOP/s of one [M, K] x [K, N] float32 GEMM jitted alone at BERT-layer shapes (MiniLM: D 384,
I 1536; M = batch x tokens), then ms of a 4-layer FFN stack (x W1 + b, exact GELU, W2 + b,
residual) forward and forward+backward, each program once with the custom call
(mp_jax/model/cpu_gemm.py) and once traced under `cpu_gemm.enabled(False)`. Medians over
interleaved rounds; ratio > 1: the custom call is faster.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

sys.path.insert(0, __file__.rsplit('/', 2)[0])

from mp_jax import cli
from mp_jax.evaluation import timing
from mp_jax.model import bert, cpu_gemm, matmul

_REPEATS = flags.DEFINE_integer('repeats', 7, 'Interleaved rounds (medians).')
_CALLS = flags.DEFINE_integer('calls', 10, 'Calls a round.')

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


def main(_):
  rng = np.random.default_rng(0)
  print(f'{timing.machine()}; {cpu_gemm.ENV}={cpu_gemm.mode()}')
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


if __name__ == '__main__':
  cli.run(main)

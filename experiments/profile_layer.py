"""One layer's halves at small shapes: the cost per token as pruning shrinks the length.

  python experiments/profile_layer.py --workdir=runs/paper/mr/ltp

Times (interleaved medians, 20 calls a round) the first layer's attention alone, attention +
importance score, attention + score + hard keep + compaction, and the FFN, each jitted on its
own at batch --rows and working lengths --lengths, and prints microseconds per token. Shows
what the FLOPs count cannot: a token of a short working length costs more than one of a long.
Never run it beside another training or benchmark (2 cores: XLA processes thrash).
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp_jax import cli
from mp_jax import workdir as workdir_lib
from mp_jax.evaluation import timing
from mp_jax.model import bert
from mp_jax.model import pruning as pruning_lib
from mp_jax.serving import engine, programs

_WORKDIR = flags.DEFINE_string('workdir', 'runs/paper/mr/ltp', 'A trained model (final/).')
_ROWS = flags.DEFINE_integer('rows', 32, 'Batch rows.')
_LENGTHS = flags.DEFINE_list('lengths', ['8', '16', '32', '64'], 'Working lengths.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved rounds (medians).')
CALLS = 20


def main(argv):
  del argv
  _, cfg, params, _, _ = workdir_lib.load(_WORKDIR.value)
  p0 = jax.tree.map(lambda x: x[0], engine.prepare(cfg, params).tree['layers'])
  n = cfg.max_seq_length

  def attend(x, a):
    return programs._layer(cfg, p0, x, a, method=bert.Layer.attend)

  halves = {
      'attention': lambda x, a: attend(x, a)[0],
      'attention + score': lambda x, a: (lambda y, e, z: (y, pruning_lib.importance(
          e, z, a, n)))(*attend(x, a)),
      'attention + score + keep + compact': lambda x, a: (lambda y, e, z: programs._compact(
          y, pruning_lib.hard_keep(pruning_lib.importance(e, z, a, n), 0.01, a)))(*attend(x, a)),
      'ffn': lambda x, a: programs._layer(cfg, p0, x, method=bert.Layer.ffn)}
  fns = {}
  for t in map(int, _LENGTHS.value):
    x = jax.random.normal(jax.random.PRNGKey(0), (_ROWS.value, t, cfg.hidden_size))
    a = jnp.ones((_ROWS.value, t), bool)
    for name, fn in halves.items():
      f = jax.jit(fn)
      fns[(name, t)] = lambda f=f, x=x, a=a: [jax.block_until_ready(f(x, a)) for _ in range(CALLS)]
  t = timing.interleaved(fns, _REPEATS.value, warmup=True)
  for (name, length), secs in t.items():
    us = secs / CALLS * 1e6
    print(f'{name:36s} {_ROWS.value} x {length:3d}: {us:8.0f} us, '
          f'{us / (_ROWS.value * length):6.2f} us per token')


if __name__ == '__main__':
  cli.run(main)

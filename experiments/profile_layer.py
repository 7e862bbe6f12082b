"""One layer's halves at small shapes: the cost per token as pruning shrinks the length.

  python experiments/profile_layer.py --workdir=runs/paper/mr/ltp

Times (interleaved medians, 20 calls a round) the first layer's attention alone, attention +
importance score (whole, and where the layer-major schedule splits it, in its row chunks:
grouping.attention_rows), attention + score + hard keep + compaction, the FFN and (a model with
exits) the first exit head with its uncertainty (the engine's form; a float32 model's also as
trained, factored: exits.merge), each jitted on its own at batch --rows and working lengths
--lengths, and prints microseconds per token. Shows what the FLOPs count cannot: a token
of a short working length costs more than one of a long. With exits it also prints what a
head's FLOP costs against a layer's (attention + FFN), the measure behind eval.head_weight
(mp_jax/model/exit_plan.py).
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
from mp_jax.model import bert, flops
from mp_jax.model import exits as exits_lib
from mp_jax.model import pruning as pruning_lib
from mp_jax.serving import engine, grouping, programs

_WORKDIR = flags.DEFINE_string('workdir', 'runs/paper/mr/ltp', 'A trained model (final/).')
_ROWS = flags.DEFINE_integer('rows', 32, 'Batch rows.')
_LENGTHS = flags.DEFINE_list('lengths', ['8', '16', '32', '64'], 'Working lengths.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved rounds (medians).')
CALLS = 20


def main(argv):
  del argv
  _, cfg, params, *_ = workdir_lib.load(_WORKDIR.value)
  stacked = engine.prepare(cfg, params).tree
  p0 = jax.tree.map(lambda x: x[0], stacked['layers'])
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
  if stacked['exits']:
    pe0 = jax.tree.map(lambda x: x[0], stacked['exits'])  # the engine's form (merged)
    halves['exit head + uncertainty'] = lambda x, a: exits_lib.uncertainty(
        programs._head(cfg, pe0, x, a))
    if programs.merges_heads(cfg):  # beside it, the head as trained (exits.ExitHead)
      head = exits_lib.ExitHead(cfg.num_labels, cfg.exit_width, cfg.exit_heads)
      halves['exit head (factored) + uncertainty'] = lambda x, a: exits_lib.uncertainty(
          head.apply({'params': params['exit_0']}, x, a))
  fns = {}
  for t in map(int, _LENGTHS.value):
    x = jax.random.normal(jax.random.PRNGKey(0), (_ROWS.value, t, cfg.hidden_size))
    a = jnp.ones((_ROWS.value, t), bool)
    r = grouping.attention_rows(_ROWS.value, t, cfg.num_heads, grouping.ATTENTION_BYTES)
    chunked = {} if r == _ROWS.value else {f'attention + score, chunks of {r} rows': (
        lambda x, a, r=r: programs.map_rows(halves['attention + score'], (x, a), r))}
    for name, fn in {**halves, **chunked}.items():
      f = jax.jit(fn)
      fns[(name, t)] = lambda f=f, x=x, a=a: [jax.block_until_ready(f(x, a)) for _ in range(CALLS)]
  t = timing.interleaved(fns, _REPEATS.value, warmup=True)
  for (name, length), secs in t.items():
    us = secs / CALLS * 1e6
    print(f'{name:42s} {_ROWS.value} x {length:3d}: {us:8.0f} us, '
          f'{us / (_ROWS.value * length):6.2f} us per token')
  if stacked['exits']:
    for length in map(int, _LENGTHS.value):
      layer_us = t[('attention', length)] + t[('ffn', length)]
      head_us = t[('exit head + uncertainty', length)]
      layer_f = 2 * flops.layer_macs(cfg.hidden_size, cfg.intermediate_size, length, length,
                                     a=cfg.attention_size)
      head_f = 2 * flops.exit_head_macs(cfg.hidden_size, cfg.exit_width, length, cfg.num_labels)
      print(f'length {length:3d}: a head costs {head_us / layer_us:.3f} of a layer on the clock, '
            f'{head_f / layer_f:.3f} in FLOPs: a head FLOP costs '
            f'{(head_us / head_f) / (layer_us / layer_f):.2f} layer FLOPs')


if __name__ == '__main__':
  cli.run(main)

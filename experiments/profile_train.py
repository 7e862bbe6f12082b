"""Where a fine-tuning step's time goes: our jitted step in variants against HF PyTorch's.

  python experiments/profile_train.py --task=mr --batches=6 --repeats=3
  python experiments/profile_train.py --task=bbc --batches=2 --repeats=2  # ~20 s a step each

On the same shuffled train batches of --runs/<task>/bert's model, interleaved (medians):
  step        trainer.make_step as run_stage jits it (finiteness check of loss, gradient norm
              and every new parameter), batches padded to data.length_buckets (default:
              the platform's grid, shapes.train_lengths)
  coarse      step on the same rows padded to the GPU/TPU grid (32, 64, 128, 256, 512), the
              training default before issue 17's session 12
  threefry    step with flax's nn.Dropout (threefry bits) in place of model/dropout.py's hash
  no_check    stages.train_step alone (no finiteness check)
  no_dropout  no_check with hidden and attention dropout 0
  exact       no_check with each batch padded to its longest row rounded up to 8 tokens
  torch       BertForSequenceClassification, AdamW, clip 1.0, each batch cut to its longest row
Page faults and kernel CPU seconds per step: means over the timed rounds, and the untimed warm-up
round apart (where a fresh process first touches its peak memory), and the process's peak
resident memory. MP_JAX_MALLOC=system runs it with glibc's default allocator settings,
MP_JAX_MALLOC=hugepages with cli.HUGEPAGE_TUNABLES (default: cli.MALLOC_TUNABLES).
Never run it beside another training or benchmark (2 cores: XLA processes thrash).
"""

import contextlib
import functools
import importlib
import itertools
import os
import pathlib
import resource
import sys

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp_jax import cli
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading
from mp_jax.evaluation import timing
from mp_jax.model import bert, dropout
from mp_jax.serving import shapes
from mp_jax.training import speed, stages, trainer

VARIANTS = ('step', 'coarse', 'threefry', 'no_check', 'no_dropout', 'exact', 'torch')
_TASK = flags.DEFINE_string('task', 'mr', 'Task config in configs/.')
_RUNS = flags.DEFINE_string('runs', 'runs/paper', 'experiments/run.py --out of the models.')
_BATCHES = flags.DEFINE_integer('batches', 6, 'Train batches per timed round.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Interleaved rounds (medians).')
_VARIANTS = flags.DEFINE_list('variants', list(VARIANTS), f'Any of {VARIANTS}.')


def exact(b):
  """The batch cut to its longest row rounded up to 8 tokens."""
  n = -(-int(b['attention_mask'].sum(-1).max()) // 8) * 8
  return {k: (v[:, :n] if v.ndim == 2 else v) for k, v in b.items()}


@contextlib.contextmanager
def threefry_dropout():
  """Traces the model with flax's own nn.Dropout (the project's dropout before the hash)."""
  own, dropout.Dropout = dropout.Dropout, nn.Dropout
  try:
    yield
  finally:
    dropout.Dropout = own


def main(argv):
  del argv
  unknown = set(_VARIANTS.value) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f'--variants: unknown {sorted(unknown)}; any of {VARIANTS}')
  wd = pathlib.Path(_RUNS.value) / _TASK.value / 'bert'
  _, cfg, params, tok, *_ = workdir_lib.load(wd)
  config = importlib.import_module(f'configs.{_TASK.value}').get_config('method=bert')
  ds = loading.load_task(config.data)
  enc = batching.encode(tok, ds['train'], cfg.max_seq_length)
  bs = int(config.train.batch_size)
  buckets = batching.upto(shapes.train_lengths(config.data), cfg.max_seq_length)
  take = lambda lbs: list(itertools.islice(batching.batches(  # same seed: the same rows
      enc, bs, buckets=lbs, shuffle=True, drop_last=True), _BATCHES.value))
  batches = take(buckets)
  coarse = (take(batching.upto(shapes.ACCEL_LENGTHS, cfg.max_seq_length))
            if 'coarse' in _VARIANTS.value else [])
  print('padded lengths', [b['input_ids'].shape[1] for b in batches], 'longest rows',
        [int(b['attention_mask'].sum(-1).max()) for b in batches])
  train_p, frozen = stages.split(params, 'finetune')
  tx, state, _ = trainer.stage_setup('finetune', cfg, train_p, 10_000, config)
  frozen = jax.device_put(frozen)
  kw = dict(tx=tx, model=bert.MagicPyramid(cfg), method='bert', stage='finetune',
            tc=config.train, target=None, teacher=None)
  no_drop = dict(kw, model=bert.MagicPyramid(cfg.replace(hidden_dropout=0.0,
                                                          attention_dropout=0.0)))
  # Two step objects: jit's trace cache is keyed on the function, and threefry must retrace.
  step, step2 = (trainer.make_step(cfg, 'bert', 'finetune', config.train, tx) for _ in range(2))
  steps = {'step': (step, batches), 'coarse': (step, coarse), 'threefry': (step2, batches),
           'no_check': (functools.partial(stages.train_step, **kw), batches),
           'no_dropout': (functools.partial(stages.train_step, **no_drop), batches),
           'exact': (functools.partial(stages.train_step, **kw), [exact(b) for b in batches])}
  fns = {}
  for name in (v for v in _VARIANTS.value if v in steps):
    fn, bl = steps[name]
    dev = [jax.device_put(b) for b in bl]
    box = {'s': jax.device_put(jax.tree.map(np.array, state))}
    # Compiled here, once per padded shape: the threefry variant must be traced inside its patch.
    with threefry_dropout() if name == 'threefry' else contextlib.nullcontext():
      by_shape = {b['input_ids'].shape: b for b in dev}
      compiled = {k: jax.jit(fn, donate_argnums=0).lower(
          box['s'], frozen, b, jax.random.PRNGKey(0)).compile() for k, b in by_shape.items()}
    call = lambda s, f, b, k, compiled=compiled: compiled[b['input_ids'].shape](s, f, b, k)

    def run(call=call, dev=dev, box=box):
      s = box['s']
      for b in dev:
        s, _ = call(s, frozen, b, jax.random.PRNGKey(0))
      box['s'] = jax.block_until_ready(s)
    fns[name] = run
  if 'torch' in _VARIANTS.value:
    fns['torch'] = speed.torch_trainer(config, workdir_lib.final_dir(wd), batches)
  kernel = {k: [] for k in fns}  # per call: (page faults, kernel CPU s); the first is warm-up

  def counted(k, fn):
    """fn, recording its page faults and kernel CPU seconds in kernel[k]."""
    def inner():
      r0 = resource.getrusage(resource.RUSAGE_SELF)
      fn()
      r1 = resource.getrusage(resource.RUSAGE_SELF)
      kernel[k].append((r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime))
    return inner
  t = timing.interleaved({k: counted(k, f) for k, f in fns.items()}, _REPEATS.value,
                         warmup=True)
  n = len(batches)
  for k, v in t.items():
    # The warm-up round apart: a fresh process faults its peak memory in once, there.
    (warm_faults, warm_s), timed = kernel[k][0], np.mean(kernel[k][1:], axis=0) / n
    print(f'{k:11s} {n * bs / v:7.1f} ex/s  {v / n * 1000:8.1f} ms/step  timed rounds: '
          f'{timed[0]:9.0f} page faults/step {timed[1]:5.2f} kernel CPU s/step; warm-up round: '
          f'{warm_faults / n:9.0f}, {warm_s / n:5.2f}')
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
  print(f'peak resident memory {peak:.1f} GiB; GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES")}')


if __name__ == '__main__':
  cli.run(main)

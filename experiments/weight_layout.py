"""Where a layer's weights lie, and which erf: the forms of the engine's programs, timed.

  python experiments/weight_layout.py --workdir=runs/paper/mr/mp --shapes=1x28,32x28,32x256

Wall clock on all cores, one process, interleaved repeats (medians), every token real. Per
batch x length of --shapes:
1. exact GELU on [B*T, I]: through erfc (jax.nn.gelu(approximate=False), the model's before
   session 18), through erf (bert.gelu, now), torch's;
2. the dense forward of the workdir's weights: a lax.scan over the stacked layer weights (the
   baseline before session 18) or unrolled over the per-layer ones (now), each with either GELU,
   beside HF PyTorch (SDPA attention);
3. the fused program of the workdir's model (its pruning and exits, at its own tau): the
   while_loop over the stacked weights against the one-row form, the layers unrolled over the
   per-layer ones at the input's shape (programs.make_forward's unroll_max_rows; unchunked
   programs only), with compile seconds.
Never run it beside another training or benchmark (2 cores: XLA processes thrash).
"""

import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax import lax

sys.path.insert(0, __file__.rsplit('/', 2)[0])

from mp_jax import cli, methods
from mp_jax import workdir as workdir_lib
from mp_jax.evaluation import timing
from mp_jax.model import bert, exit_plan
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import programs, shapes

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir (its final/ weights).')
_SHAPES = flags.DEFINE_list('shapes', ['1x28', '32x28', '32x256'], 'batch x length pairs.')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Interleaved repeats (median).')
flags.mark_flag_as_required('workdir')


def gelu_erfc(x):
  return jax.nn.gelu(x, approximate=False)


@contextlib.contextmanager
def model_gelu(fn):
  """Traces the model with another GELU inside (bert.Intermediate reads bert.gelu)."""
  old, bert.gelu = bert.gelu, fn
  try:
    yield
  finally:
    bert.gelu = old


def scan_forward(cfg):
  """The dense forward as it was before session 18: a lax.scan over the stacked weights."""
  def forward(sp, ids_BxT, types_BxT, mask_BxT, halt_L):
    del halt_L
    h_BxTxD = bert.Embeddings(cfg).apply({'params': sp['embeddings']}, ids_BxT, types_BxT)
    alive_BxT = mask_BxT.astype(bool)

    def layer(h_BxTxD, p):
      a_BxTxD, _, _ = programs._layer(cfg, p, h_BxTxD, alive_BxT, method=bert.Layer.attend)
      return programs._layer(cfg, p, a_BxTxD, method=bert.Layer.ffn), None

    h_BxTxD, _ = lax.scan(layer, h_BxTxD, sp['layers'])
    return programs.dense_outputs(cfg, sp, h_BxTxD, alive_BxT)
  return forward


def compiled(forward, sp, args, chunk_tokens):
  """(compiled program, compile seconds) of `forward` over row chunks."""
  start = time.perf_counter()
  c = jax.jit(programs.chunked(forward, chunk_tokens)).lower(sp, *args).compile()
  return c, time.perf_counter() - start


def calls_at(tr, sp, b, t, grid, torch_model):
  """{table: {variant: zero-arg call}} and compile seconds of the fused forms at b x t."""
  import torch  # pylint: disable=g-import-not-at-top
  cfg = tr.cfg
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, cfg.vocab_size, (b, t)).astype(np.int32)
  ids[:, 0] = 101
  args = tuple(map(jnp.asarray, (ids, np.zeros_like(ids), np.ones_like(ids))))
  x = jnp.asarray(rng.standard_normal((b * t, cfg.intermediate_size)).astype(np.float32))
  tx = torch.from_numpy(np.asarray(x))
  run = lambda c, p, *a: (lambda: jax.block_until_ready(c(p, *a)))
  forms = {'through erfc (before)': jax.jit(gelu_erfc),
           'through erf (bert.gelu)': jax.jit(bert.gelu)}
  gelu = {k: (lambda f=f: jax.block_until_ready(f(x))) for k, f in forms.items()}
  gelu['torch'] = lambda: torch.nn.functional.gelu(tx)
  ct = grid.chunk_tokens
  zero = jnp.zeros((cfg.num_layers,), jnp.float32)
  ops = programs.operands(sp, dense=True)
  stacked = {k: sp[k] for k in ('embeddings', 'layers', 'pooler', 'classifier')}
  dense = {}
  for gname, g in (('erfc', gelu_erfc), ('erf', bert.gelu)):
    with model_gelu(g):
      c, _ = compiled(scan_forward(cfg), stacked, (*args, zero), ct)
      dense[f'scan over stacked weights, GELU {gname}'] = run(c, stacked, *args, zero)
      c, _ = compiled(programs.make_dense_forward(cfg), ops, (*args, zero), ct)
      dense[f'unrolled over per-layer weights, GELU {gname}'] = run(c, ops, *args, zero)
  tids = torch.from_numpy(ids.astype(np.int64))
  dense['torch (HF, SDPA)'] = lambda: torch_model(
      input_ids=tids, token_type_ids=torch.zeros_like(tids),
      attention_mask=torch.ones_like(tids)).logits
  pruning, exits = methods.eval_modes(tr.config['method'])
  prune = pruning != 'none'
  fused, secs = {}, {}
  if prune or exits:
    tau = float(tr.config['eval']['tau']) if exits else 0.0
    halt = jnp.asarray(exit_plan.halts_of(tr.plan, tau, cfg.num_layers))
    # The one-row form runs an unchunked program only (programs.unrolls).
    forms = [('while_loop over stacked weights', 0)]
    if programs.unrolls(b, t, ct, max_rows=b):
      forms.append(('unrolled over per-layer at the input shape (the one-row form)', b))
    for name, most in forms:
      ops = programs.operands(sp, dense=False, unrolled=bool(most))
      fwd = programs.make_forward(cfg, prune=prune, exits=exits, batch_buckets=grid.batch_buckets,
                                  length_buckets=grid.length_buckets, unroll_max_rows=most)
      c, secs[name] = compiled(fwd, ops, (*args, halt), ct)
      fused[name] = run(c, ops, *args, halt)
  return {'GELU': gelu, 'dense forward': dense, 'fused program': fused}, secs


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  tr = workdir_lib.load(_WORKDIR.value)
  final = workdir_lib.final_dir(_WORKDIR.value)
  torch_model = transformers.BertForSequenceClassification.from_pretrained(final).eval()
  sp = engine_lib.prepare(tr.cfg, tr.params).tree
  grid = shapes.for_model(shapes.resolve({}), tr.cfg.max_seq_length)
  print(f'{_WORKDIR.value} ({tr.config["method"]}), {os.cpu_count()} cores, wall ms, '
        f'median of {_REPEATS.value} interleaved rounds\n')
  for shape in _SHAPES.value:
    b, t = (int(v) for v in shape.split('x'))
    tables, secs = calls_at(tr, sp, b, t, grid, torch_model)
    for title, calls in tables.items():
      if not calls:
        continue
      with torch.inference_mode():
        ms = {k: 1e3 * v for k, v in timing.interleaved(calls, _REPEATS.value,
                                                         warmup=True).items()}
      first = next(iter(ms))
      print(f'{title}, {b} x {t}\n\n| variant | ms | vs the first | compile s |\n|---|---|---|---|')
      for k, v in ms.items():
        compile_s = f'{secs[k]:.1f}' if k in secs else '-'
        print(f'| {k} | {v:.3f} | {ms[first] / v:.2f}x | {compile_s} |')
      print()


if __name__ == '__main__':
  cli.run(main)

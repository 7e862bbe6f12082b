"""Where does dense JAX lose or win against HF PyTorch? Per-piece CPU time, one thread each.

  python experiments/dense_vs_torch.py --workdir=runs/paper/bbc/mp --batch=8 --length=256

CPU time of the process (not wall time), so a busy machine disturbs it far less; one thread
for both frameworks so the kernels, not the thread pools, are compared. With --all_threads:
every core for both and wall time, as the clock runs them (an idle machine only). Prints medians
(ms) and torch/jax ratios (> 1: JAX is faster) for: a [B*T, D] x [D, I] matmul, exact GELU, the
attention core (scores, mask, softmax, context), and the whole dense forward.
"""

import os
import sys
import time

# Read before absl parses flags: XLA's threads are fixed when jax starts.
ALL_THREADS = any(a in ('--all_threads', '--all_threads=true') for a in sys.argv[1:])
if not ALL_THREADS:  # one thread each; must be set before jax and torch start
  os.environ.setdefault('XLA_FLAGS', '--xla_cpu_multi_thread_eigen=false '
                        'intra_op_parallelism_threads=1')

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, __file__.rsplit('/', 2)[0])

from mp_jax import cli
from mp_jax import workdir as workdir_lib
from mp_jax.evaluation import timing
from mp_jax.model import bert, hf
from mp_jax.serving import programs

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir (its final/ weights).')
_BATCH = flags.DEFINE_integer('batch', 32, 'Batch size.')
_LENGTH = flags.DEFINE_integer('length', 64, 'Sequence length (no padding).')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Interleaved repeats (median).')
_ALL_THREADS = flags.DEFINE_bool(
    'all_threads', False, 'Every core for both frameworks, wall time (read from sys.argv '
    'before jax starts: pass it as --all_threads).')
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  if _ALL_THREADS.value != ALL_THREADS:  # a spelling the early read missed (e.g. =True)
    raise app.UsageError('pass --all_threads or --noall_threads as such: it is read before '
                         'jax starts')
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if not ALL_THREADS:
    torch.set_num_threads(1)
  final = workdir_lib.final_dir(_WORKDIR.value)
  cfg, params, _ = hf.load(final)
  b, t, d, i = _BATCH.value, _LENGTH.value, cfg.hidden_size, cfg.intermediate_size
  nh, dh = cfg.num_heads, cfg.hidden_size // cfg.num_heads
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b * t, d)).astype(np.float32)
  w = (0.05 * rng.standard_normal((d, i))).astype(np.float32)
  q, k, v = (rng.standard_normal((b, nh, t, dh)).astype(np.float32) for _ in range(3))
  ids = rng.integers(1000, cfg.vocab_size, (b, t)).astype(np.int32)
  jx, jw, jq, jk, jv, jids = map(jnp.asarray, (x, w, q, k, v, ids))
  jy = jx @ jw

  def attention(q, k, v):  # as in model.SelfAttention
    s = jnp.einsum('bhqk,bhtk->bhqt', q / np.sqrt(dh), k)
    s = jnp.where(jnp.ones((b, 1, 1, t), bool), s, -1e9)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return jnp.einsum('bhqt,bhtk->bhqk', e, v) / e.sum(-1, keepdims=True)

  dense = jax.jit(lambda sp, ids: programs.make_dense_forward(cfg)(
      sp, ids, jnp.zeros_like(ids), jnp.ones_like(ids), 0.0)['logits'])
  sp = jax.device_put(programs.stack_params(cfg, params))
  fns = {'matmul': (jax.jit(jnp.matmul), jx, jw),
         'gelu': (jax.jit(bert.gelu), jy),
         'attention': (jax.jit(attention), jq, jk, jv),
         'forward': (dense, sp, jids)}
  model = transformers.BertForSequenceClassification.from_pretrained(final).eval()
  tx, tw, ty = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(np.asarray(jy))
  tq, tk, tv = map(torch.from_numpy, (q, k, v))
  tids = torch.from_numpy(ids.astype(np.int64))
  torch_fns = {
      'matmul': lambda: tx @ tw,
      'gelu': lambda: torch.nn.functional.gelu(ty),
      'attention': lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv),
      'forward': lambda: model(input_ids=tids, token_type_ids=torch.zeros_like(tids),
                               attention_mask=torch.ones_like(tids)).logits}
  calls = {}
  for name, (f, *args) in fns.items():
    calls[f'jax {name}'] = lambda f=f, args=args: jax.block_until_ready(f(*args))
    calls[f'torch {name}'] = torch_fns[name]
  with torch.inference_mode():
    t_s = timing.interleaved(calls, _REPEATS.value, warmup=True,
                             clock=time.perf_counter if ALL_THREADS else time.process_time)
  ms = {k: 1e3 * v for k, v in t_s.items()}
  how = 'every core, wall ms' if ALL_THREADS else 'one thread, CPU ms'
  print(f'batch {b} x length {t}, {how} (median of {_REPEATS.value}):')
  print('| piece | JAX ms | torch ms | torch/JAX |\n|---|---|---|---|')
  for name in fns:
    j, tt = ms[f'jax {name}'], ms[f'torch {name}']
    print(f'| {name} | {j:.1f} | {tt:.1f} | {tt / j:.2f} |')


if __name__ == '__main__':
  cli.run(main)

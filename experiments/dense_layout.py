"""Dense JAX vs HF PyTorch, wall clock on all cores: attention mask form and row chunking.

  python experiments/dense_layout.py --workdir=runs/paper/bbc/mp --batch=32 --length=256

Interleaved repeats, medians. Two tables:
1. the attention core (scores, mask, softmax, context) on random (B, H, T, K) inputs with 3/4 of
   the keys alive: the padding mask selected into the scores (`where`) vs added to them, and
   torch's scaled_dot_product_attention;
2. the whole dense forward of the workdir's weights (`DenseEngine` programs, every token real)
   for several `chunk_tokens` values, vs HF BertForSequenceClassification (its default SDPA
   attention, and eager attention).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

sys.path.insert(0, __file__.rsplit('/', 2)[0])

from mp_jax import cli
from mp_jax import workdir as workdir_lib
from mp_jax.evaluation import timing
from mp_jax.model import bert, hf
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import programs

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir (its final/ weights).')
_BATCH = flags.DEFINE_integer('batch', 32, 'Batch size.')
_LENGTH = flags.DEFINE_integer('length', 256, 'Sequence length (no padding).')
_REPEATS = flags.DEFINE_integer('repeats', 7, 'Interleaved repeats (median).')
_CHUNKS = flags.DEFINE_list('chunk_tokens', ['0', '512', '1024', '2048'],
                            'chunk_tokens values for the JAX forward (0: no chunks).')
flags.mark_flag_as_required('workdir')


def attention_calls(b, t, nh, dh):
  """Attention core variants on random inputs; {name: zero-arg call}."""
  import torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((b, nh, t, dh)).astype(np.float32) for _ in range(3))
  alive = np.arange(t)[None, :].repeat(b, 0) < (3 * t) // 4
  alive[:, 0] = True

  def core(q, k, v, alive, additive):
    s = jnp.einsum('bhqk,bhtk->bhqt', q / np.sqrt(dh), k)
    if additive:
      s = s + jnp.where(alive, 0.0, bert.NEG_INF)[:, None, None, :]
    else:
      s = jnp.where(alive[:, None, None, :], s, bert.NEG_INF)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    return jnp.einsum('bhqt,bhtk->bhqk', e, v) / e.sum(-1, keepdims=True)

  args = tuple(map(jnp.asarray, (q, k, v, alive)))
  select, add = (jax.jit(lambda *a, m=m: core(*a, m)) for m in (False, True))
  np.testing.assert_allclose(select(*args), add(*args), atol=1e-5)
  tq, tk, tv = map(torch.from_numpy, (q, k, v))
  tmask = torch.from_numpy(alive)[:, None, None, :]
  return {'JAX, mask selected (where)': lambda: jax.block_until_ready(select(*args)),
          'JAX, mask added': lambda: jax.block_until_ready(add(*args)),
          'torch SDPA': lambda: torch.nn.functional.scaled_dot_product_attention(
              tq, tk, tv, attn_mask=tmask)}


def forward_calls(final, b, t, chunks):
  """Whole dense forward variants on the workdir's weights; {name: zero-arg call}."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cfg, params, _ = hf.load(final)
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, cfg.vocab_size, (b, t)).astype(np.int32)
  ids[:, 0] = 101
  types, mask = np.zeros_like(ids), np.ones_like(ids)
  calls = {}
  for c in chunks:
    eng = engine_lib.DenseEngine(cfg, params, length_buckets=(t,), batch_buckets=(b,),
                                 chunk_tokens=c)
    rows = programs.chunk_rows(b, t, c)
    calls[f'JAX dense, chunk_tokens={c} ({b // rows} x {rows} rows)'] = (
        lambda eng=eng: jax.block_until_ready(eng.run(ids, types, mask)))
  tids = torch.from_numpy(ids.astype(np.int64))
  for name, impl in (('torch (HF, SDPA)', 'sdpa'), ('torch (HF, eager attention)', 'eager')):
    m = transformers.BertForSequenceClassification.from_pretrained(
        final, attn_implementation=impl).eval()
    calls[name] = lambda m=m: m(input_ids=tids, token_type_ids=torch.zeros_like(tids),
                                attention_mask=torch.ones_like(tids)).logits
  return cfg, calls


def _table(title, ms, ref, batch=None):
  """Markdown: ms, examples/s (when `batch` is given) and speed relative to `ref`."""
  rate = ' examples/s |' if batch else ''
  lines = [title, '', f'| variant | ms |{rate} vs {ref} |', '|---|---|---|' + '---|' * bool(batch)]
  for k, v in ms.items():
    rate = f' {1e3 * batch / v:.1f} |' if batch else ''
    lines.append(f'| {k} | {v:.1f} |{rate} {ms[ref] / v:.2f}x |')
  return '\n'.join(lines)


def _ms(calls, repeats):
  """Median wall ms per call, interleaved, after one untimed call each."""
  return {k: 1e3 * v for k, v in timing.interleaved(calls, repeats, warmup=True).items()}


def main(argv):
  del argv
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  b, t, r = _BATCH.value, _LENGTH.value, _REPEATS.value
  chunks = [int(c) for c in _CHUNKS.value]
  cfg, fwd = forward_calls(workdir_lib.final_dir(_WORKDIR.value), b, t, chunks)
  with torch.inference_mode():
    att = _ms(attention_calls(b, t, cfg.num_heads, cfg.hidden_size // cfg.num_heads), r)
    ms = _ms(fwd, r)
  print(f'batch {b} x length {t}, {os.cpu_count()} cores, wall ms (median of {r}):\n')
  print(_table('Attention core (one layer)', att, 'torch SDPA') + '\n')
  print(_table('Dense forward', ms, 'torch (HF, SDPA)', batch=b))


if __name__ == '__main__':
  cli.run(main)

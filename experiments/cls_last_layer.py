"""The last layer's dead work: the dense program with its last layer for [CLS] alone.

  python experiments/cls_last_layer.py --runs=runs/paper --task=mr [--cls_first]

Only [CLS]'s row of the last layer reaches an answer (the pooler reads h[:, 0]; an exit head
after the last layer never runs), so that layer needs every alive token's key and value but the
query, attention, output projection and FFN of [CLS] alone: `last_layer_macs` against a full
layer's `flops.layer_macs`. The same holds for every method (a pruned last layer prunes tokens
only its own FFN would read). Not adopted: SPEC §5, like the peers, counts the full last layer,
so a [CLS]-only last layer in the dense program and the engine alike would move every FLOPs
speedup's meaning (docs/RESULTS.md, session 39).

Times, interleaved, bert's dense program (engine.DenseEngine) against the same program with
a [CLS]-only last layer over the eval split (batch 32) and a sample of single requests, built in
the order --cls_first says; prints their labels' agreement, the largest logit difference, the
medians and their ratios. Then, for ltp, fastbert and mp at the clock's tau (experiments/clock.py),
the FLOPs speedup of SPEC §5 against the one of a count whose last layer is [CLS]-only (dense
and method alike). Never run it beside another training or benchmark.
"""

import pathlib
import sys
import tempfile

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import clock as clock_script
from mp_jax import cli, methods
from mp_jax.data import batching, loading
from mp_jax.evaluation import reference, report, timing
from mp_jax.model import bert, flops
from mp_jax.model import config as model_config
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import packing, programs, shapes

F = {}
METHODS = ('ltp', 'fastbert', 'mp')


def define_flags():
  """This script's flags."""
  F.update(runs=flags.DEFINE_string('runs', 'runs/paper', 'experiments/run.py --out.'),
           task=flags.DEFINE_string('task', 'mr', 'The task (its bert, ltp, fastbert, mp).'),
           cls_first=flags.DEFINE_bool('cls_first', False, 'Build the [CLS]-only program first.'),
           repeats=flags.DEFINE_integer('repeats', 7, 'Interleaved rounds (medians).'),
           single_rows=flags.DEFINE_integer('single_rows', 64, 'Single requests timed.'))


class ClsAttention(nn.Module):
  """bert.SelfAttention's output for the [CLS] query alone (h_BxTxD -> Bx1xD), same params."""

  cfg: model_config.ModelConfig

  @nn.compact
  def __call__(self, h_BxTxD, alive_BxT):
    cfg = self.cfg
    b, _, _ = h_BxTxD.shape
    nh, dh, a = cfg.num_heads, cfg.head_dim, cfg.attention_size

    def heads(x_BxTxD, name):
      x_BxTxA = bert.dense(cfg, a, name=name)(x_BxTxD)
      return x_BxTxA.reshape(b, -1, nh, dh).transpose(0, 2, 1, 3)

    h_Bx1xD = h_BxTxD[:, :1]
    q_BxHx1xK = heads(h_Bx1xD, 'query') / np.sqrt(dh).astype(cfg.compute_dtype)
    k_BxHxTxK, v_BxHxTxK = heads(h_BxTxD, 'key'), heads(h_BxTxD, 'value')
    bias_BxT = jnp.where(alive_BxT, 0.0, bert.NEG_INF).astype(jnp.float32)
    # bert.SelfAttention's arithmetic, op for op: float32 scores, exp, row sums; the value
    # matmul on the unnormalised weights in the compute dtype, divided after.
    s_BxHx1xT = (jnp.einsum('bhqk,bhtk->bhqt', q_BxHx1xK, k_BxHxTxK,
                            preferred_element_type=jnp.float32) + bias_BxT[:, None, None, :])
    e_BxHx1xT = jnp.exp(s_BxHx1xT - s_BxHx1xT.max(-1, keepdims=True))
    z_BxHx1x1 = e_BxHx1xT.sum(-1, keepdims=True)
    ctx_BxHx1xK = jnp.einsum('bhqt,bhtk->bhqk', e_BxHx1xT.astype(cfg.compute_dtype), v_BxHxTxK,
                             preferred_element_type=jnp.float32) / z_BxHx1x1
    ctx_Bx1xA = ctx_BxHx1xK.astype(cfg.compute_dtype).transpose(0, 2, 1, 3).reshape(b, 1, a)
    return bert.DenseLN(cfg, name='output')(ctx_Bx1xA, h_Bx1xD)


def make_cls_forward(cfg):
  """programs.make_dense_forward with the last layer for [CLS] alone (same OUTPUTS)."""
  def forward(sp, ids_BxT, types_BxT, mask_BxT, halt_L, unroll=None):
    del halt_L, unroll
    h_BxTxD = bert.Embeddings(cfg).apply({'params': sp['embeddings']}, ids_BxT, types_BxT)
    alive_BxT = mask_BxT.astype(bool)
    *first, last = sp['per_layer']
    for p in first:
      a_BxTxD, _, _ = programs._layer(cfg, p, h_BxTxD, alive_BxT, method=bert.Layer.attend)
      h_BxTxD = programs._layer(cfg, p, a_BxTxD, method=bert.Layer.ffn)
    p = packing.unpack(last, packing.templates(cfg)['layer'])
    a_Bx1xD = ClsAttention(cfg).apply({'params': p['attention']}, h_BxTxD, alive_BxT)
    h_Bx1xD = programs._layer(cfg, last, a_Bx1xD, method=bert.Layer.ffn)  # [CLS]'s row only
    return programs.dense_outputs(cfg, sp, h_Bx1xD, alive_BxT)
  return forward


class ClsDenseEngine(engine_lib.DenseEngine):
  """DenseEngine whose programs run the last layer for [CLS] alone."""

  def _make_forward(self):
    return make_cls_forward(self.cfg)


def last_layer_macs(cfg, n_a):
  """MACs of a [CLS]-only last layer over n_a tokens: keys, values; one row's everything else."""
  d, a, d_ff = cfg.hidden_size, cfg.attention_size, cfg.intermediate_size
  n_a = np.asarray(n_a, np.float64)
  return 2.0 * d * a * n_a + 2.0 * a * n_a + 2.0 * d * a + 2.0 * d * d_ff


def cls_flops_speedup(cfg, res, tau, plan):
  """(SPEC §5 flops_speedup, the same with [CLS]-only last layers) of a reference run at tau."""
  m, exit_N, _ = reference.metrics(res, cfg, tau, plan=plan)
  n_attn_NxL, n_ffn_NxL = np.asarray(res['n_attn'], np.float64), np.asarray(res['n_ffn'])
  ran_last_N = exit_N == cfg.num_layers
  saved_N = ran_last_N * (flops.model_layer_macs(cfg, n_attn_NxL[:, -1], n_ffn_NxL[:, -1])
                          - last_layer_macs(cfg, n_attn_NxL[:, -1]))
  full = cfg.unpruned()  # the dense baseline (SPEC §5)
  n_N = np.asarray(res['lengths'], np.float64)
  dense_N = flops.dense_flops(cfg, n_N) / 2.0
  dense_cls_N = dense_N - (flops.model_layer_macs(full, n_N, n_N) - last_layer_macs(full, n_N))
  actual = m['gflops_per_example'] * 1e9 / 2.0  # mean MACs an example
  return m['flops_speedup'], float(dense_cls_N.mean() / (actual - saved_N.mean()))


def main(argv):
  del argv
  task, runs = F['task'].value, F['runs'].value
  with tempfile.TemporaryDirectory() as tmp:
    subj, _, tok = clock_script.subjects(task, False, runs, ('bert', *METHODS), pathlib.Path(tmp))
  c, cfg, params, _, _ = subj['bert']
  ds = loading.load_task(c.data)
  enc = batching.encode(tok, ds[report.eval_split(c, ds)], cfg.max_seq_length)
  rows = list(zip(enc.ids, enc.type_ids))
  grid = shapes.for_model(shapes.resolve(c.eval), cfg.max_seq_length)
  shared = engine_lib.prepare(cfg, params)
  kinds = {'dense': engine_lib.DenseEngine, 'cls': ClsDenseEngine}
  order = ('cls', 'dense') if F['cls_first'].value else ('dense', 'cls')
  engs = {k: kinds[k](cfg, shared, **grid.engine_kw()) for k in order}
  out = {k: e.predict(rows) for k, e in engs.items()}
  agree = float(np.mean(out['dense']['labels'] == out['cls']['labels']))
  diff = float(np.abs(out['dense']['logits'] - out['cls']['logits']).max())
  print(f'{task}: {len(rows)} rows, labels agree {agree:.4f}, largest logit difference {diff:.2e}')
  single = np.random.default_rng(0).choice(len(rows), min(F['single_rows'].value, len(rows)),
                                           replace=False)
  calls = {k: (lambda e=e: e.predict(rows)) for k, e in engs.items()}
  calls.update({f'{k} x1': (lambda e=e: [e.predict([rows[i]]) for i in single])
                for k, e in engs.items()})
  rounds = {}
  t = timing.interleaved(calls, F['repeats'].value, warmup=True, rounds=rounds)
  print(f'built first: {order[0]}; seconds (medians of {F["repeats"].value} rounds): '
        + ', '.join(f'{k} {v:.4f}' for k, v in t.items()))
  for suffix, what in (('', 'batch 32'), (' x1', f'{len(single)} single requests')):
    lo, hi = timing.paired_range(rounds, f'dense{suffix}', f'cls{suffix}')
    print(f'  {what}: dense / [CLS]-only last layer {t["dense" + suffix] / t["cls" + suffix]:.3f}x'
          f' (rounds {lo:.3f}-{hi:.3f}x)')
  engs = calls = None
  print('\n| method | τ | FLOPs speedup (SPEC §5) | with [CLS]-only last layers |\n'
        '|---|---|---|---|')
  for m in METHODS:
    _, mcfg, mparams, tau, plan = subj[m]
    pruning, exits = methods.eval_modes(m)
    res = reference.run(mparams, mcfg, enc, pruning=pruning, exits=exits,
                        batch_size=max(grid.batch_buckets), length_buckets=grid.length_buckets)
    tau = tau if exits else 0.0
    spec, cls = cls_flops_speedup(mcfg, res, tau, plan)
    print(f'| {m} | {tau:g} | {spec:.2f}x | {cls:.2f}x |')


if __name__ == '__main__':
  define_flags()
  cli.run(main)

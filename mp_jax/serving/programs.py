"""The device programs of compiled inference (SPEC §6): static buckets; compaction in a while_loop.

One AOT-compiled program per (batch, input length) bucket. Up to `unroll_max_rows` rows (one by
default) the layers are unrolled over the per-layer weights, each under a `lax.cond`, at the
input's shape (pruned tokens masked in place). Otherwise a `lax.while_loop` runs one layer per
iteration (so layers after the last exit never run) as two `lax.switch`es over (batch bucket,
length bucket) pairs, each branch a static prefix slice of full-shape buffers:
  1. attention + pruning decision, then kept tokens move to a prefix ([CLS] first, original order;
     stable argsort of ~keep); the FFN switch then uses the smallest length bucket holding the
     longest kept row;
  2. FFN + exit head + exit decision, then still-active rows move to the front (stable argsort),
     so the next layer uses the smallest batch bucket holding them.
Loop invariants: working rows [0, nact) are active, `perm` maps working row -> input row; each
row's alive tokens are a prefix. Embeddings (and position ids) are computed before any compaction.
Outputs are scattered back to input row order; n_attn/n_ffn are 0 for layers after the exit.
Branch code uses lower-case b/t for the branch's static bucket sizes (x_bxtxD).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from mp_jax.data import batching
from mp_jax.model import bert
from mp_jax.model import config as model_config
from mp_jax.model import exits as exits_lib
from mp_jax.model import pruning as pruning_lib
from mp_jax.serving import packing

OUTPUTS = ('labels', 'logits', 'probs', 'exit_layer', 'n_attn', 'n_ffn')


# Batches of at most this many rows run the one-row form: the layers unrolled over the per-layer
# weights, each under a lax.cond (layers after the exit never run), at the input's own shape:
# pruned tokens stay masked where they are, no compaction and no bucket switches. At one row a
# layer's time is mostly its weights' traffic, not its tokens; the while loop copied each
# layer's weights out of the stacked ones (1.0 of 1.8 ms of kernel time for a request), and its
# switches' branches cost time at every call even untaken. mp's `mr` model at τ 0.3, one request
# at a time (docs/RESULTS.md, session 22): 2.90 ms a request against the loop's 3.51. Measured on
# XLA:CPU only; GPU and TPU run it too (lowered in tests/test_lowering.py), untimed there.
UNROLL_MAX_ROWS = 1
# ... of inputs of at most this many tokens (the lengths measured, `mr`'s): longer rows' tokens
# cost more than the weights' traffic, and the loop's compaction shortens them.
UNROLL_MAX_LENGTH = 64


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stack_params(cfg: model_config.ModelConfig, params, stacked: bool = True) -> dict:
  """Engine params: the per-layer and per-exit subtrees, each with its vectors packed into one
  array (mp_jax.serving.packing: fewer arguments a call), ('per_layer', 'per_exit': tuples, for
  programs that know their layer when traced or called) and, with `stacked`, also as they are,
  stacked on a leading axis ('layers', 'exits': the fused loop indexes them by a traced layer).
  Exit heads are in the engine's form (engine_exit: float32 heads merged).

  Both forms on the device hold the weights twice; the dense programs (DenseEngine) need only the
  per-layer ones. Indexing a stacked weight by a traced layer copies it out for the matmul, 7 MB
  a MiniLM layer per call, which made the dense program 1.11x slower at 1 x 28 tokens than one
  over per-layer weights (docs/RESULTS.md, session 18).
  """
  n, tpl = cfg.num_layers, packing.templates(cfg)
  has_exits = n > 1 and all(f'exit_{l}' in params for l in range(n - 1))
  per_layer = tuple(params[f'layer_{l}'] for l in range(n))
  per_exit = (tuple(engine_exit(cfg, params[f'exit_{l}']) for l in range(n - 1)) if has_exits
              else ())
  sp = {'embeddings': params['embeddings'],
        'per_layer': tuple(packing.pack(p, tpl['layer']) for p in per_layer),
        'per_exit': tuple(packing.pack(p, exit_template(cfg)) for p in per_exit),
        'pooler': params['pooler'], 'classifier': params['classifier'],
        'thresholds': jnp.asarray(params['thresholds'], jnp.float32).reshape(n)}
  if stacked:
    sp.update(layers=_stack(per_layer), exits=_stack(per_exit) if per_exit else {})
  return sp


def unrolls(batch: int, length: int, chunk_tokens: int, max_rows: int | None = None) -> bool:
  """Whether the fused (batch, length) program runs the one-row form: at most `max_rows` rows
  (None: UNROLL_MAX_ROWS) of at most UNROLL_MAX_LENGTH tokens, in one chunk (a chunked program
  keeps the loop)."""
  max_rows = UNROLL_MAX_ROWS if max_rows is None else max_rows
  return (batch <= max_rows and length <= UNROLL_MAX_LENGTH
          and chunk_rows(batch, length, chunk_tokens) == batch)


def operands(sp: dict, *, dense: bool, unrolled: bool = False) -> dict:
  """The part of the engine params a forward reads: the per-layer weights where its layers are
  unrolled (the dense forward; the one-row form, `unrolled`), else the stacked ones. Only these
  are passed: every leaf passed costs time at each call, and an exported program stores what
  it takes."""
  if dense:
    keys = ('per_layer',)
  elif unrolled:
    keys = ('per_layer', 'per_exit', 'thresholds')
  else:
    keys = ('layers', 'exits', 'thresholds')
  if 'layers' in keys and 'layers' not in sp:
    raise ValueError('these engine params hold no stacked weights (prepared for a dense engine, '
                     'stacked=False): a pruning or exit engine needs them')
  return {k: sp[k] for k in ('embeddings', *keys, 'pooler', 'classifier')}


def read_params(sp: dict, *, dense: bool) -> dict:
  """The engine params some program of a (dense) engine reads: operands of each of its forms."""
  forms = [(True, False)] if dense else [(True, False), (False, False), (False, True)]
  return {k: v for d, u in forms for k, v in operands(sp, dense=d, unrolled=u).items()}


def spaced(buckets: Sequence[int], ratio: int = 2) -> tuple[int, ...]:
  """Largest bucket, then each one <= 1/ratio of the last kept: (8, 16, .., 64) -> 8,16,32,64."""
  out = [max(buckets)]
  for b in sorted(buckets, reverse=True)[1:]:
    if b * ratio <= out[-1]:
      out.append(b)
  return tuple(sorted(out))


def _compact(x_BxTxD, keep_BxT):
  """Moves kept tokens to a prefix in their original order (stable sort of ~keep)."""
  idx_BxT = jnp.argsort(~keep_BxT, axis=1, stable=True)
  x_BxTxD = jnp.take_along_axis(x_BxTxD, idx_BxT[..., None], axis=1)
  return x_BxTxD, jnp.take_along_axis(keep_BxT, idx_BxT, axis=1)


def _bucket_index(x, buckets):
  """Index of the smallest bucket >= x (x traced; buckets static)."""
  return jnp.sum(jnp.asarray(buckets) < x).astype(jnp.int32)


def _layer(cfg, p, *args, method):
  """A bert.Layer method with the layer's params `p` (packed or not: mp_jax.serving.packing)."""
  p = packing.unpack(p, packing.templates(cfg)['layer'])
  return bert.Layer(cfg).apply({'params': p}, *args, method=method)


def merges_heads(cfg: model_config.ModelConfig) -> bool:
  """Whether the engine runs exit heads merged (exits.merge): float32 models, exit_heads <= 2
  (with H > 2 a merged pair holds and multiplies H*w^2 weights, not 2*w^2)."""
  return cfg.compute_dtype == jnp.float32 and cfg.exit_heads <= 2


def engine_exit(cfg: model_config.ModelConfig, p) -> dict:
  """An exit head's params in the engine's form (merged where merges_heads), not packed."""
  return exits_lib.merge(p, cfg.exit_heads) if merges_heads(cfg) else p


@functools.lru_cache(maxsize=16)
def exit_template(cfg: model_config.ModelConfig):
  """The shapes of engine_exit's params (None: a model without exit heads)."""
  tpl = packing.templates(cfg)['exit']
  return tpl if tpl is None else jax.eval_shape(functools.partial(engine_exit, cfg), tpl)


def check_prepared(cfg: model_config.ModelConfig, sp: dict) -> None:
  """A ValueError unless `sp`'s layers and exit heads are in this model's engine form."""
  packing.check(sp['per_layer'], packing.templates(cfg)['layer'], 'per_layer')
  if sp['per_exit']:
    if (tpl := exit_template(cfg)) is None:
      raise ValueError("params hold exit heads, the engine's model has none")
    packing.check(sp['per_exit'], tpl, 'per_exit')


def _head(cfg, pe, h_BxTxD, keep_BxT):
  """An exit head's logits (pe: its engine_exit params, packed or not)."""
  pe = packing.unpack(pe, exit_template(cfg))
  if merges_heads(cfg):
    return exits_lib.merged_logits(pe, h_BxTxD, keep_BxT, cfg.exit_heads)
  return exits_lib.ExitHead(cfg.num_labels, cfg.exit_width, cfg.exit_heads,
                            dtype=cfg.compute_dtype).apply({'params': pe}, h_BxTxD, keep_BxT)


def _teacher(cfg, sp, h_BxTxD):
  pooled_BxD = bert.Pooler(cfg).apply({'params': sp['pooler']}, h_BxTxD)
  return bert.logits_dense(cfg.num_labels).apply({'params': sp['classifier']}, pooled_BxD)


def _finish(logits_BxC, exit_B, n_attn_BxL, n_ffn_BxL):
  probs_BxC = jax.nn.softmax(logits_BxC, axis=-1)
  return {'labels': jnp.argmax(logits_BxC, -1).astype(jnp.int32), 'logits': logits_BxC,
          'probs': probs_BxC, 'exit_layer': exit_B.astype(jnp.int32),
          'n_attn': n_attn_BxL.astype(jnp.int32), 'n_ffn': n_ffn_BxL.astype(jnp.int32)}


def make_forward(cfg: model_config.ModelConfig, *, prune: bool, exits: bool,
                 batch_buckets: Sequence[int], length_buckets: Sequence[int],
                 unroll_max_rows: int | None = None):
  """Returns forward(sp, ids_BxT, types_BxT, mask_BxT, halt_L, unroll=None) -> dict of OUTPUTS
  (row order kept). halt_L: the per-layer halt values (exit_plan.halts; 0: that head neither
  runs nor exits).

  A row is a request iff mask[row, 0] == 1 ([CLS]); other rows are batch padding. `unroll`
  picks the one-row form (True) or the loop (False); None: the one-row form for at most
  `unroll_max_rows` rows (None: UNROLL_MAX_ROWS) of at most UNROLL_MAX_LENGTH tokens. Same
  outputs either way.
  """
  unroll_max_rows = UNROLL_MAX_ROWS if unroll_max_rows is None else unroll_max_rows
  n_layers, n_labels = cfg.num_layers, cfg.num_labels
  exits = exits and n_layers > 1

  def attn_branch(nb, nt):
    def branch(p_l, theta, h_BxTxD, alive_BxT):
      x_bxtxD, a_bxt = h_BxTxD[:nb, :nt], alive_BxT[:nb, :nt]
      y_bxtxD, e_bxHxtxt, z_bxHxtx1 = _layer(cfg, p_l, x_bxtxD, a_bxt, method=bert.Layer.attend)
      keep_bxt = a_bxt
      if prune:
        score_bxt = pruning_lib.importance(e_bxHxtxt, z_bxHxtx1, a_bxt, cfg.max_seq_length)
        keep_bxt = pruning_lib.hard_keep(score_bxt, theta, a_bxt)
        y_bxtxD, keep_bxt = _compact(y_bxtxD, keep_bxt)
      pad = lambda c: jnp.pad(c.sum(1, dtype=jnp.int32), (0, h_BxTxD.shape[0] - nb))
      return (lax.dynamic_update_slice(h_BxTxD, y_bxtxD, (0, 0, 0)),
              lax.dynamic_update_slice(alive_BxT, keep_bxt, (0, 0)), pad(a_bxt), pad(keep_bxt))
    return branch

  def ffn_branch(nb, nt):
    def branch(p_l, pe_l, l, tau, nact, h_BxTxD, alive_BxT):
      b = h_BxTxD.shape[0]
      x_bxtxD, k_bxt = h_BxTxD[:nb, :nt], alive_BxT[:nb, :nt]
      y_bxtxD = _layer(cfg, p_l, x_bxtxD, method=bert.Layer.ffn)
      last = l == n_layers - 1
      act_b = jnp.arange(nb) < nact
      # Every active row is done at the last layer; the teacher runs once, after the loop.
      logits_bxC = jnp.zeros((nb, n_labels), jnp.float32)
      done_b, order_b = act_b & last, jnp.arange(nb)
      if exits:
        head = functools.partial(_head, cfg, pe_l)
        # tau <= 0 never exits (exits.should_exit): the head is skipped, as in the FLOPs count
        # (a head the exit plan drops has tau 0 at its layer).
        logits_bxC = lax.cond(last | (tau <= 0), lambda y, k: logits_bxC, head, y_bxtxD, k_bxt)
        done_b = act_b & (last | exits_lib.should_exit(exits_lib.uncertainty(logits_bxC), tau))
        # Still-active rows to the front (stable), so the next layer can use a smaller batch.
        order_b = jnp.argsort(~(act_b & ~done_b), stable=True)
        y_bxtxD, k_bxt = y_bxtxD[order_b], k_bxt[order_b]
      return (lax.dynamic_update_slice(h_BxTxD, y_bxtxD, (0, 0, 0)),
              lax.dynamic_update_slice(alive_BxT, k_bxt, (0, 0)),
              jnp.pad(logits_bxC, ((0, b - nb), (0, 0))), jnp.pad(done_b, (0, b - nb)),
              jnp.concatenate([order_b, jnp.arange(nb, b)]))
    return branch

  def unrolled(sp, ids_BxT, types_BxT, mask_BxT, halt_L):
    """The one-row form (module docstring): rows stay in place, pruned tokens masked."""
    b = ids_BxT.shape[0]
    h_BxTxD = bert.Embeddings(cfg).apply({'params': sp['embeddings']}, ids_BxT, types_BxT)
    alive_BxT = mask_BxT.astype(bool)
    zeros_BxL = jnp.zeros((b, n_layers), jnp.int32)
    s = dict(h=h_BxTxD, alive=alive_BxT, act=alive_BxT[:, 0], exit=jnp.zeros((b,), jnp.int32),
             logits=jnp.zeros((b, n_labels), jnp.float32), n_attn=zeros_BxL, n_ffn=zeros_BxL)

    def layer(l, s):
      p_l, a_BxT, act_B = sp['per_layer'][l], s['alive'], s['act']
      y_BxTxD, e_BxHxTxT, z_BxHxTx1 = _layer(cfg, p_l, s['h'], a_BxT, method=bert.Layer.attend)
      keep_BxT = a_BxT
      if prune:
        score_BxT = pruning_lib.importance(e_BxHxTxT, z_BxHxTx1, a_BxT, cfg.max_seq_length)
        keep_BxT = pruning_lib.hard_keep(score_BxT, sp['thresholds'][l], a_BxT)
      y_BxTxD = _layer(cfg, p_l, y_BxTxD, method=bert.Layer.ffn)
      count = lambda m_BxT: jnp.where(act_B, m_BxT.sum(1, dtype=jnp.int32), 0)
      out = dict(s, h=y_BxTxD, alive=keep_BxT, n_attn=s['n_attn'].at[:, l].set(count(a_BxT)),
                 n_ffn=s['n_ffn'].at[:, l].set(count(keep_BxT)))
      if exits and l < n_layers - 1:
        tau = halt_L[l]
        head = functools.partial(_head, cfg, sp['per_exit'][l])
        none = lambda y, k: jnp.zeros((b, n_labels), jnp.float32)
        # tau <= 0 never exits: the head is skipped (as in the while loop and the FLOPs count).
        logits_BxC = lax.cond(tau <= 0, none, head, y_BxTxD, keep_BxT)
        done_B = act_B & exits_lib.should_exit(exits_lib.uncertainty(logits_BxC), tau)
        out.update(exit=jnp.where(done_B, l + 1, s['exit']), act=act_B & ~done_B,
                   logits=jnp.where(done_B[:, None], logits_BxC, s['logits']))
      return out

    for l in range(n_layers):
      s = lax.cond(s['act'].any(), functools.partial(layer, l), lambda s: s, s)
    none = lambda h: jnp.zeros((b, n_labels), jnp.float32)
    teacher_BxC = lax.cond(s['act'].any(), functools.partial(_teacher, cfg, sp), none, s['h'])
    logits_BxC = jnp.where(s['act'][:, None], teacher_BxC, s['logits'])
    return _finish(logits_BxC, jnp.where(s['act'], n_layers, s['exit']), s['n_attn'],
                   s['n_ffn'])

  def forward(sp, ids_BxT, types_BxT, mask_BxT, halt_L, unroll=None):
    b, t = ids_BxT.shape
    # Unchunked here: `chunked` passes unroll=False when it splits the rows.
    unroll = unrolls(b, t, 0, unroll_max_rows) if unroll is None else unroll
    if unroll:
      return unrolled(sp, ids_BxT, types_BxT, mask_BxT, halt_L)
    # Without exits no row ever leaves; without pruning no row ever gets shorter.
    bbs = batching.upto(batch_buckets, b) if exits else (b,)
    lbs = batching.upto(length_buckets, t) if prune else (t,)
    pairs = [(nb, nt) for nb in bbs for nt in lbs]
    attn = [attn_branch(*p) for p in pairs]
    ffn = [ffn_branch(*p) for p in pairs]
    pick = lambda nact, cnt_B: (_bucket_index(nact, bbs) * len(lbs)
                                + _bucket_index(cnt_B.max(), lbs))
    # Position ids are assigned here, on the full input, so later compaction cannot change them.
    h_BxTxD = bert.Embeddings(cfg).apply({'params': sp['embeddings']}, ids_BxT, types_BxT)
    alive_BxT = mask_BxT.astype(bool)
    real_B = alive_BxT[:, 0]
    perm_B = jnp.argsort(~real_B, stable=True)  # requests first; perm: working -> input row
    h_BxTxD, alive_BxT = _compact(h_BxTxD[perm_B], alive_BxT[perm_B])
    zeros_BxL = jnp.zeros((b, n_layers), jnp.int32)
    state = dict(l=jnp.int32(0), nact=real_B.sum(dtype=jnp.int32), h=h_BxTxD, alive=alive_BxT,
                 perm=perm_B, exit=jnp.zeros((b,), jnp.int32),
                 logits=jnp.zeros((b, n_labels), jnp.float32), n_attn=zeros_BxL,
                 n_ffn=zeros_BxL)

    def body(s):
      l, nact, perm_B = s['l'], s['nact'], s['perm']
      rows_B = jnp.arange(b) < nact
      p_l = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, l, keepdims=False), sp['layers'])
      pe_l = jax.tree.map(
        lambda x: lax.dynamic_index_in_dim(x, jnp.minimum(l, n_layers - 2), keepdims=False),
        sp['exits'])
      cnt_B = jnp.where(rows_B, s['alive'].sum(1, dtype=jnp.int32), 0)
      h, alive, na_B, nf_B = lax.switch(pick(nact, cnt_B), attn, p_l, sp['thresholds'][l],
                                        s['h'], s['alive'])
      h, alive, logits_BxC, done_B, order_B = lax.switch(
          pick(nact, jnp.where(rows_B, nf_B, 0)), ffn, p_l, pe_l, l, halt_L[l], nact, h, alive)
      # Record in input row order: working position i holds input row perm[i].
      ex = s['exit'].at[perm_B].set(jnp.where(done_B, l + 1, s['exit'][perm_B]))
      lg = s['logits'].at[perm_B].set(jnp.where(done_B[:, None], logits_BxC, s['logits'][perm_B]))
      n_attn = s['n_attn'].at[perm_B, l].set(jnp.where(rows_B, na_B, 0))
      n_ffn = s['n_ffn'].at[perm_B, l].set(jnp.where(rows_B, nf_B, 0))
      return dict(l=l + 1, nact=nact - done_B.sum(dtype=jnp.int32), h=h, alive=alive,
                  perm=perm_B[order_B], exit=ex, logits=lg, n_attn=n_attn, n_ffn=n_ffn)

    s = lax.while_loop(lambda s: (s['l'] < n_layers) & (s['nact'] > 0), body, state)
    # Rows that reached layer L sit at the front with the last perm (no reordering at L).
    teacher_BxC = _teacher(cfg, sp, s['h'])
    teacher_BxC = jnp.zeros_like(teacher_BxC).at[s['perm']].set(teacher_BxC)
    logits_BxC = jnp.where((s['exit'] == n_layers)[:, None], teacher_BxC, s['logits'])
    return _finish(logits_BxC, s['exit'], s['n_attn'], s['n_ffn'])

  return forward


def make_dense_forward(cfg: model_config.ModelConfig):
  """Dense baseline forward(sp, ids, types, mask, halt_L): full shapes, every layer, teacher."""
  def forward(sp, ids_BxT, types_BxT, mask_BxT, halt_L, unroll=None):
    del halt_L, unroll  # one form: unrolled over the per-layer weights
    h_BxTxD = bert.Embeddings(cfg).apply({'params': sp['embeddings']}, ids_BxT, types_BxT)
    alive_BxT = mask_BxT.astype(bool)

    # Unrolled over the per-layer weights: a scan over the stacked ones copies each layer's
    # weights out first (1.11x slower at 1 x 28 tokens, 1.02-1.03x at 1 x 64 and 8 x 28, 1.00x
    # at 32 x 28; session 18).
    for p in sp['per_layer']:
      a_BxTxD, _, _ = _layer(cfg, p, h_BxTxD, alive_BxT, method=bert.Layer.attend)
      h_BxTxD = _layer(cfg, p, a_BxTxD, method=bert.Layer.ffn)
    return dense_outputs(cfg, sp, h_BxTxD, alive_BxT)
  return forward


def dense_outputs(cfg: model_config.ModelConfig, sp, h_BxTxD, alive_BxT):
  """OUTPUTS of a dense forward from its last hidden states: the teacher, every layer, every
  alive token counted."""
  n_B = alive_BxT.sum(1, dtype=jnp.int32) * alive_BxT[:, 0]
  n_BxL = jnp.broadcast_to(n_B[:, None], (n_B.shape[0], cfg.num_layers))
  exit_B = jnp.where(alive_BxT[:, 0], cfg.num_layers, 0)
  return _finish(_teacher(cfg, sp, h_BxTxD), exit_B, n_BxL, n_BxL)


def chunk_rows(batch: int, length: int, chunk_tokens: int) -> int:
  """Largest divisor of `batch` with rows * length <= chunk_tokens (at least 1; 0: no chunks)."""
  if chunk_tokens <= 0:
    return batch
  cap = max(1, chunk_tokens // length)
  return max(r for r in range(1, batch + 1) if batch % r == 0 and r <= cap)


def map_rows(fn, xs, rows):
  """fn over the leading (row) axis of the arrays `xs` in chunks of `rows` (a lax.map)."""
  n = xs[0].shape[0]
  if rows >= n:
    return fn(*xs)
  out = lax.map(lambda c: fn(*c), tuple(x.reshape(n // rows, rows, *x.shape[1:]) for x in xs))
  return jax.tree.map(lambda y: y.reshape(n, *y.shape[2:]), out)


def chunked(forward, chunk_tokens: int):
  """The whole forward run over row chunks of about `chunk_tokens` tokens (a lax.map): every
  layer's activations of a chunk stay in cache, and each chunk compacts tokens, shrinks its
  length, drops exited rows and stops its layer loop on its own. Same outputs, same row order.

  (Chunking each layer instead, so that narrow late layers run as one big chunk, measured
  slower on bbc: the activations then leave the cache between layers.)"""
  def run(sp, ids_BxT, types_BxT, mask_BxT, halt_L):
    b, t = ids_BxT.shape
    r = chunk_rows(b, t, chunk_tokens)
    if r == b:
      return forward(sp, ids_BxT, types_BxT, mask_BxT, halt_L)
    # Chunks of a larger batch keep the loop, whatever their rows (programs.unrolls).
    return map_rows(lambda *x: forward(sp, *x, halt_L, unroll=False),
                    (ids_BxT, types_BxT, mask_BxT), r)
  return run

"""Compiled pruned / early-exit inference (SPEC §6): static buckets, compaction, one while_loop.

One AOT-compiled program per (batch, input length) bucket. Inside, a `lax.while_loop` runs one
layer per iteration (so layers after the last exit never run) as two `lax.switch`es over
(batch bucket, length bucket) pairs, each branch a static prefix slice of full-shape buffers:
  1. attention + pruning decision, then kept tokens move to a prefix ([CLS] first, original order;
     stable argsort of ~keep); the FFN switch then uses the smallest length bucket holding the
     longest kept row;
  2. FFN + exit head + exit decision, then still-active rows move to the front (stable argsort),
     so the next layer uses the smallest batch bucket holding them.
Invariants: working rows [0, nact) are active, `perm` maps working row -> input row; each row's
alive tokens are a prefix. Embeddings (and position ids) are computed before any compaction.
Outputs are scattered back to input row order; n_attn/n_ffn are 0 for layers after the exit.
Branch code uses lower-case b/t for the branch's static bucket sizes (x_bxtxD).
"""

import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mp_jax import distributed, evaluate, serving
from mp_jax import exits as exits_lib
from mp_jax import model as model_lib
from mp_jax import pruning as pruning_lib

OUTPUTS = ('labels', 'logits', 'probs', 'exit_layer', 'n_attn', 'n_ffn')
_BACKEND_COMPILES = [0]


def _count_compiles(event, duration_secs, **kwargs):
  del duration_secs, kwargs
  if event == '/jax/core/compile/backend_compile_duration':
    _BACKEND_COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def backend_compiles() -> int:
  """XLA compilations in this process since mp_jax.engine was imported (any function)."""
  return _BACKEND_COMPILES[0]


def set_cache_dir(cache_dir: str) -> None:
  """Turns on jax's persistent compilation cache in `cache_dir` for every program size."""
  jax.config.update('jax_compilation_cache_dir', str(cache_dir))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  from jax.experimental.compilation_cache import compilation_cache
  compilation_cache.reset_cache()  # the cache reads its directory once; make it re-read


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stack_params(cfg: model_lib.ModelConfig, params) -> dict:
  """Engine params: per-layer and per-exit subtrees stacked on a leading axis."""
  n = cfg.num_layers
  has_exits = n > 1 and all(f'exit_{l}' in params for l in range(n - 1))
  return {
      'embeddings': params['embeddings'],
      'layers': _stack([params[f'layer_{l}'] for l in range(n)]),
      'exits': _stack([params[f'exit_{l}'] for l in range(n - 1)]) if has_exits else {},
      'pooler': params['pooler'], 'classifier': params['classifier'],
      'thresholds': jnp.asarray(params['thresholds'], jnp.float32).reshape(n)}


def sub_buckets(buckets: Sequence[int], top: int) -> tuple[int, ...]:
  """Configured buckets below `top`, plus `top`: the shapes a (top)-sized program can shrink to."""
  return tuple(sorted({int(b) for b in buckets if b < top} | {int(top)}))


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
  return model_lib.Layer(cfg).apply({'params': p}, *args, method=method)


def _teacher(cfg, sp, h_BxTxD):
  pooled_BxD = model_lib.Pooler(cfg).apply({'params': sp['pooler']}, h_BxTxD)
  return model_lib.logits_dense(cfg.num_labels).apply({'params': sp['classifier']}, pooled_BxD)


def _finish(logits_BxC, exit_B, n_attn_BxL, n_ffn_BxL):
  probs_BxC = jax.nn.softmax(logits_BxC, axis=-1)
  return {'labels': jnp.argmax(logits_BxC, -1).astype(jnp.int32), 'logits': logits_BxC,
          'probs': probs_BxC, 'exit_layer': exit_B.astype(jnp.int32),
          'n_attn': n_attn_BxL.astype(jnp.int32), 'n_ffn': n_ffn_BxL.astype(jnp.int32)}


def make_forward(cfg: model_lib.ModelConfig, *, prune: bool, exits: bool,
                 batch_buckets: Sequence[int], length_buckets: Sequence[int]):
  """Returns forward(sp, ids_BxT, types_BxT, mask_BxT, tau) -> dict of OUTPUTS (row order kept).

  A row is a request iff mask[row, 0] == 1 ([CLS]); other rows are batch padding.
  """
  n_layers, n_labels = cfg.num_layers, cfg.num_labels
  exits = exits and n_layers > 1

  def attn_branch(nb, nt):
    def branch(p_l, theta, h_BxTxD, alive_BxT):
      x_bxtxD, a_bxt = h_BxTxD[:nb, :nt], alive_BxT[:nb, :nt]
      y_bxtxD, probs_bxHxtxt = _layer(cfg, p_l, x_bxtxD, a_bxt, method=model_lib.Layer.attend)
      keep_bxt = a_bxt
      if prune:
        score_bxt = pruning_lib.importance(probs_bxHxtxt, a_bxt, cfg.max_seq_length)
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
      y_bxtxD = _layer(cfg, p_l, x_bxtxD, method=model_lib.Layer.ffn)
      last = l == n_layers - 1
      act_b = jnp.arange(nb) < nact
      # Every active row is done at the last layer; the teacher runs once, after the loop.
      logits_bxC = jnp.zeros((nb, n_labels), jnp.float32)
      done_b, order_b = act_b & last, jnp.arange(nb)
      if exits:
        head = lambda y, k: exits_lib.ExitHead(
            n_labels, cfg.exit_width, cfg.exit_heads, dtype=cfg.compute_dtype).apply(
                {'params': pe_l}, y, k)
        # tau <= 0 never exits (exits.should_exit): the head is skipped, as in the FLOPs count.
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

  def forward(sp, ids_BxT, types_BxT, mask_BxT, tau):
    b, t = ids_BxT.shape
    # Without exits no row ever leaves; without pruning no row ever gets shorter.
    bbs = sub_buckets(batch_buckets, b) if exits else (b,)
    lbs = sub_buckets(length_buckets, t) if prune else (t,)
    pairs = [(nb, nt) for nb in bbs for nt in lbs]
    attn = [attn_branch(*p) for p in pairs]
    ffn = [ffn_branch(*p) for p in pairs]
    pick = lambda nact, cnt_B: (_bucket_index(nact, bbs) * len(lbs)
                                + _bucket_index(cnt_B.max(), lbs))
    # Position ids are assigned here, on the full input, so later compaction cannot change them.
    h_BxTxD = model_lib.Embeddings(cfg).apply({'params': sp['embeddings']}, ids_BxT, types_BxT)
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
          pick(nact, jnp.where(rows_B, nf_B, 0)), ffn, p_l, pe_l, l, tau, nact, h, alive)
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


def make_dense_forward(cfg: model_lib.ModelConfig):
  """Dense baseline forward(sp, ids, types, mask, tau): full shapes, every layer, teacher."""
  def forward(sp, ids_BxT, types_BxT, mask_BxT, tau):
    del tau
    h_BxTxD = model_lib.Embeddings(cfg).apply({'params': sp['embeddings']}, ids_BxT, types_BxT)
    alive_BxT = mask_BxT.astype(bool)

    def layer(h_BxTxD, p):
      a_BxTxD, _ = _layer(cfg, p, h_BxTxD, alive_BxT, method=model_lib.Layer.attend)
      return _layer(cfg, p, a_BxTxD, method=model_lib.Layer.ffn), None

    # One copy of the layer code (quick to compile); as fast as unrolled layers on XLA:CPU.
    h_BxTxD, _ = lax.scan(layer, h_BxTxD, sp['layers'])
    n_B = alive_BxT.sum(1, dtype=jnp.int32) * alive_BxT[:, 0]
    n_BxL = jnp.broadcast_to(n_B[:, None], (n_B.shape[0], cfg.num_layers))
    exit_B = jnp.where(alive_BxT[:, 0], cfg.num_layers, 0)
    return _finish(_teacher(cfg, sp, h_BxTxD), exit_B, n_BxL, n_BxL)
  return forward


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
  def run(sp, ids_BxT, types_BxT, mask_BxT, tau):
    b, t = ids_BxT.shape
    return map_rows(lambda *x: forward(sp, *x, tau), (ids_BxT, types_BxT, mask_BxT),
                    chunk_rows(b, t, chunk_tokens))
  return run


def plan_batches(n: int, batch_buckets: Sequence[int], call_cost: int = 1) -> list[int]:
  """Batch buckets covering n rows with least (padded rows + call_cost per call); largest first."""
  bbs = sorted(int(b) for b in batch_buckets)
  full, rest = divmod(n, bbs[-1])  # the largest bucket has the least cost per row
  cost, pick = [0] * (rest + 1), [0] * (rest + 1)
  for r in range(1, rest + 1):
    cost[r], pick[r] = min((bb + call_cost + cost[max(r - bb, 0)], bb) for bb in bbs)
  out, r = [bbs[-1]] * full, rest
  while r > 0:
    out.append(pick[r])
    r = max(r - pick[r], 0)
  return sorted(out, reverse=True)


def as_rows(inputs) -> list[tuple[np.ndarray, np.ndarray]]:
  """(ids, type_ids) per request from data.Encoded, a batch dict, or a sequence of rows."""
  if hasattr(inputs, 'ids') and hasattr(inputs, 'type_ids'):  # data.Encoded
    return [(np.asarray(i), np.asarray(t)) for i, t in zip(inputs.ids, inputs.type_ids)]
  if isinstance(inputs, dict):
    ids = np.asarray(inputs['input_ids'])
    types = np.asarray(inputs.get('token_type_ids', np.zeros_like(ids)))
    mask = np.asarray(inputs.get('attention_mask', np.ones_like(ids))).astype(bool)
    if (np.diff(mask.astype(np.int8), axis=1) > 0).any():
      raise ValueError('attention_mask rows must be a prefix of ones (right padding)')
    return [(ids[i, :n], types[i, :n]) for i, n in enumerate(mask.sum(1))]
  rows = []
  for r in inputs:
    ids, types = (r, None) if not isinstance(r, tuple) and np.ndim(r) == 1 else r
    ids = np.asarray(ids)
    rows.append((ids, np.zeros_like(ids) if types is None else np.asarray(types)))
  return rows


class Prepared(NamedTuple):
  """Engine params (stacked, on the device) that several engines of one model share."""

  tree: dict


def prepare(cfg: model_lib.ModelConfig, params) -> Prepared:
  """Model params (host or device) -> engine params on the default device, copied there once."""
  return Prepared(stack_params(cfg, distributed.on_device(params)))


def _int32(x):
  """x as an int32 device array; host values are copied explicitly (one transfer)."""
  if isinstance(x, jax.Array):
    return x if x.dtype == jnp.int32 else x.astype(jnp.int32)
  return jax.device_put(np.asarray(x, np.int32))


class Engine:
  """Compiled pruned early-exit classifier; one AOT-compiled program per (batch, length) bucket.

  Params are a runtime argument of every program (not baked in), so `set_params` (e.g. new
  thresholds) and `tau` never recompile; only a new (batch, length) shape does.
  """

  def __init__(self, cfg: model_lib.ModelConfig, params, *, prune: bool = True,
               exits: bool = True, tau: float = 0.0,
               length_buckets: Sequence[int] | None = None,
               batch_buckets: Sequence[int] | None = None, cache_dir: str | None = None,
               compiler_options: dict | None = None, chunk_tokens: int | None = None):
    # Passed to XLA, e.g. {'xla_backend_optimization_level': 0}: half the compile time, slower.
    self.compiler_options = dict(compiler_options or {})
    self.cfg, self.prune, self.exits, self.tau = cfg, bool(prune), bool(exits), float(tau)
    # Unset shapes take this platform's serving defaults (mp_jax/serving.py), as configs do.
    shapes = serving.resolve(dict(length_buckets=length_buckets, batch_buckets=batch_buckets,
                                  chunk_tokens=chunk_tokens))
    self.length_buckets = tuple(sorted({int(x) for x in shapes.length_buckets}))
    self.batch_buckets = tuple(sorted({int(x) for x in shapes.batch_buckets}))
    if self.length_buckets[-1] > cfg.max_position_embeddings:
      raise ValueError(f'length bucket {self.length_buckets[-1]} > max_position_embeddings '
                       f'{cfg.max_position_embeddings}')
    # With pruning the first layer's switch already runs at the real lengths' bucket, so inputs
    # need only a few shapes (each program compiles every working-length branch below its own).
    self.input_buckets = spaced(self.length_buckets) if self.prune else self.length_buckets
    if cache_dir is not None:
      set_cache_dir(cache_dir)
    self.chunk_tokens = shapes.chunk_tokens
    self.forward = chunked(self._make_forward(), self.chunk_tokens)
    self._jitted = jax.jit(self._counted)
    self.programs: dict[tuple[int, int], jax.stages.Compiled] = {}
    self.compile_seconds: dict[tuple[int, int], float] = {}
    self.num_traces = 0
    self.set_params(params)

  def _make_forward(self):
    return make_forward(self.cfg, prune=self.prune, exits=self.exits,
                        batch_buckets=self.batch_buckets, length_buckets=self.length_buckets)

  def _prepare(self, params):
    return prepare(self.cfg, params).tree

  def _counted(self, *args):
    self.num_traces += 1  # runs at trace time only
    return self.forward(*args)

  def set_params(self, params) -> None:
    """Replaces the params (same structure and shapes: compiled programs stay valid).

    `params`: a model parameter tree (copied to the device once), or a `Prepared` one, which
    is used as it is (several engines then share one device copy).
    """
    self.params = params.tree if isinstance(params, Prepared) else self._prepare(params)

  @property
  def num_compiles(self) -> int:
    return len(self.compile_seconds)

  def program(self, batch: int, length: int) -> jax.stages.Compiled:
    """The compiled program for a (batch, length) input; compiled on first use."""
    key = (int(batch), int(length))
    if key not in self.programs:
      start = time.perf_counter()
      specs = (jax.ShapeDtypeStruct(key, jnp.int32),) * 3
      lowered = self._jitted.lower(self.params, *specs, jax.ShapeDtypeStruct((), jnp.float32))
      self.programs[key] = lowered.compile(compiler_options=self.compiler_options or None)
      self.compile_seconds[key] = time.perf_counter() - start
    return self.programs[key]

  def warmup(self, batch_buckets=None, length_buckets=None) -> dict[tuple[int, int], float]:
    """Compiles every (batch, length) program; returns compile seconds per program."""
    for b in batch_buckets or self.batch_buckets:
      for t in length_buckets or self.input_buckets:
        self.program(b, t)
    return dict(self.compile_seconds)

  def run(self, ids_BxT, types_BxT, mask_BxT, tau: float | None = None) -> dict:
    """One padded batch of any (B, T) (its own program); returns device arrays (async).

    Inputs go to the device with explicit copies; the params are already there.
    """
    ids_BxT, types_BxT, mask_BxT = _int32(ids_BxT), _int32(types_BxT), _int32(mask_BxT)
    tau = jax.device_put(np.float32(self.tau if tau is None else tau))
    return self.program(*ids_BxT.shape)(self.params, ids_BxT, types_BxT, mask_BxT, tau)

  def predict(self, inputs, tau: float | None = None) -> dict[str, np.ndarray]:
    """Sorts requests by length, batches them into buckets, runs, returns numpy in input order."""
    rows = as_rows(inputs)
    n, n_layers = len(rows), self.cfg.num_layers
    lengths = np.asarray([len(r[0]) for r in rows], np.int64)
    if n and lengths.max() > self.length_buckets[-1]:
      raise ValueError(f'a request has {lengths.max()} tokens > largest length bucket '
                       f'{self.length_buckets[-1]}')
    if n and lengths.min() < 1:
      raise ValueError('empty request (0 tokens)')
    # Out-of-range ids would read NaN embeddings (jnp.take fills) and still yield a label.
    evaluate.check_token_ids([r[0] for r in rows], self.cfg.vocab_size, 'Engine.predict')
    bucket_N = np.asarray(self.input_buckets)[
        np.searchsorted(self.input_buckets, lengths, side='left')] if n else lengths
    order = np.argsort(-lengths, kind='stable')
    pending = []
    for t in sorted(set(bucket_N.tolist()), reverse=True):
      idx = order[bucket_N[order] == t]
      start = 0
      for b in plan_batches(len(idx), self.batch_buckets):
        chunk = idx[start:start + b]
        start += b
        ids, types, mask = (np.zeros((b, t), np.int32) for _ in range(3))
        for i, r in enumerate(chunk):
          ids[i, :lengths[r]], types[i, :lengths[r]] = rows[r]
          mask[i, :lengths[r]] = 1
        pending.append((chunk, self.run(ids, types, mask, tau)))  # dispatch all, then wait
    c = self.cfg.num_labels
    shapes = {'labels': (), 'logits': (c,), 'probs': (c,), 'exit_layer': (),
              'n_attn': (n_layers,), 'n_ffn': (n_layers,)}
    dtypes = {'logits': np.float32, 'probs': np.float32}
    out = {k: np.zeros((n, *s), dtypes.get(k, np.int32)) for k, s in shapes.items()}
    for chunk, res in pending:
      for k in OUTPUTS:
        out[k][chunk] = np.asarray(res[k])[:len(chunk)]
    evaluate.check_finite(out['logits'], 'Engine.predict')
    return out


class DenseEngine(Engine):
  """Dense compiled baseline: same params and predict API, no pruning, no exits, full shapes."""

  def __init__(self, cfg: model_lib.ModelConfig, params, **kw):
    kw.update(prune=False, exits=False)
    super().__init__(cfg, params, **kw)

  def _make_forward(self):
    return make_dense_forward(self.cfg)

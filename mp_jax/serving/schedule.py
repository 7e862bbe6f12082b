"""Layer-major schedule (SPEC §6): a whole request set advances one layer at a time.

The fused programs (programs.make_forward) keep a batch together through every layer, so rows
that exit leave the working batch only at the batch buckets (1, 8, 32) and pruned rows pad to
the longest kept row of their batch. Here the requests of a `predict` call (in waves of
`wave_rows`) keep their hidden states in one device buffer H (rows x T x D), and each layer
runs over the still-active rows regrouped: sorted by current token count, cut into groups, each
group one call of a small compiled program at (batch bucket, length bucket) that gathers its rows
from H, runs the layer and scatters them back (H donated, so in place). The cut pads least for
its calls (grouping.groups). A group holds up to the largest batch bucket of rows, or more where
rows are short: up to `token_budget` tokens (the engine's chunk_tokens, 1024 on CPU; at most that
bucket of the longest rows) in doublings of that bucket, so the few tokens pruning leaves in deep
layers still make large matmuls (at 8 tokens a dense MiniLM forward cost 84 us a token at 32 rows
against 72 us at 128; docs/RESULTS.md, session 20). With pruning, the FFN after a group's
attention runs over its kept tokens only, packed into one matrix (grouping.pack_grid), its rows
written to their compacted places in H (a pruned token's place keeps what it held, dead). An
exited row's slot is filled by the next active row at once; the only padding left is within
groups, where another call would cost more. The host reads the kept counts and exit decisions
after each layer (one wait a layer): a schedule for throughput over many requests, where the
fused program suits a single one.

Per row the arithmetic is the fused engine's and the reference's (the same bert.Layer methods,
importance, hard keep, compaction, exit head and rule), so answers are the same (SPEC §6).
Row H[n] is scratch: padding slots of a group gather it (and without pruning scatter it back); a
layer program counts its tokens dead, so padding slots keep no tokens and add nothing to a
packed FFN.
"""

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mp_jax.model import bert
from mp_jax.model import config as model_config
from mp_jax.model import exits as exits_lib
from mp_jax.model import pruning as pruning_lib
from mp_jax.serving import grouping, programs


def make_steps(cfg: model_config.ModelConfig, *, prune: bool, exits: bool,
               attention_bytes: int = grouping.ATTENTION_BYTES,
               attention_tokens: int = grouping.ATTENTION_TOKENS, ffn_tokens: int = 0):
  """{kind: fn} of the schedule's programs (embed, layer) over the row buffer H.

  Each takes the params it reads, then the buffers and idx_b (the group's rows of H), and
  returns the buffers updated at rows idx_b (callers donate them); `nt` (static) is the group's
  length bucket. With pruning the attention and score run in row chunks
  (grouping.attention_rows), without it the attention in chunks of at most `attention_tokens`
  tokens (whole rows, one at least; 0: whole); the FFN in chunks of about `ffn_tokens` tokens
  (0: whole): of the packed kept tokens (grouping.ffn_rows), or of whole rows (at least one)
  without pruning. The layer's weights p_l (its exit head's pe_l) are picked on the host from
  sp['per_layer']: indexed by a traced layer inside, they would be copied out of the stacked
  ones at every call. The params a step does not read are not passed: each argument costs time
  at every call.
  """
  n_layers, n_labels = cfg.num_layers, cfg.num_labels
  exits = exits and n_layers > 1

  def embed(p_emb, h_NxTxD, alive_NxT, idx_b, ids_bxt, types_bxt, mask_bxt):
    """Embeddings of a group's requests (at their input bucket) into their whole rows of H."""
    pad = ((0, 0), (0, h_NxTxD.shape[1] - ids_bxt.shape[1]))
    x_bxtxD = bert.Embeddings(cfg).apply({'params': p_emb}, ids_bxt, types_bxt)
    # The whole row, tail zeroed: a later group may read it at a longer bucket than its own
    # (rows regroup by count), and the buffer still holds earlier requests there.
    return (h_NxTxD.at[idx_b].set(jnp.pad(x_bxtxD.astype(h_NxTxD.dtype), (*pad, (0, 0)))),
            alive_NxT.at[idx_b].set(jnp.pad(mask_bxt.astype(bool), pad)))

  def packed_ffn(p_l, y_bxtxD, keep_bxt, h_NxTxD, idx_b):
    """The FFN over the group's kept tokens only, packed into one [m, D] matrix (m: the first
    of grouping.pack_grid holding them; run in chunks of its rows), its rows written straight
    into H at the kept tokens' compacted places (row idx_b[r], place: the token's rank among
    its row's kept ones); returns (H, kept counts). The FFN is per token, so each kept token
    gets the output it would get in place. H's other places keep what they held: dead tokens,
    never read unmasked."""
    b, t, d = y_bxtxD.shape
    n_rows, width = h_NxTxD.shape[:2]
    c, hw = b * t, n_rows * width
    grid = grouping.pack_grid(c)
    kept_b = keep_bxt.sum(1, dtype=jnp.int32)
    # Kept tokens' flat places in row order (the k-th of them: row r_k, rank k - start[r_k]);
    # past them the fill c, read as zeros and written nowhere (distinct places past H's end).
    pos_c = jnp.flatnonzero(keep_bxt.reshape(c), size=c, fill_value=c)
    r_c = jnp.minimum(pos_c // t, b - 1)
    k_c = jnp.arange(c, dtype=jnp.int32)
    start_b = jnp.cumsum(kept_b) - kept_b
    dst_c = jnp.where(pos_c < c, idx_b[r_c] * width + k_c - start_b[r_c], hw + k_c)

    def at(m):
      def run(y_CxD):
        x_mxD = y_CxD.at[pos_c[:m]].get(mode='fill', fill_value=0)
        ffn = lambda x_kxD: programs._layer(cfg, p_l, x_kxD[None], method=bert.Layer.ffn)[0]
        f_mxD = programs.map_rows(ffn, (x_mxD,), grouping.ffn_rows(m, ffn_tokens))
        return jnp.pad(f_mxD, ((0, c - m), (0, 0)))
      return run

    # The scatter into H stays outside the switch: inside a branch XLA:CPU copies its operand.
    f_CxD = lax.switch(programs._bucket_index(kept_b.sum(), grid), [at(m) for m in grid],
                       y_bxtxD.reshape(c, d))
    h_HWxD = h_NxTxD.reshape(hw, d).at[dst_c].set(f_CxD, mode='drop', unique_indices=True)
    return h_HWxD.reshape(n_rows, width, d), kept_b

  def layer(p_top, p_l, pe_l, theta, l, tau, h_NxTxD, alive_NxT, idx_b, *, nt):
    """A layer of a group: attention, score and hard keep, the FFN (with pruning: over the kept
    tokens, packed, written to H compacted), then the exit head and rule (the teacher at layer
    L: p_top, the pooler's and the classifier's params) over the group as H now holds it;
    returns (H, alive, kept counts, logits, done)."""
    x_bxtxD = h_NxTxD[idx_b, :nt]
    # Padding slots (the scratch row, the last) are dead whatever the buffer holds there.
    a_bxt = alive_NxT[idx_b, :nt] & (idx_b < h_NxTxD.shape[0] - 1)[:, None]
    def attend(x_rxtxD, a_rxt):  # without pruning nothing reads e, z: XLA fuses it
      y_rxtxD, e_rxHxtxt, z_rxHxtx1 = programs._layer(cfg, p_l, x_rxtxD, a_rxt,
                                                      method=bert.Layer.attend)
      return y_rxtxD, (pruning_lib.importance(e_rxHxtxt, z_rxHxtx1, a_rxt, cfg.max_seq_length)
                       if prune else None)
    r = (grouping.attention_rows(idx_b.shape[0], nt, cfg.num_heads, attention_bytes) if prune
         else programs.chunk_rows(idx_b.shape[0], nt, attention_tokens))
    y_bxtxD, score_bxt = programs.map_rows(attend, (x_bxtxD, a_bxt), r)
    if prune:
      keep_bxt = pruning_lib.hard_keep(score_bxt, theta, a_bxt)
      h_NxTxD, kept_b = packed_ffn(p_l, y_bxtxD, keep_bxt, h_NxTxD, idx_b)
      keep_bxt = jnp.arange(nt)[None, :] < kept_b[:, None]  # compacted: a prefix of each row
    else:
      keep_bxt, kept_b = a_bxt, a_bxt.sum(1, dtype=jnp.int32)
      ffn = lambda y_rxtxD: programs._layer(cfg, p_l, y_rxtxD, method=bert.Layer.ffn)
      y_bxtxD = programs.map_rows(ffn, (y_bxtxD,),
                                  programs.chunk_rows(idx_b.shape[0], nt, ffn_tokens))
      h_NxTxD = h_NxTxD.at[idx_b, :nt].set(y_bxtxD)
    alive_NxT = alive_NxT.at[idx_b, :nt].set(keep_bxt)
    last = l == n_layers - 1
    # With pruning the heads read the group back from H, inside their branch (a layer without a
    # head reads nothing); without, the layer's output as it is.
    src, rows = (h_NxTxD, lambda h: h[idx_b, :nt]) if prune else (y_bxtxD, lambda y: y)
    teacher = lambda h, k: programs._teacher(cfg, p_top, rows(h))
    none = lambda h, k: jnp.zeros((idx_b.shape[0], n_labels), jnp.float32)
    if exits:
      head = lambda h, k: programs._head(cfg, pe_l, rows(h), k)
      # tau <= 0 never exits (exits.should_exit): the head is skipped, as in the FLOPs count
      # (a head the exit plan drops has tau 0 at its layer).
      logits_bxC = lax.switch(jnp.where(last, 0, jnp.where(tau <= 0, 1, 2)),
                              (teacher, none, head), src, keep_bxt)
      done_b = last | exits_lib.should_exit(exits_lib.uncertainty(logits_bxC), tau)
    else:
      logits_bxC = lax.cond(last, teacher, none, src, keep_bxt)
      done_b = jnp.broadcast_to(last, idx_b.shape)
    return h_NxTxD, alive_NxT, kept_b, logits_bxC, done_b

  return {'embed': embed, 'layer': layer}


def _exit_of(sp, l):
  """Layer l's exit head params ({} without heads; the last layer's is unused: layer L-1's)."""
  return sp['per_exit'][min(l, len(sp['per_exit']) - 1)] if sp['per_exit'] else {}


def _top(sp):
  """The teacher's params (pooler, classifier)."""
  return {'pooler': sp['pooler'], 'classifier': sp['classifier']}


WAVE_BYTES = 1 << 27
KINDS = ('embed', 'layer')


class Schedule:
  """Runs request sets layer-major with an Engine's params and shapes (module docstring).

  H holds `wave_rows` requests (+ the scratch row) at the largest length bucket; every program
  is compiled once per (kind, batch bucket, length bucket), whatever the request set.
  """

  def __init__(self, cfg: model_config.ModelConfig, *, prune: bool, exits: bool,
               length_buckets: Sequence[int], batch_buckets: Sequence[int],
               compiler_options: dict | None = None, wave_rows: int = 0,
               token_budget: int = 0, attention_bytes: int = grouping.ATTENTION_BYTES,
               attention_tokens: int = grouping.ATTENTION_TOKENS,
               ffn_tokens: int | None = None):
    self.cfg = cfg
    self.lbs = tuple(sorted(int(b) for b in length_buckets))
    # Groups of short rows hold up to token_budget tokens (at least the largest batch bucket of
    # rows): pruned deep layers then run matmuls as large as the first layers' (module docstring).
    # Never more tokens than that bucket of the longest rows holds, so a small batch size still
    # bounds what a call computes.
    self.min_rows = max(int(b) for b in batch_buckets)
    self.token_budget = min(int(token_budget), self.min_rows * self.lbs[-1])
    self.bbs = grouping.group_buckets(batch_buckets, self.lbs, self.token_budget)
    self.width = self.lbs[-1]
    # FFN chunks of token_budget tokens (None) keep its activations in cache: FastBERT on bbc
    # 1.09x faster, mp 1.01x, LTP 1.005x, mr unchanged (docs/RESULTS.md, session 27).
    ffn_tokens = self.token_budget if ffn_tokens is None else int(ffn_tokens)
    # A wave fills H, allocated once (128 MiB unless that holds less than a batch) and reused:
    # every row a wave reads was written whole by its embed step.
    row_bytes = self.width * cfg.hidden_size * jnp.dtype(cfg.compute_dtype).itemsize
    self.wave_rows = int(wave_rows) or max(self.min_rows, WAVE_BYTES // row_bytes)
    self._buffers = None
    self.steps = make_steps(cfg, prune=prune, exits=exits, attention_bytes=attention_bytes,
                            attention_tokens=attention_tokens, ffn_tokens=ffn_tokens)
    self.compiler_options = dict(compiler_options or {})
    self.programs: dict[tuple, jax.stages.Compiled] = {}
    self.compile_seconds: dict[tuple, float] = {}
    # When a list: each wave's layers append (layer, wall seconds from the previous layer's last
    # wait to its own; layer 0's from the wave's start, embeddings included). The host waits for
    # every layer anyway, so timing one costs nothing (experiments/profile_schedule.py).
    self.log: list[tuple[int, float]] | None = None

  def _buffers_spec(self):
    n, t, d = self.wave_rows + 1, self.width, self.cfg.hidden_size
    return (jax.ShapeDtypeStruct((n, t, d), self.cfg.compute_dtype),
            jax.ShapeDtypeStruct((n, t), jnp.bool_))

  def jitted(self, sp, kind: str, nb: int, nt: int):
    """(jitted `kind` program of a (batch bucket, length bucket) group, its abstract args)."""
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    f32 = jax.ShapeDtypeStruct((), jnp.float32)
    sp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), sp)
    p_l, pe_l = sp['per_layer'][0], _exit_of(sp, 0)  # every layer's (and head's) shapes agree
    h, a = self._buffers_spec()
    if kind == 'embed':
      fn, donate = self.steps['embed'], (1, 2)
      args = (sp['embeddings'], h, a, i32(nb), *[i32(nb, nt)] * 3)
    else:
      fn, donate = functools.partial(self.steps['layer'], nt=nt), (6, 7)
      args = (_top(sp), p_l, pe_l, f32, i32(), f32, h, a, i32(nb))
    return jax.jit(fn, donate_argnums=donate), args

  def program(self, sp, kind: str, nb: int, nt: int) -> jax.stages.Compiled:
    """The compiled `kind` program of a (batch bucket, length bucket) group."""
    key = (kind, int(nb), int(nt))
    if key not in self.programs:
      start = time.perf_counter()
      fn, args = self.jitted(sp, kind, nb, nt)
      self.programs[key] = fn.lower(*args).compile(
          compiler_options=self.compiler_options or None)
      self.compile_seconds[key] = time.perf_counter() - start
    return self.programs[key]

  def group_rows(self, nt: int) -> int:
    """The most rows of a group at length bucket nt (grouping.group_rows)."""
    return grouping.group_rows(nt, batch_buckets=self.bbs, min_rows=self.min_rows,
                               token_budget=self.token_budget)

  def keys(self) -> list[tuple[str, int, int]]:
    """(kind, batch bucket, length bucket) of every program a request set can use."""
    return [(k, nb, nt) for nt in self.lbs for nb in self.bbs if nb <= self.group_rows(nt)
            for k in KINDS]

  def warmup(self, sp) -> None:
    """Compiles every program of `keys()`, and allocates H (its fill is a program too)."""
    for key in self.keys():
      self.program(sp, *key)
    if self._buffers is None:
      self._buffers = self._new_buffers()

  def _new_buffers(self):
    return tuple(jnp.zeros(x.shape, x.dtype) for x in self._buffers_spec())

  def groups(self, rows, count_N):
    """The calls of a layer over `rows` by their counts (grouping.groups)."""
    return grouping.groups(rows, count_N, length_buckets=self.lbs, batch_buckets=self.bbs,
                           min_rows=self.min_rows, token_budget=self.token_budget)

  def predict(self, sp, rows, halt_L) -> dict[str, np.ndarray]:
    """programs.OUTPUTS (numpy, input order) for rows [(ids, types)] of at most the largest
    length bucket, in waves of `wave_rows` requests (longest first); halt_L: the per-layer halt
    values (exit_plan.halts)."""
    n = len(rows)
    lengths = np.asarray([len(r[0]) for r in rows], np.int64)
    c, n_layers = self.cfg.num_labels, self.cfg.num_layers
    out = {'logits': np.zeros((n, c), np.float32), 'exit_layer': np.zeros(n, np.int32),
           'n_attn': np.zeros((n, n_layers), np.int32), 'n_ffn': np.zeros((n, n_layers), np.int32)}
    order = np.argsort(-lengths, kind='stable')
    # The per-layer scalars go to the device once per call.
    halt_L, theta_L = ([jax.device_put(np.float32(x)) for x in np.asarray(v)]
                       for v in (halt_L, sp['thresholds']))
    for start in range(0, n, self.wave_rows):
      wave = order[start:start + self.wave_rows]
      self._wave(sp, [rows[i] for i in wave], lengths[wave], halt_L, theta_L, out, wave)
    out['labels'] = out['logits'].argmax(-1).astype(np.int32)
    z = np.exp(out['logits'] - out['logits'].max(-1, keepdims=True))
    out['probs'] = (z / z.sum(-1, keepdims=True)).astype(np.float32)
    return out

  def _wave(self, sp, rows, lengths, halt_L, theta_L, out, where):
    n, cfg = len(rows), self.cfg
    if self._buffers is None:
      self._buffers = self._new_buffers()
    h, alive = self._buffers
    self._buffers = None  # donated below; a call that fails midway allocates afresh
    scratch = self.wave_rows
    start = time.perf_counter()
    pad = lambda g, nb: jax.device_put(
        np.concatenate([g, np.full(nb - len(g), scratch)]).astype(np.int32))
    for g, nb, nt in self.groups(np.arange(n), lengths):
      ids, types, mask = (np.zeros((nb, nt), np.int32) for _ in range(3))
      for j, r in enumerate(g):
        ids[j, :lengths[r]], types[j, :lengths[r]] = rows[r]
        mask[j, :lengths[r]] = 1
      h, alive = self.program(sp, 'embed', nb, nt)(sp['embeddings'], h, alive, pad(g, nb),
                                                   *jax.device_put((ids, types, mask)))
    active, count, top = np.arange(n), lengths.copy(), _top(sp)
    for l in range(cfg.num_layers):
      li, p_l, pe_l = jax.device_put(np.int32(l)), sp['per_layer'][l], _exit_of(sp, l)
      out['n_attn'][where[active], l] = count[active]
      calls = []
      for g, nb, nt in self.groups(active, count):
        h, alive, kept, logits, done = self.program(sp, 'layer', nb, nt)(
            top, p_l, pe_l, theta_L[l], li, halt_L[l], h, alive, pad(g, nb))
        calls.append((g, kept, logits, done))
      left = []
      for g, kept, logits, done in calls:  # all dispatched; now wait
        count[g] = np.asarray(kept)[:len(g)]
        d_b = np.asarray(done)[:len(g)]
        out['exit_layer'][where[g[d_b]]] = l + 1
        out['logits'][where[g[d_b]]] = np.asarray(logits)[:len(g)][d_b]
        left.append(g[~d_b])
      out['n_ffn'][where[active], l] = count[active]
      if self.log is not None:
        start, was = time.perf_counter(), start
        self.log.append((l, start - was))
      active = np.concatenate(left)
      if not len(active):
        break
    self._buffers = (h, alive)

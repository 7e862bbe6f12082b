"""The multiply-accumulates an engine's programs really run: whole padded shapes (SPEC §5, §6).

flops.example_macs counts each request's real tokens; a compiled program computes whole
(batch bucket, length bucket) shapes. Given a request set's per-layer kept counts and exit
layers (the reference run's, which the engine reproduces exactly), `engine_macs` follows
`Engine.route` and each program's shape rule, with attn(n) = model_layer_macs(cfg, n, 0),
ffn(n) = model_layer_macs(cfg, 0, n) and head(n) = exit_head_macs(.., n, ..) per row:
  dense program (b, t)       b * L * (attn(t) + ffn(t))
  one-row form (programs.unrolls(b, t)), per layer l that a row of it runs:
                             b * (attn(t) + ffn(t) + head(t) where the head runs)
  fused program (b, t), per row chunk of r rows (programs.chunk_rows), per layer l that a row
    of the chunk runs:       nb * (attn(nt_a) + ffn(nt_f) + head(nt_f) where the head runs)
    nb   smallest batch bucket <= r holding the chunk's rows still active (exits; else r)
    nt_a smallest length bucket <= t holding the longest of them entering l (pruning; else t)
    nt_f the same for their kept counts after l's pruning
  layer-major schedule, per layer: grouping.groups of the active rows by n_attn, each group
    nb * (attn(nt) + head(nt) where the head runs) + ffn: nb * ffn(nt) or, with pruning,
    ffn(m) (packed): m the first of grouping.pack_grid(nb * nt) holding the group's n_ffn.
A head runs after layer l < L at halt_L[l] > 0; it is counted as FastBERT computes it (SPEC §5),
more than exits.ExitHead's folded form runs. A factorised embedding's projection adds r * d per
padded input token. shape_speedup = the dense engine's padded MACs / the engine's:
the speedup its shapes allow if every MAC cost the same; a measured speedup over
shape_speedup is what its programs make of their MACs against the dense program's.
"""

import numpy as np

from mp_jax.data import batching
from mp_jax.model import flops
from mp_jax.serving import grouping, programs


def _parts(cfg):
  d, w, c = cfg.hidden_size, cfg.exit_width, cfg.num_labels
  return (lambda n: float(flops.model_layer_macs(cfg, n, 0)),
          lambda n: float(flops.model_layer_macs(cfg, 0, n)),
          lambda n: float(flops.exit_head_macs(d, w, n, c)),
          lambda n: float(flops.embedding_macs(d, cfg.embedding_rank, n)))


def _fused(eng, idx, b, t, n_attn_NxL, n_ffn_NxL, exit_N, heads_L):
  """MACs of one fused program call of (b, t) over requests `idx` (padding rows after them)."""
  cfg = eng.cfg
  attn, ffn, head, embed = _parts(cfg)
  if not (eng.prune or eng.exits):  # the dense program: every row, every layer, full shape
    return b * (cfg.num_layers * (attn(t) + ffn(t)) + embed(t))
  exits = eng.exits and cfg.num_layers > 1
  if programs.unrolls(b, t, eng.chunk_tokens):  # every layer a row runs, at the input's shape
    layers = int(exit_N[idx].max()) if len(idx) else 0
    return b * (embed(t) + layers * (attn(t) + ffn(t))
                + sum(head(t) for l in range(min(layers, cfg.num_layers - 1))
                      if exits and heads_L[l]))
  r = programs.chunk_rows(b, t, eng.chunk_tokens)
  rows = np.concatenate([idx, np.full(b - len(idx), -1)]).astype(np.int64)
  total = b * embed(t)
  for chunk in rows.reshape(b // r, r):
    real = chunk[chunk >= 0]
    bbs = batching.upto(eng.batch_buckets, r) if exits else (r,)
    lbs = batching.upto(eng.length_buckets, t) if eng.prune else (t,)
    for l in range(cfg.num_layers):
      act = real[exit_N[real] > l]
      if not len(act):  # the layer loop stops when no row is active
        break
      nb = batching.bucket_length(len(act), bbs)
      nt_f = batching.bucket_length(int(n_ffn_NxL[act, l].max()), lbs)
      total += nb * (attn(batching.bucket_length(int(n_attn_NxL[act, l].max()), lbs))
                     + ffn(nt_f) + (head(nt_f) if exits and heads_L[l] else 0.0))
  return total


def _layer_major(eng, idx, n_attn_NxL, n_ffn_NxL, exit_N, heads_L) -> np.ndarray:
  """MACs of the schedule over requests `idx` (in waves of wave_rows, longest first), per layer
  (L,): the embeddings count in layer 0's, as Schedule.log times them."""
  s, cfg = eng.schedule, eng.cfg
  attn, ffn, head, embed = _parts(cfg)
  lengths_N = n_attn_NxL[:, 0]
  idx = idx[np.argsort(-lengths_N[idx], kind='stable')]
  total_L = np.zeros(cfg.num_layers)
  for start in range(0, len(idx), s.wave_rows):
    active = idx[start:start + s.wave_rows]
    total_L[0] += sum(nb * embed(nt) for _, nb, nt in s.groups(active, lengths_N))
    for l in range(cfg.num_layers):
      active = active[exit_N[active] > l]
      if not len(active):
        break
      calls = s.groups(active, n_attn_NxL[:, l])
      for g, nb, nt in calls:
        total_L[l] += nb * (attn(nt) + (head(nt) if heads_L[l] else 0.0))
        if eng.prune:
          total_L[l] += ffn(batching.bucket_length(int(n_ffn_NxL[g, l].sum()),
                                                   grouping.pack_grid(nb * nt)))
        else:
          total_L[l] += nb * ffn(nt)
      # The next layer sorts the rows as the schedule does: rows of equal counts keep this
      # layer's group order, and which rows share a group sets its packed FFN's size.
      active = np.concatenate([g for g, _, _ in calls])
  return total_L


def _routed(eng, n_attn_NxL, n_ffn_NxL, exit_N, halt_L):
  """(eng.route of the rows, (n_attn, n_ffn, exit_N, heads_L) as arrays), or a ValueError
  naming what is off."""
  n_attn_NxL = np.asarray(n_attn_NxL, np.int64)
  n_ffn_NxL = np.asarray(n_ffn_NxL, np.int64)
  n, n_layers = n_attn_NxL.shape
  if (n_ffn_NxL.shape != (n, n_layers) or n_layers != eng.cfg.num_layers
      or (halt_L is not None and np.shape(halt_L) != (n_layers,))):
    raise ValueError(f'counts {n_attn_NxL.shape} and {n_ffn_NxL.shape}, halt values '
                     f'{np.shape(halt_L)} for a {eng.cfg.num_layers}-layer model')
  exit_N = np.full(n, n_layers) if exit_N is None else np.asarray(exit_N, np.int64)
  halt_L = eng.halts() if halt_L is None else np.asarray(halt_L, np.float32)
  heads_L = np.zeros(n_layers, bool)
  heads_L[:-1] = halt_L[:-1] > 0
  # A wrong exit layer would silently drop layers from the count.
  if exit_N.shape != (n,) or np.any((exit_N < 1) | (exit_N > n_layers)):
    raise ValueError(f'exit layers must be ({n},) in 1..{n_layers}')
  early = exit_N[exit_N < n_layers]
  if len(early) and not (eng.exits and heads_L[early - 1].all()):
    raise ValueError('an exit before the last layer where no exit head runs')
  return (eng.route(n_attn_NxL[:, 0], halt_L), (n_attn_NxL, n_ffn_NxL, exit_N, heads_L))


def engine_macs(eng, n_attn_NxL, n_ffn_NxL, exit_N=None, halt_L=None) -> float:
  """MACs an Engine computes for rows of these (N, L) counts, exit layers and halt values.

  n_attn enters attention (n_attn[:, 0] is the length), n_ffn is left after pruning; exit_N is
  1-based (None: L); halt_L None: the engine's own tau.
  """
  route, counts = _routed(eng, n_attn_NxL, n_ffn_NxL, exit_N, halt_L)
  total = sum(_fused(route.engine, idx, b, t, *counts) for idx, b, t in route.calls)
  if len(route.layer_major):
    total += _layer_major(route.engine, route.layer_major, *counts).sum()
  return float(total)


def layer_major_macs(eng, n_attn_NxL, n_ffn_NxL, exit_N=None, halt_L=None) -> np.ndarray:
  """Per layer (L,), the MACs of the requests `Engine.route` sends layer-major (as engine_macs;
  the embeddings in layer 0's): what Schedule.log's per-layer times are spent on."""
  route, counts = _routed(eng, n_attn_NxL, n_ffn_NxL, exit_N, halt_L)
  if not len(route.layer_major):
    return np.zeros(eng.cfg.num_layers)
  return _layer_major(route.engine, route.layer_major, *counts)

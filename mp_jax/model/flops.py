"""Per-example FLOPs from kept-token counts and exit layers (SPEC §5).

Counts are multiply-accumulates (MACs) of the matrix products only: embeddings, biases,
LayerNorms, activations and softmaxes are not counted. FLOPs = 2 * MACs; GFLOPs = FLOPs / 1e9.
All counts are per example and use real tokens only (padding never counts).

Encoder layer (hidden d, attention width a = heads * head size, FFN width d_ff), n_a tokens
entering attention and n_f tokens left after the layer's pruning (the FFN runs on those only):
  query, key and value projections d -> a      3 * d * a * n_a
  output projection a -> d                     a * d * n_a
  scores Q K^T and the weighted sum A V        2 * a * n_a^2
  FFN expansion and contraction                2 * d * d_ff * n_f
BERT has a = d (4 * d^2 * n_a + 2 * d * n_a^2 + ...); a width-pruned layer has fewer heads
(a < d) and fewer FFN neurons. A factorised word embedding (rank r) adds its projection,
r * d * n MACs at the real length n: it saves parameters (V*d -> V*r + r*d), not compute.

Exit head (`exits.ExitHead`, width w, C labels) after a layer that left n tokens; it computes
  down-projection d -> w on every token        d * w * n
  key and value projections w -> w             2 * w^2 * n
  query w -> w for the [CLS] row only          w^2
  [CLS] scores and weighted sum (all heads)    2 * w * n
  out projection, dense w -> w on [CLS]        2 * w^2
  logits w -> C                                w * C
  total = d*w*n + 2*w^2*n + 2*w*n + 3*w^2 + w*C.
That is the head as FastBERT computes it, the count the peers report. ExitHead computes the same
function with the key and value projections off the tokens (d*w + 2*H*w MACs a token for the
attention's d*w + 2*w^2 + 2*w); the saving is not credited here. The engine's float32 form
(exits.merge) multiplies out query.key and value.out: the same MACs at 2 heads.

An example that exits at layer e (1-based) ran layers 1..e and the exit heads after layers
1..min(e, L-1) that run at its tau (all of them, or the exit plan's: mp_jax.model.exit_plan):
the heads before e were evaluated and did not exit, the head at e answered (at e = L the main
classifier answered). The pooler and main classifier (2 small matrices on
[CLS]) are not counted, neither in the actual nor in the dense count.

The dense baseline is the **unpruned** model (`cfg.unpruned()`: all layers and heads, the full
FFN, no factorisation) at the full real length, no exit heads: a width-pruned model's
speedup is counted against the model it was cut from, never against its own slim dense cost.
"""

import numpy as np


def layer_macs(d, d_ff, n_a, n_f, a=None):
  """MACs of one encoder layer of attention width a (default d); n_a, n_f may be arrays."""
  a = d if a is None else a
  n_a = np.asarray(n_a, np.float64)
  n_f = np.asarray(n_f, np.float64)
  return 4.0 * d * a * n_a + 2.0 * a * n_a * n_a + 2.0 * d * d_ff * n_f


def embedding_macs(d, r, n):
  """MACs of a rank-r factorised word embedding's r -> d projection over n tokens (0 if r = 0)."""
  return float(r) * d * np.asarray(n, np.float64)


def model_layer_macs(cfg, n_a, n_f):
  """MACs of one of `cfg`'s encoder layers (its own attention width and FFN)."""
  return layer_macs(cfg.hidden_size, cfg.intermediate_size, n_a, n_f, a=cfg.attention_size)


def exit_head_macs(d, w, n, num_labels):
  """MACs of one FastBERT exit head reading n tokens (see the module docstring)."""
  n = np.asarray(n, np.float64)
  return (d * w * n + 2.0 * w * w * n + 2.0 * w * n) + (3.0 * w * w + w * num_labels)


def _counts(n_attn_NxL, n_ffn_NxL, num_layers):
  n_attn_NxL = np.asarray(n_attn_NxL, np.float64)
  n_ffn_NxL = np.asarray(n_ffn_NxL, np.float64)
  if n_attn_NxL.ndim != 2 or n_attn_NxL.shape != n_ffn_NxL.shape:
    raise ValueError(f'n_attn and n_ffn must both be (N, L), got {n_attn_NxL.shape} and '
                     f'{n_ffn_NxL.shape}')
  if n_attn_NxL.shape[1] != num_layers:
    raise ValueError(f'counts have {n_attn_NxL.shape[1]} layers, the model has {num_layers}')
  return n_attn_NxL, n_ffn_NxL


def example_macs(cfg, n_attn_NxL, n_ffn_NxL, exit_layer_N=None, exits=None):
  """MACs per example (N,). Counts are (N, L) per layer (e.g. aux['n_attn'].T).

  exit_layer_N: 1-based layer each example answered at (None: all ran L layers).
  exits: whether exit heads were evaluated (default: when exit_layer_N is given), or which: a
    bool (L-1,) mask (mp_jax.model.exit_plan: a skipped head is neither run nor counted).
  """
  num_layers = cfg.num_layers
  n_attn_NxL, n_ffn_NxL = _counts(n_attn_NxL, n_ffn_NxL, num_layers)
  n = n_attn_NxL.shape[0]
  if exits is None:
    exits = exit_layer_N is not None
  heads_L = np.zeros(num_layers, bool)
  heads_L[:-1] = exits  # a bool or a (L-1,) mask; the teacher at L is no head
  exits = bool(heads_L.any())
  if exit_layer_N is None:
    exit_layer_N = np.full((n,), num_layers)
  exit_layer_N = np.asarray(exit_layer_N)
  if exit_layer_N.shape != (n,):
    raise ValueError(f'exit_layer_N must be ({n},), got {exit_layer_N.shape}')
  if np.any((exit_layer_N < 1) | (exit_layer_N > num_layers)):
    raise ValueError(f'exit layers must be in 1..{num_layers}')
  if np.any(~heads_L[exit_layer_N[exit_layer_N < num_layers] - 1]):
    raise ValueError('an example exited after a layer whose head did not run')
  depth_L = np.arange(1, num_layers + 1)
  ran_NxL = depth_L[None] <= exit_layer_N[:, None]
  per_layer_NxL = model_layer_macs(cfg, n_attn_NxL, n_ffn_NxL)
  # Every example ran layer 1, so n_attn[:, 0] is its real length.
  macs_N = ((per_layer_NxL * ran_NxL).sum(-1)
            + embedding_macs(cfg.hidden_size, cfg.embedding_rank, n_attn_NxL[:, 0]))
  if exits:
    head_NxL = exit_head_macs(cfg.hidden_size, cfg.exit_width, n_ffn_NxL, cfg.num_labels)
    heads_NxL = ran_NxL & heads_L[None]
    macs_N = macs_N + (head_NxL * heads_NxL).sum(-1)
  return macs_N


def example_flops(cfg, n_attn_NxL, n_ffn_NxL, exit_layer_N=None, exits=None):
  """FLOPs (= 2 MACs) per example (N,); arguments as in `example_macs`."""
  return 2.0 * example_macs(cfg, n_attn_NxL, n_ffn_NxL, exit_layer_N, exits)


def dense_flops(cfg, lengths_N):
  """FLOPs per example (N,) of the unpruned plain model: L layers at the real length, no exits."""
  n_N = np.asarray(lengths_N, np.float64)
  full = cfg.unpruned()
  return 2.0 * full.num_layers * model_layer_macs(full, n_N, n_N)


def summarize(cfg, n_attn_NxL, n_ffn_NxL, lengths_N=None, exit_layer_N=None, exits=None):
  """Mean GFLOPs per example, the unpruned dense baseline's, and speedup = dense / actual.

  lengths_N: real lengths (default: tokens entering layer 1, n_attn[:, 0]).
  """
  n_attn_NxL = np.asarray(n_attn_NxL)
  if lengths_N is None:
    lengths_N = n_attn_NxL[:, 0]
  actual_N = example_flops(cfg, n_attn_NxL, n_ffn_NxL, exit_layer_N, exits)
  dense_N = dense_flops(cfg, lengths_N)
  if actual_N.size == 0:
    return dict(gflops_per_example=0.0, dense_gflops_per_example=0.0, flops_speedup=1.0)
  actual, dense = float(actual_N.mean()) / 1e9, float(dense_N.mean()) / 1e9
  return dict(gflops_per_example=actual, dense_gflops_per_example=dense,
              flops_speedup=dense / actual if actual > 0 else float('nan'))

"""Width pruning (COST-EFF slenderization) on the params pytree: importance, selection, slicing.

Importance is first-order Taylor. For a group G of weights and the gradients of the caller's
loss L (COST-EFF sums the losses of every exit, not only the last classifier's):
  I(G) = sum_{w in G} |w * dL/dw|
  head h of a layer: G = rows h*dh .. (h+1)*dh - 1 of attention/output/dense/kernel (a x d), the
    weights that read head h's context (dh = head size, a = heads * dh);
  FFN neuron j: G = column j of intermediate/dense/kernel (d x d_ff) and its bias, and row j of
    output/dense/kernel (d_ff x d).
With signed=True the scores are sum_{w in G} w * dL/dw = dL/dalpha at alpha = 1 when G is scaled
by alpha (its negative is the first-order loss change of removing G).

Selection keeps M = max(1, round(keep * K)) of K heads (neurons) in every layer, the M best of
each: uniform widths, so the engine can stack the layers. Slicing makes the model physically
smaller; masking zeroes the same weights in the unpruned model (the two are equal, see
mask_params). Factorisation: the word table W (V x d) = U S V^T is replaced by U_r S_r (V x r)
and V_r^T (r x d), its best rank-r approximation (Eckart-Young).

Host numpy trees in, new trees out (inputs left alone); the scores and `masked` are jnp, so the
width stage uses them inside its jitted step.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mp_jax.model import bert

_QKV = ('query', 'key', 'value')


def _copy(params):
  """New containers, numpy leaves (not copied: every edit below replaces a leaf)."""
  return jax.tree.map(np.asarray, params)


def _wg(w, g, signed):
  wg = jnp.asarray(w) * jnp.asarray(g)
  return wg if signed else jnp.abs(wg)


def head_scores(params, grads, cfg, signed=False):
  """Taylor importance of every head from its rows of the attention output kernel: (L, H).

  jnp, so the width stage accumulates it inside its jitted step (training/slim.py).
  """
  out = []
  for l in range(cfg.num_layers):
    w_AxD = params[f'layer_{l}']['attention']['output']['dense']['kernel']
    g_AxD = grads[f'layer_{l}']['attention']['output']['dense']['kernel']
    out.append(_wg(w_AxD, g_AxD, signed).reshape(cfg.num_heads, cfg.head_dim, -1).sum((1, 2)))
  return jnp.stack(out)


def ffn_scores(params, grads, cfg, signed=False):
  """Taylor importance of every FFN neuron (expansion column + bias, contraction row): (L, F)."""
  out = []
  for l in range(cfg.num_layers):
    p, g = params[f'layer_{l}'], grads[f'layer_{l}']
    up, g_up = p['intermediate']['dense'], g['intermediate']['dense']
    down, g_down = p['output']['dense'], g['output']['dense']
    out.append(_wg(up['kernel'], g_up['kernel'], signed).sum(0)
               + _wg(up['bias'], g_up['bias'], signed)
               + _wg(down['kernel'], g_down['kernel'], signed).sum(1))
  return jnp.stack(out)


def unit_factors(heads_LxH, ffn_LxF, cfg):
  """{flat param path: 0/1 factor} of the weights each head and each FFN neuron owns; jnp.

  A head owns its q/k/v columns and biases and its rows of the output kernel; a neuron its
  expansion column and bias and its contraction row.
  """
  out = {}
  for l in range(cfg.num_layers):
    a_A, f_F = jnp.repeat(jnp.asarray(heads_LxH[l]), cfg.head_dim), jnp.asarray(ffn_LxF[l])
    p = f'layer_{l}'
    for name in _QKV:
      out[(p, 'attention', name, 'kernel')], out[(p, 'attention', name, 'bias')] = a_A[None], a_A
    out[(p, 'attention', 'output', 'dense', 'kernel')] = a_A[:, None]
    out[(p, 'intermediate', 'dense', 'kernel')] = f_F[None]
    out[(p, 'intermediate', 'dense', 'bias')] = f_F
    out[(p, 'output', 'dense', 'kernel')] = f_F[:, None]
  return out


def masked(params, heads_LxH, ffn_LxF, cfg):
  """`params` with every unit's weights times its 0/1 mask (thresholds untouched); jnp."""
  fac = unit_factors(heads_LxH, ffn_LxF, cfg)
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: v * fac[k].astype(v.dtype) if k in fac else v
                                       for k, v in flat.items()})


def kept_count(k, keep):
  """Units kept of k at fraction `keep`: M = max(1, round(keep * k))."""
  return max(1, round(keep * k))


def select(scores_LxK, keep):
  """Indices (L, M) of the M = kept_count(K, keep) best per layer, ascending in each row."""
  scores_LxK = np.asarray(scores_LxK)
  if not 0 < keep <= 1:
    raise ValueError(f'keep must be in (0, 1], got {keep}')
  m = kept_count(scores_LxK.shape[1], keep)
  best_LxM = np.argsort(-scores_LxK, axis=1, kind='stable')[:, :m]
  return np.sort(best_LxM, axis=1)


def _indices(idx_LxM, cfg, k, what):
  """idx as an (L, M) int array (None: all K), checked: same M per layer, distinct, in range."""
  if idx_LxM is None:
    return np.tile(np.arange(k), (cfg.num_layers, 1))
  idx_LxM = np.asarray(idx_LxM)
  if idx_LxM.ndim != 2 or idx_LxM.shape[0] != cfg.num_layers or idx_LxM.shape[1] < 1:
    raise ValueError(f'{what}: want ({cfg.num_layers}, M) indices, the same M in every layer, '
                     f'got shape {idx_LxM.shape}')
  if ((idx_LxM < 0) | (idx_LxM >= k)).any():
    raise ValueError(f'{what}: indices must be in [0, {k})')
  if any(len(set(row.tolist())) != len(row) for row in idx_LxM):
    raise ValueError(f'{what}: repeated index in a layer')
  return idx_LxM.astype(np.int64)


def with_widths(cfg, heads, head_size, ffn, full_heads, full_ffn):
  """cfg at these widths; fields equal to their defaults are written as the default (0)."""
  return cfg.replace(
      num_heads=heads, intermediate_size=ffn,
      head_size=0 if head_size * heads == cfg.hidden_size else head_size,
      unpruned_heads=0 if full_heads == heads else full_heads,
      unpruned_intermediate_size=0 if full_ffn == ffn else full_ffn)


def slice_params(params, cfg, heads_LxM=None, neurons_LxM=None):
  """(params, cfg) of the model keeping heads_LxM and neurons_LxM (None: all), physically smaller.

  Indices are into this model's heads/neurons; the unpruned widths carry over, so slicing a
  slim model again still counts FLOPs against the original.
  """
  nh, dh, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
  heads_LxM = _indices(heads_LxM, cfg, nh, 'heads')
  neurons_LxM = _indices(neurons_LxM, cfg, cfg.intermediate_size, 'neurons')
  p = _copy(params)
  for l in range(cfg.num_layers):
    h, f, layer = heads_LxM[l], neurons_LxM[l], p[f'layer_{l}']
    att = layer['attention']
    for name in _QKV:
      att[name]['kernel'] = att[name]['kernel'].reshape(d, nh, dh)[:, h].reshape(d, -1)
      att[name]['bias'] = att[name]['bias'].reshape(nh, dh)[h].reshape(-1)
    out = att['output']['dense']
    out['kernel'] = out['kernel'].reshape(nh, dh, d)[h].reshape(-1, d)
    up, down = layer['intermediate']['dense'], layer['output']['dense']
    up['kernel'], up['bias'] = up['kernel'][:, f], up['bias'][f]
    down['kernel'] = down['kernel'][f]
  full = cfg.unpruned()
  return p, with_widths(cfg, heads_LxM.shape[1], dh, neurons_LxM.shape[1], full.num_heads,
                       full.intermediate_size)


def mask_params(params, cfg, heads_LxM=None, neurons_LxM=None):
  """This model with every other head's and neuron's weights zeroed; same shapes and cfg.

  A zeroed head has q = k = 0 (uniform attention over the alive tokens) and v = 0, so outputs
  equal the sliced model's. Its uniform rows do enter the token importance (SPEC §2): with M of H
  heads kept, the masked score is s' = (M/H) s + (H-M)/(H n) for alive tokens, so the thresholds
  get the same map and hard pruning decides as the sliced model does (soft masks do not: their
  temperature would need the factor M/H too).
  """
  nh = cfg.num_heads
  heads_LxM = _indices(heads_LxM, cfg, nh, 'heads')
  neurons_LxM = _indices(neurons_LxM, cfg, cfg.intermediate_size, 'neurons')
  alive = lambda idx_LxM, k: np.stack([np.isin(np.arange(k), row) for row in idx_LxM])
  p = _copy(masked(params, alive(heads_LxM, nh).astype(np.float32),
                   alive(neurons_LxM, cfg.intermediate_size).astype(np.float32), cfg))
  m = heads_LxM.shape[1]
  theta_L = np.asarray(p['thresholds'], np.float64)
  p['thresholds'] = (m / nh * theta_L + (nh - m) / (nh * cfg.max_seq_length)).astype(np.float32)
  return p


def factorise_embedding(params, cfg, rank):
  """(params, cfg) with the word table replaced by its rank-r truncated SVD (V x r, r x d)."""
  if not 0 < rank < cfg.hidden_size:
    raise ValueError(f'rank must be in [1, hidden_size={cfg.hidden_size}), got {rank}')
  p = _copy(params)
  emb = p['embeddings']
  w_VxD = np.asarray(word_table(params, cfg), np.float64)
  u_VxD, s_D, vt_DxD = np.linalg.svd(w_VxD, full_matrices=False)
  emb['word_embeddings']['embedding'] = (u_VxD[:, :rank] * s_D[:rank]).astype(np.float32)
  emb['word_projection'] = {'kernel': vt_DxD[:rank].astype(np.float32)}
  return p, cfg.replace(embedding_rank=rank)


def word_table(params, cfg):
  """The V x d word embedding table (the product of the factors when factorised)."""
  emb = params['embeddings']
  w = np.asarray(emb['word_embeddings']['embedding'])
  if cfg.embedding_rank:
    w = w @ np.asarray(emb['word_projection']['kernel'])
  return w


def export_config(cfg):
  """The full-head, unfactorised config a slim model is exported as (its FFN stays slim)."""
  full_heads = cfg.unpruned().num_heads
  if cfg.head_dim * full_heads != cfg.hidden_size:
    raise ValueError(f'cannot export heads of size {cfg.head_dim} as BERT heads: '
                     f'{full_heads} heads * {cfg.head_dim} != hidden_size {cfg.hidden_size}')
  return with_widths(cfg, full_heads, cfg.head_dim, cfg.intermediate_size, full_heads,
                    cfg.unpruned().intermediate_size).replace(embedding_rank=0)


def export_params(params, cfg):
  """(params, cfg) at export_config: kept heads first, the rest zero-filled; the table multiplied.

  Exact: zero q/k/v columns and output rows add nothing (see mask_params); token importance
  differs (uniform rows), so a full-shape model's hard pruning is not the slim model's.
  """
  out_cfg = export_config(cfg)
  nh, full, dh, d = cfg.num_heads, out_cfg.num_heads, cfg.head_dim, cfg.hidden_size
  p = _copy(params)
  for l in range(cfg.num_layers):
    att = p[f'layer_{l}']['attention']
    for name in _QKV:
      w = np.zeros((d, full * dh), np.float32)
      w[:, :nh * dh] = att[name]['kernel']
      b = np.zeros((full * dh,), np.float32)
      b[:nh * dh] = att[name]['bias']
      att[name]['kernel'], att[name]['bias'] = w, b
    out = att['output']['dense']
    w = np.zeros((full * dh, d), np.float32)
    w[:nh * dh] = out['kernel']
    out['kernel'] = w
  if cfg.embedding_rank:
    p['embeddings']['word_embeddings']['embedding'] = word_table(params, cfg).astype(np.float32)
    del p['embeddings']['word_projection']
  return p, out_cfg


def import_heads(params, full_cfg, cfg):
  """Inverse of export_params' zero-fill: the first cfg.num_heads heads of a full_cfg tree.

  ValueError if a dropped slot is not zero (not an export of a model with cfg's heads).
  """
  nh, a = cfg.num_heads, cfg.attention_size
  for l in range(cfg.num_layers):
    att = params[f'layer_{l}']['attention']
    rest = [att[n]['kernel'][:, a:] for n in _QKV] + [att[n]['bias'][a:] for n in _QKV]
    rest.append(att['output']['dense']['kernel'][a:])
    if any(np.any(np.asarray(r) != 0) for r in rest):
      raise ValueError(f'layer_{l}: heads beyond the first {nh} are not zero-filled')
  heads_LxM = np.tile(np.arange(nh), (cfg.num_layers, 1))
  sliced, _ = slice_params(params, full_cfg, heads_LxM, None)
  return sliced


def served_params(params):
  """Parameters of the served classifier: embeddings, layers, pooler, classifier.

  Exit heads and thresholds are left out (COST-EFF-style counts of the backbone); leaves may be
  arrays or jax.ShapeDtypeStructs.
  """
  return int(sum(int(np.prod(x.shape)) for k, v in params.items()
                 if not k.startswith('exit_') and k != 'thresholds'
                 for x in jax.tree.leaves(v)))


def unpruned_params(cfg):
  """served_params of `cfg.unpruned()` (shapes only, nothing initialised)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: bert.MagicPyramid(cfg.unpruned()).init(
      jax.random.PRNGKey(0), ids, ids, ids + 1))
  return served_params(shapes['params'])

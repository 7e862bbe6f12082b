"""BERT with learned token pruning and early exits (Magic Pyramid), in flax.linen."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from mp_jax.model import config as model_config
from mp_jax.model import dropout as dropout_lib
from mp_jax.model import exits as exits_lib
from mp_jax.model import matmul
from mp_jax.model import pruning as pruning_lib

NEG_INF = -1e9


def dense(cfg: model_config.ModelConfig, features, name=None):
  """nn.Dense in the compute dtype over merged rows (matmul.dot_general); float32 params."""
  return nn.Dense(features, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                  dot_general=matmul.dot_general, name=name)


def layer_norm(cfg: model_config.ModelConfig, name=None):
  """LayerNorm with float32 statistics (flax promotes them) and output in the compute dtype."""
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, name=name)


def gelu(x):
  """Exact GELU, x Phi(x) = x/2 (1 + erf(x / sqrt 2)): the formula of HF BERT's "gelu"."""
  # Not jax.nn.gelu(approximate=False): it goes through erfc, 1.2-2.8x slower on XLA:CPU for
  # the same values to float rounding (docs/RESULTS.md, session 18). In float32 inside: 1 + erf
  # cancels for negative x, which bfloat16 would round away.
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + lax.erf(x32 * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


def logits_dense(num_labels, name=None):
  """Classifier layer in float32: a tiny matmul whose outputs feed softmax, entropy, losses."""
  return nn.Dense(num_labels, dtype=jnp.float32, name=name)


class DenseLN(nn.Module):
  """dense -> dropout -> + residual -> LayerNorm (BERT's 'output' blocks)."""

  cfg: model_config.ModelConfig

  @nn.compact
  def __call__(self, x, residual, train=False):
    y = dense(self.cfg, self.cfg.hidden_size, name='dense')(x)
    y = dropout_lib.Dropout(self.cfg.hidden_dropout)(y, deterministic=not train)
    return layer_norm(self.cfg, name='LayerNorm')(y + residual)


class SelfAttention(nn.Module):
  """Multi-head self-attention in (B, H, T, D) layout; returns (output, e_BxHxTxT, z_BxHxTx1):
  the unnormalised attention weights and their row sums, probabilities = e / z."""

  cfg: model_config.ModelConfig

  @nn.compact
  def __call__(self, h_BxTxD, alive_BxT, train=False):
    cfg = self.cfg
    b, t, _ = h_BxTxD.shape
    # Width a = nh * dh: hidden_size in BERT, less in a width-pruned model (fewer heads, same dh).
    nh, dh, a = cfg.num_heads, cfg.head_dim, cfg.attention_size

    def heads(name):
      x_BxTxA = dense(cfg, a, name=name)(h_BxTxD)
      return x_BxTxA.reshape(b, t, nh, dh).transpose(0, 2, 1, 3)

    q_BxHxTxK, k_BxHxTxK, v_BxHxTxK = heads('query'), heads('key'), heads('value')
    # An additive mask, not a select on the scores: XLA:CPU fuses the add into the score
    # matmul (one YNNPACK fusion); the select made attention 2.5x slower at B=32, T=256.
    bias_BxT = jnp.where(alive_BxT, 0.0, NEG_INF).astype(jnp.float32)
    # Scores, exp and row sums in float32 whatever the compute dtype: the importance score and
    # the pruning decision read these probabilities.
    q_BxHxTxK = q_BxHxTxK / np.sqrt(dh).astype(cfg.compute_dtype)
    logits_BxHxTxT = (jnp.einsum('bhqk,bhtk->bhqt', q_BxHxTxK, k_BxHxTxK,
                                 preferred_element_type=jnp.float32)
                      + bias_BxT[:, None, None, :])
    # Softmax normalised after the value matmul (T*K divisions, not T*T): cheaper attention
    # on XLA:CPU. Dropout commutes with the row scale; probs materialise only where used.
    # The unnormalised weights are in [0, 1], so the value matmul can take them in the compute
    # dtype (relative error 2^-8 in bfloat16) and still accumulate in float32.
    e_BxHxTxT = jnp.exp(logits_BxHxTxT - logits_BxHxTxT.max(-1, keepdims=True))
    z_BxHxTx1 = e_BxHxTxT.sum(-1, keepdims=True)
    drop_BxHxTxT = dropout_lib.Dropout(cfg.attention_dropout)(
        e_BxHxTxT.astype(cfg.compute_dtype), deterministic=not train)
    ctx_BxHxTxK = jnp.einsum('bhqt,bhtk->bhqk', drop_BxHxTxT, v_BxHxTxK,
                             preferred_element_type=jnp.float32) / z_BxHxTx1
    ctx_BxTxA = ctx_BxHxTxK.astype(cfg.compute_dtype).transpose(0, 2, 1, 3).reshape(b, t, a)
    return DenseLN(cfg, name='output')(ctx_BxTxA, h_BxTxD, train), e_BxHxTxT, z_BxHxTx1


class Intermediate(nn.Module):
  """The FFN's expansion with exact (erf) GELU."""

  cfg: model_config.ModelConfig

  @nn.compact
  def __call__(self, x):
    return gelu(dense(self.cfg, self.cfg.intermediate_size, name='dense')(x))


class Layer(nn.Module):
  """One BERT block; `attend` and `ffn` are separate so the engine can prune in between."""

  cfg: model_config.ModelConfig

  def setup(self):
    self.attention = SelfAttention(self.cfg)
    self.intermediate = Intermediate(self.cfg)
    self.output = DenseLN(self.cfg)

  def attend(self, h_BxTxD, alive_BxT, train=False):
    return self.attention(h_BxTxD, alive_BxT, train)

  def ffn(self, a_BxTxD, train=False):
    return self.output(self.intermediate(a_BxTxD), a_BxTxD, train)

  def __call__(self, h_BxTxD, alive_BxT, mode, theta, train=False):
    """Returns (h_out, alive_out, score, mask, probs) for pruning mode none|soft|hard."""
    cfg = self.cfg
    a_BxTxD, e_BxHxTxT, z_BxHxTx1 = self.attend(h_BxTxD, alive_BxT, train)
    score_BxT = pruning_lib.importance(e_BxHxTxT, z_BxHxTx1, alive_BxT, cfg.max_seq_length)
    keep_BxT = alive_BxT
    if mode == 'hard':
      # Decided from this layer's attention, applied before this layer's FFN.
      keep_BxT = pruning_lib.hard_keep(score_BxT, theta, alive_BxT)
    out_BxTxD = self.ffn(a_BxTxD, train)
    if mode == 'soft':
      mask_BxT = pruning_lib.soft_mask(score_BxT, theta, cfg.temperature, alive_BxT)
      out_BxTxD = out_BxTxD * mask_BxT[..., None].astype(out_BxTxD.dtype)
    else:
      mask_BxT = keep_BxT.astype(jnp.float32)
      # Zero what is gone so that nothing downstream can read it.
      out_BxTxD = jnp.where(keep_BxT[..., None], out_BxTxD, 0.0)
    return out_BxTxD, keep_BxT, score_BxT, mask_BxT, e_BxHxTxT / z_BxHxTx1


class Embeddings(nn.Module):
  """Word + learned absolute position + token type, LayerNorm, dropout.

  With `embedding_rank` r > 0 the word vectors are a V x r table times a bias-free r x d
  projection (`word_projection`), a truncated SVD of the V x d table (width.factorise_embedding).
  """

  cfg: model_config.ModelConfig

  @nn.compact
  def __call__(self, ids_BxT, types_BxT, train=False):
    cfg = self.cfg
    t = ids_BxT.shape[1]
    if t > cfg.max_position_embeddings:
      raise ValueError(f'sequence length {t} > max_position_embeddings '
                       f'{cfg.max_position_embeddings}')
    d = cfg.hidden_size
    # Lookups and their sum in float32 (a gather, no matmul: nothing to gain from bfloat16);
    # the LayerNorm hands the compute dtype on.
    r = cfg.embedding_rank
    x = nn.Embed(cfg.vocab_size, r or d, name='word_embeddings')(ids_BxT)
    if r:  # float32 like the lookups: n*r*d MACs, small beside a layer (counted, SPEC §5)
      x = nn.Dense(d, use_bias=False, dtype=jnp.float32, dot_general=matmul.dot_general,
                   name='word_projection')(x)
    x = x + nn.Embed(cfg.max_position_embeddings, d, name='position_embeddings')(
        jnp.arange(t)[None])
    x = x + nn.Embed(cfg.type_vocab_size, d, name='token_type_embeddings')(types_BxT)
    x = layer_norm(cfg, name='LayerNorm')(x)
    return dropout_lib.Dropout(cfg.hidden_dropout)(x, deterministic=not train)


class Pooler(nn.Module):
  """tanh dense on [CLS]."""

  cfg: model_config.ModelConfig

  @nn.compact
  def __call__(self, h_BxTxD):
    return jnp.tanh(dense(self.cfg, self.cfg.hidden_size, name='dense')(h_BxTxD[:, 0]))


class MagicPyramid(nn.Module):
  """BERT classifier with per-layer token pruning and per-layer exit heads."""

  cfg: model_config.ModelConfig

  @nn.compact
  def __call__(self, ids_BxT, types_BxT, mask_BxT, *, pruning='none', exits=False, train=False,
               return_hidden=False, return_attention=False):
    """Returns (logits_BxC, aux); see docs/DESIGN.md for aux."""
    cfg = self.cfg
    if pruning not in model_config.PRUNING_MODES:
      raise ValueError(f'pruning must be one of {model_config.PRUNING_MODES}, got {pruning!r}')
    thresholds_L = self.param(
        'thresholds',
        lambda _: jnp.asarray(pruning_lib.init_thresholds(cfg.num_layers, cfg.final_threshold)))
    h_BxTxD = Embeddings(cfg, name='embeddings')(ids_BxT, types_BxT, train)
    alive_BxT = mask_BxT.astype(bool)
    rec = {k: [] for k in ('scores', 'masks', 'n_attn', 'n_ffn', 'hidden', 'attention', 'exit')}
    rec['hidden'].append(h_BxTxD)
    for l in range(cfg.num_layers):
      rec['n_attn'].append(alive_BxT.sum(-1))
      h_BxTxD, alive_BxT, score_BxT, m_BxT, probs = Layer(cfg, name=f'layer_{l}')(
          h_BxTxD, alive_BxT, pruning, thresholds_L[l], train)
      rec['n_ffn'].append(alive_BxT.sum(-1))
      rec['scores'].append(score_BxT)
      rec['masks'].append(m_BxT)
      rec['hidden'].append(h_BxTxD)
      rec['attention'].append(probs)
      if exits and l < cfg.num_layers - 1:
        head = exits_lib.ExitHead(cfg.num_labels, cfg.exit_width, cfg.exit_heads,
                                  dtype=cfg.compute_dtype, name=f'exit_{l}')
        rec['exit'].append(head(h_BxTxD, alive_BxT))
    pooled_BxD = Pooler(cfg, name='pooler')(h_BxTxD)
    pooled_BxD = dropout_lib.Dropout(cfg.hidden_dropout)(pooled_BxD, deterministic=not train)
    logits_BxC = logits_dense(cfg.num_labels, name='classifier')(pooled_BxD)
    aux = {k: jnp.stack(rec[k]) for k in ('scores', 'masks', 'n_attn', 'n_ffn')}
    if exits:  # (L-1, B, C); a 1-layer model (static's half of 3 layers) has no exit head
      aux['exit_logits'] = (jnp.stack(rec['exit']) if rec['exit'] else
                            jnp.zeros((0, ids_BxT.shape[0], cfg.num_labels), logits_BxC.dtype))
    if return_hidden:
      aux['hidden'] = jnp.stack(rec['hidden'])
    if return_attention:
      aux['attention'] = jnp.stack(rec['attention'])
    return logits_BxC, aux


def init_params(cfg: model_config.ModelConfig, seed=0):
  """Random parameters for every part (backbone, teacher, exits, thresholds)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  variables = MagicPyramid(cfg).init(jax.random.PRNGKey(seed), ids, ids, ids + 1, exits=True)
  return jax.tree.map(np.asarray, variables['params'])

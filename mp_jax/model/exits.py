"""Early exits (FastBERT as used by Magic Pyramid, SPEC §3): head, uncertainty, distillation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mp_jax.model import matmul

NEG_INF = -1e9


class _Affine(nn.Module):
  """An nn.Dense's params, not applied: kernel (K, N) and bias (N,), same names, initialisers
  and draws (checkpoints and seeded inits are unchanged)."""

  features: int

  @nn.compact
  def __call__(self, in_features):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (in_features, self.features),
                        jnp.float32)
    return kernel, self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)


class ExitHead(nn.Module):
  """FastBERT sub-classifier: dense+tanh, 2-head attention (width w), [CLS], dense+tanh, logits.

  Only the [CLS] query row of the attention is ever read, so only that row is computed, and its
  key and value projections move off the tokens (per head h, x_t the tokens, q = x_0 Wq + bq):
    scores  q_h . (x_t Wk_h + bk_h) = x_t . (Wk_h q_h) + const   (softmax drops the const)
    context sum_t p_ht (x_t Wv_h + bv_h) = (sum_t p_ht x_t) Wv_h + bv_h   (sum_t p_ht = 1)
  The same function as full self-attention's [CLS] row; per token it costs d*w + 2*H*w MACs
  instead of d*w + 2*w^2 + 2*w. Timed alone on XLA:CPU: 20% less time at 1 x 32 tokens, 33% at
  32 x 32, none at 256 tokens (3% more at 1 x 256), where the down projection dominates
  (docs/RESULTS.md, session 31). Matmuls run in `dtype`; the attention softmax and the logits
  are float32 (the entropy and the exit decision read them).
  """

  num_labels: int
  width: int = 128
  heads: int = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h_BxTxD, keep_BxT):
    w, nh = self.width, self.heads
    k = w // nh
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, dot_general=matmul.dot_general,
                                     name=name)
    x_BxTxW = jnp.tanh(dense(w, 'down')(h_BxTxD))
    q_BxW = dense(w, 'query')(x_BxTxW[:, 0])
    wk_WxW, _ = _Affine(w, name='key')(w)  # its bias only shifts a head's scores
    wv_WxW, bv_W = _Affine(w, name='value')(w)
    b = q_BxW.shape[0]
    wk_WxHxK, wv_WxHxK = (x.astype(self.dtype).reshape(w, nh, k) for x in (wk_WxW, wv_WxW))
    qk_BxWxH = jnp.einsum('bhk,whk->bwh', q_BxW.reshape(b, nh, k), wk_WxHxK)
    logits_BxHxT = jnp.einsum('btw,bwh->bht', x_BxTxW, qk_BxWxH,
                              preferred_element_type=jnp.float32) / np.sqrt(k)
    logits_BxHxT = jnp.where(keep_BxT[:, None, :], logits_BxHxT, NEG_INF)
    probs_BxHxT = jax.nn.softmax(logits_BxHxT, axis=-1).astype(self.dtype)
    pooled_BxHxW = jnp.einsum('bht,btw->bhw', probs_BxHxT, x_BxTxW)
    ctx_BxW = (jnp.einsum('bhw,whk->bhk', pooled_BxHxW, wv_WxHxK).reshape(b, w)
               + bv_W.astype(self.dtype))
    cls_BxW = dense(w, 'out')(ctx_BxW)
    cls_BxW = jnp.tanh(dense(w, 'dense')(cls_BxW))
    return nn.Dense(self.num_labels, dtype=jnp.float32, name='logits')(cls_BxW)


def merge(p, heads):
  """ExitHead's params `p` with its two pairs of linear maps multiplied out (the engine's form).

  Per attention head h of k = w/H columns (x_t the tokens after `down`, x_0 the [CLS] one):
    scores  x_t . Wk_h (Wq_h^T x_0 + bq_h) = x_t . (x_0 Q_h + c_h)
            Q_h = Wq_h Wk_h^T, c_h = Wk_h bq_h
    output  sum_h (pooled_h Wv_h + bv_h) Wo_h + bo = sum_h pooled_h (Wv_h Wo_h) + (bv Wo + bo)
  'query' and 'key' become 'query_key' (w, H*w), 'value' and 'out' become 'value_out' (H*w, w):
  two matmuls fewer a head, and no head split of a weight at each call (XLA:CPU copied two).
  Same MACs at H = 2 (H*w^2 for 2*w^2 otherwise, on the [CLS] row only). A head with its
  uncertainty at 32 x 32 tokens: 747 us against 810; single requests with every head running:
  1.8% less time (docs/RESULTS.md, session 34). Products in float32 at full precision (TPU's
  default would round them to bfloat16).
  """
  w = p['query']['kernel'].shape[0]
  k, hi = w // heads, jax.lax.Precision.HIGHEST
  wq_WxHxK, wk_WxHxK, wv_WxHxK = (p[n]['kernel'].reshape(w, heads, k)
                                  for n in ('query', 'key', 'value'))
  qk_WxHxW = jnp.einsum('xhk,whk->xhw', wq_WxHxK, wk_WxHxK, precision=hi)
  qk_HxW = jnp.einsum('hk,whk->hw', p['query']['bias'].reshape(heads, k), wk_WxHxK,
                      precision=hi)
  vo_HxWxW = jnp.einsum('whk,hkv->hwv', wv_WxHxK, p['out']['kernel'].reshape(heads, k, w),
                        precision=hi)
  vo_W = jnp.dot(p['value']['bias'], p['out']['kernel'], precision=hi) + p['out']['bias']
  return {'down': p['down'], 'dense': p['dense'], 'logits': p['logits'],
          'query_key': {'kernel': qk_WxHxW.reshape(w, heads * w),
                        'bias': qk_HxW.reshape(heads * w)},
          'value_out': {'kernel': vo_HxWxW.reshape(heads * w, w), 'bias': vo_W}}


def merged_logits(m, h_BxTxD, keep_BxT, heads):
  """ExitHead's logits from its merged params m (`merge`), float32 throughout: a bfloat16
  product rounds unlike the factors' chain, so only float32 models run this form."""
  b, w = h_BxTxD.shape[0], m['dense']['kernel'].shape[0]

  def dense(x, p):  # nn.Dense's arithmetic: the model's matmul, then the bias
    return matmul.dot_general(x, p['kernel'], (((x.ndim - 1,), (0,)), ((), ()))) + p['bias']

  x_BxTxW = jnp.tanh(dense(h_BxTxD, m['down']))
  qk_BxHxW = dense(x_BxTxW[:, 0], m['query_key']).reshape(b, heads, w)
  logits_BxHxT = jnp.einsum('bhw,btw->bht', qk_BxHxW, x_BxTxW) / np.sqrt(w // heads)
  logits_BxHxT = jnp.where(keep_BxT[:, None, :], logits_BxHxT, NEG_INF)
  pooled_BxHxW = jnp.einsum('bht,btw->bhw', jax.nn.softmax(logits_BxHxT, axis=-1), x_BxTxW)
  cls_BxW = jnp.tanh(dense(dense(pooled_BxHxW.reshape(b, heads * w), m['value_out']),
                           m['dense']))
  return dense(cls_BxW, m['logits'])


def uncertainty(logits_BxC):
  """Normalised entropy u = -sum p log p / log C, in [0, 1]."""
  logp = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  # p = 0 with log p = -inf (logits more than float32 max apart) contributes 0, not nan.
  ent = -jnp.where(p > 0, p * logp, 0.0).sum(-1)
  return jnp.clip(ent / np.log(logits_BxC.shape[-1]), 0.0, 1.0)


def should_exit(u, tau):
  """u <= tau, except that tau <= 0 never exits (u can be exactly 0 in fp32)."""
  return (u <= tau) & (tau > 0)


def distill_loss(exit_logits_ExBxC, teacher_BxC, weights_B, direction='forward'):
  """Sum over exits of the weighted batch-mean KL; forward = KL(teacher || exit) (FastBERT)."""
  logp_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_BxC), axis=-1)[None]
  logp_s = jax.nn.log_softmax(exit_logits_ExBxC, axis=-1)
  if direction == 'forward':
    kl_ExB = (jnp.exp(logp_t) * (logp_t - logp_s)).sum(-1)
  elif direction == 'reverse':  # the paper's eq. 3: KL(exit || teacher)
    kl_ExB = (jnp.exp(logp_s) * (logp_s - logp_t)).sum(-1)
  else:
    raise ValueError(f'exits.distill_direction must be forward|reverse, got {direction!r}')
  w = weights_B / jnp.maximum(weights_B.sum(), 1.0)
  return (kl_ExB * w[None]).sum()


def exit_layers(exit_logits_ExBxC, teacher_BxC, tau):
  """Reference exit rule: first layer l (1-based) with u_l <= tau_l, else L; and its logits.

  tau: one halt value for every head, or per layer (L,) (exit_plan.halts: 0 where a head does
  not run; the last entry is unused, the teacher always answers).
  """
  all_LxBxC = jnp.concatenate([exit_logits_ExBxC, teacher_BxC[None]], axis=0)
  tau_Lx1 = jnp.broadcast_to(jnp.asarray(tau, jnp.float32), all_LxBxC.shape[:1])[:, None]
  ok_LxB = should_exit(uncertainty(all_LxBxC), tau_Lx1).at[-1].set(True)
  first_B = jnp.argmax(ok_LxB, axis=0)
  logits_BxC = jnp.take_along_axis(all_LxBxC, first_B[None, :, None], axis=0)[0]
  return first_B + 1, logits_BxC

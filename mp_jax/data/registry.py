"""The package index pip is configured with, read without pip running: find a pinned file, verify.

PEP 691 JSON or PEP 503 HTML simple pages and pip's find-links, with pip's certificates, client
certificate, trusted hosts, proxy, timeout and retries; a file is taken only if its sha256 is
the pinned one. Nothing found here is ever built or installed (mp_jax.data.fetch unpacks it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html.parser
import importlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from absl import logging

PYPI_SIMPLE = 'https://pypi.org/simple'
# PEP 691 JSON first, PEP 503 HTML as the fallback (the order pip asks in).
_ACCEPT = ('application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, '
           'text/html;q=0.01')
_JSON_TYPES = ('application/vnd.pypi.simple.v1+json', 'application/json')
SDIST_EXTS = ('.tar.gz', '.tgz', '.tar.bz2', '.tar.xz', '.tar', '.zip')
_BACKOFF_S = 0.5


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

  @property
  def kind(self) -> str:
    return 'sdist' if self.sdist else 'wheel'


@dataclasses.dataclass(frozen=True)
class Sources:
  """Where registry files come from and how to reach them (pip's index, find-links, TLS)."""

  index_urls: tuple[str, ...] = ()
  find_links: tuple[str, ...] = ()
  cert: str | None = None  # CA bundle file or directory; None: the system's (and certifi's)
  client_cert: str | None = None
  trusted_hosts: tuple[str, ...] = ()
  proxy: str | None = None
  timeout: float = 15.0
  retries: int = 3


# Asks pip for the options `pip download` would run with (config files, PIP_* variables), without
# running the command: nothing is resolved, downloaded or built. `null` when the interpreter has
# no pip (uv venvs have none).
_PIP_OPTIONS = r'''
import json
try:
  from pip._internal.commands import create_command
except ImportError:
  print('null')
  raise SystemExit
o, _ = create_command('download').parse_args([])
print(json.dumps({
    'index_urls': [] if o.no_index else [o.index_url, *o.extra_index_urls],
    'find_links': o.find_links, 'cert': o.cert, 'client_cert': o.client_cert,
    'trusted_hosts': o.trusted_hosts, 'proxy': o.proxy or None, 'timeout': o.timeout,
    'retries': o.retries}))
'''


def pip_sources() -> Sources:
  """The index URLs, find-links and TLS settings of this interpreter's pip, as pip resolves them.

  Without pip: PIP_INDEX_URL and PIP_EXTRA_INDEX_URL, else PyPI, and the system's TLS defaults.
  """
  cmd = [sys.executable, '-c', _PIP_OPTIONS]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    opts = json.loads(proc.stdout) if proc.returncode == 0 else False
  except (OSError, subprocess.TimeoutExpired, ValueError) as e:
    raise FetchError(f'cannot read pip configuration via {sys.executable}: {e}') from e
  if opts is False:
    raise FetchError(f'cannot read pip configuration via {sys.executable} (exit '
                     f'{proc.returncode}):\n{_tail(proc.stderr or "")}')
  if opts is None:
    index_urls = (os.environ.get('PIP_INDEX_URL') or PYPI_SIMPLE,
                  *os.environ.get('PIP_EXTRA_INDEX_URL', '').split())
    logging.warning('%s has no pip to read the index configuration from; using %s (from '
                    'PIP_INDEX_URL / PIP_EXTRA_INDEX_URL, else PyPI)', sys.executable,
                    ' '.join(index_urls))
    return Sources(index_urls=index_urls)
  return Sources(index_urls=tuple(opts['index_urls']), find_links=tuple(opts['find_links']),
                 cert=opts['cert'], client_cert=opts['client_cert'],
                 trusted_hosts=tuple(opts['trusted_hosts']), proxy=opts['proxy'],
                 timeout=float(opts['timeout']), retries=int(opts['retries']))


def _tail(text: str, n: int = 15) -> str:
  return '\n'.join(text.strip().splitlines()[-n:])


def _normalize(name: str) -> str:
  """PEP 503 project name normalisation."""
  return re.sub(r'[-_.]+', '-', name).lower()


def _archive_ext(filename: str, art: Artifact) -> str | None:
  """The archive extension if `filename` is `art`'s distribution file (name, version, kind)."""
  if not art.sdist:
    parts = filename[:-len('.whl')].split('-')
    ok = (filename.endswith('.whl') and len(parts) in (5, 6) and parts[1] == art.version
          and _normalize(parts[0]) == _normalize(art.name))
    return '.whl' if ok else None
  ext = next((e for e in SDIST_EXTS if filename.endswith(e)), None)
  if ext is None:
    return None
  name, sep, version = filename[:-len(ext)].rpartition('-')
  ok = sep and version == art.version and _normalize(name) == _normalize(art.name)
  return ext if ok else None


class _Missing(Exception):
  """The page or file is not there (HTTP 404/410, no such local file)."""


class _Failed(Exception):
  """The source could not be read (network, TLS, HTTP error, bad page)."""


@dataclasses.dataclass(frozen=True)
class _Candidate:
  filename: str
  url: str
  sha256: str | None  # as listed by the index; None when it lists no sha256


def _host_port(url: str) -> tuple[str, str]:
  parts = urllib.parse.urlsplit(url)
  host = parts.hostname or ''
  return host, f'{host}:{parts.port}' if parts.port else host


def _secure(url: str, src: Sources) -> bool:
  """pip's rule: https, file, loopback or a --trusted-host; plain http elsewhere is refused."""
  scheme = urllib.parse.urlsplit(url).scheme
  host, host_port = _host_port(url)
  if scheme in ('https', 'file'):
    return True
  loopback = host in ('localhost', '::1') or host.startswith('127.')
  return scheme == 'http' and (loopback or host in src.trusted_hosts
                               or host_port in src.trusted_hosts)


def _add_certifi(ctx: ssl.SSLContext) -> None:
  """Adds certifi's CA bundle (standalone or pip's copy) to ctx, if either is installed."""
  for module in ('certifi', 'pip._vendor.certifi'):
    try:
      ctx.load_verify_locations(importlib.import_module(module).where())
      return
    except (ImportError, OSError, ssl.SSLError):
      continue


def _opener(url: str, src: Sources) -> urllib.request.OpenerDirector:
  host, host_port = _host_port(url)
  if host in src.trusted_hosts or host_port in src.trusted_hosts:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
  elif src.cert and os.path.isdir(src.cert):
    ctx = ssl.create_default_context(capath=src.cert)
  elif src.cert:
    ctx = ssl.create_default_context(cafile=src.cert)
  else:  # as pip >= 24.2 without --cert: the system's trust store, and certifi's in addition
    ctx = ssl.create_default_context()
    _add_certifi(ctx)
  if src.client_cert:
    ctx.load_cert_chain(src.client_cert)
  handlers: list = [urllib.request.HTTPSHandler(context=ctx)]
  if src.proxy:
    handlers.append(urllib.request.ProxyHandler({'http': src.proxy, 'https': src.proxy}))
  return urllib.request.build_opener(*handlers)


def _local_path(url: str) -> str | None:
  parts = urllib.parse.urlsplit(url)
  return urllib.request.url2pathname(parts.path) if parts.scheme == 'file' else None


def _open(url: str, src: Sources, consume: Callable, accept: str | None = None):
  """Opens `url` and returns `consume(response)`; transient network errors are retried."""
  if not _secure(url, src):
    raise _Failed('not https, loopback or a trusted host (pip --trusted-host); not used')
  local = _local_path(url)
  if local is not None and os.path.isdir(local):  # pip reads a file:// index folder's index.html
    url = urllib.parse.urljoin(url.rstrip('/') + '/', 'index.html')
  request = urllib.request.Request(url, headers={'Accept': accept} if accept else {})
  tries = 1 if local is not None else 1 + max(0, src.retries)
  for attempt in range(tries):
    try:
      with _opener(url, src).open(request, timeout=src.timeout) as resp:
        return consume(resp)
    except urllib.error.HTTPError as e:
      if e.code in (404, 410):
        raise _Missing(f'HTTP {e.code}') from e
      err: Exception = e
      if e.code < 500 and e.code != 429:
        break
    except urllib.error.URLError as e:
      if isinstance(e.reason, FileNotFoundError):
        raise _Missing('no such file') from e
      err = e
      if isinstance(e.reason, ssl.SSLError):  # a certificate problem does not heal by retrying
        err = _Failed(f'{e.reason} (CA bundle: {src.cert or "system default"})')
        break
    except (OSError, ValueError) as e:  # timeouts, resets, truncated responses
      err = e
    if attempt + 1 < tries:
      time.sleep(_BACKOFF_S * 2**attempt)
  raise _Failed(f'{err} (after {attempt + 1} attempt(s))') from err


class _Links(html.parser.HTMLParser):
  """The `<a href>` targets and `<base href>` of an HTML page."""

  def __init__(self):
    super().__init__()
    self.base: str | None = None
    self.hrefs: list[str] = []

  def handle_starttag(self, tag, attrs):
    href = dict(attrs).get('href')
    if tag == 'base' and href and self.base is None:
      self.base = href
    elif tag == 'a' and href:
      self.hrefs.append(href)


def _candidate(url: str, sha256: str | None = None, filename: str | None = None) -> _Candidate:
  url, fragment = urllib.parse.urldefrag(url)
  if sha256 is None:
    sha256 = urllib.parse.parse_qs(fragment).get('sha256', [None])[0]
  if filename is None:
    filename = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit('/', 1)[-1])
  return _Candidate(filename, url, sha256.lower() if sha256 else None)


def _parse_page(body: bytes, content_type: str, page_url: str) -> list[_Candidate]:
  """The files a PEP 691 JSON or PEP 503 HTML page lists, with absolute URLs."""
  if content_type in _JSON_TYPES:
    try:
      page = json.loads(body)
      return [_candidate(urllib.parse.urljoin(page_url, f['url']),
                         (f.get('hashes') or {}).get('sha256'), f['filename'])
              for f in page['files']]
    except (ValueError, KeyError, TypeError) as e:
      raise _Failed(f'malformed JSON simple page: {e!r}') from e
  links = _Links()
  links.feed(body.decode('utf-8', errors='replace'))
  base = urllib.parse.urljoin(page_url, links.base) if links.base else page_url
  return [_candidate(urllib.parse.urljoin(base, href)) for href in links.hrefs]


def _read_page(url: str, src: Sources, accept: str | None) -> list[_Candidate]:
  def consume(resp):
    return _parse_page(resp.read(), resp.headers.get_content_type(), resp.geturl())
  return _open(url, src, consume, accept)


def _list_find_links(entry: str, src: Sources) -> list[_Candidate]:
  """Files of one find-links entry: a local folder or file, or an HTML page of links."""
  local = _local_path(entry) if '://' in entry else entry
  if local is not None and os.path.isdir(local):
    names = sorted(os.listdir(local))
    return [_candidate(Path(local, n).resolve().as_uri(), filename=n) for n in names]
  if local is not None:
    if not os.path.isfile(local):
      raise _Missing('no such file or folder')
    return [_candidate(Path(local).resolve().as_uri())]
  return _read_page(entry, src, None)


def _download(cand: _Candidate, src: Sources, dest: Path) -> str:
  """Streams one file to `dest`; returns its sha256."""
  def consume(resp):
    digest = hashlib.sha256()
    with open(dest, 'wb') as f:
      for chunk in iter(lambda: resp.read(1 << 20), b''):
        digest.update(chunk)
        f.write(chunk)
    return digest.hexdigest()
  return _open(cand.url, src, consume)


def resolve(art: Artifact, src: Sources, dl_dir: Path) -> tuple[Path, str]:
  """Finds `art`'s file (the pinned sha256 decides) and downloads it; returns (path, filename)."""
  lists = [(e, lambda e=e: _list_find_links(e, src)) for e in src.find_links]
  pages = [f'{u.rstrip("/")}/{_normalize(art.name)}/' for u in src.index_urls]
  lists += [(p, lambda p=p: _read_page(p, src, _ACCEPT)) for p in pages]
  if not lists:
    raise FetchError(f'{art.spec}: no package index or find-links configured (pip --no-index?)')
  notes = []
  for where, list_files in lists:
    try:
      files = list_files()
    except (_Missing, _Failed) as e:
      notes.append(f'{where}: {"not listed there" if isinstance(e, _Missing) else "failed"} ({e})')
      continue
    matching = [(c, ext) for c in files if (ext := _archive_ext(c.filename, art))]
    if not matching:
      notes.append(f'{where}: {len(files)} file(s), no {art.kind} of {art.spec}')
    for cand, ext in matching:
      if cand.sha256 is not None and cand.sha256 != art.sha256:
        notes.append(f'{cand.url}: listed sha256 {cand.sha256} is not the pinned one')
        continue
      dest = dl_dir / f'archive{ext}'
      try:
        got = _download(cand, src, dest)
      except (_Missing, _Failed, OSError) as e:
        notes.append(f'{cand.url}: download failed ({e})')
        continue
      if got == art.sha256:
        return dest, cand.filename
      dest.unlink()
      notes.append(f'{cand.url}: sha256 mismatch, downloaded {got}'
                   + (f' though the index lists {cand.sha256}' if cand.sha256 else ''))
  raise FetchError(
      f'{art.spec}: no {art.kind} with the pinned sha256 {art.sha256} on the configured '
      'sources (nothing was unpacked):\n  ' + '\n  '.join(notes))

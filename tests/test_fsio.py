"""Durable atomic writes and named read errors."""

import json
import os

import pytest

from mp_jax import fsio


def test_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
  p = tmp_path / 'sub' / 'r.json'
  fsio.write_json(p, {'a': 1})
  fsio.write_json(p, {'a': 2})
  assert json.loads(p.read_text()) == {'a': 2}
  assert os.listdir(p.parent) == ['r.json']
  assert oct(p.stat().st_mode & 0o777) == oct(0o644)


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
  p = fsio.write_text(tmp_path / 'x.txt', 'old')
  monkeypatch.setattr(os, 'replace', lambda *a: (_ for _ in ()).throw(OSError('disk full')))
  with pytest.raises(OSError, match='disk full'):
    fsio.write_text(p, 'new')
  assert p.read_text() == 'old'
  assert os.listdir(tmp_path) == ['x.txt']  # the temp file is gone too


def test_temp_names_are_unique(tmp_path, monkeypatch):
  seen = []
  real = os.replace
  monkeypatch.setattr(os, 'replace', lambda a, b: (seen.append(a), real(a, b)))
  for _ in range(3):
    fsio.write_text(tmp_path / 'x.txt', 'v')
  assert len(set(seen)) == 3


def test_read_json_names_the_file(tmp_path):
  p = tmp_path / 'report.json'
  p.write_text('{"accuracy": 0.9')  # truncated
  with pytest.raises(fsio.UnreadableFile, match=r'report\.json: not valid JSON'):
    fsio.read_json(p)

"""A workdir is bound to its config: refusals name the keys and lose nothing; restart; lock."""

import ast
import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import pytest

from configs import base
from mp_jax import fsio, methods
from mp_jax import workdir as workdir_lib
from mp_jax.model import bert
from mp_jax.training import lock, runs, trainer
from tests import tiny
from tests.conftest import tiny_config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """An ltp smoke workdir (finetune, soft, hard) trained once; tests work on copies."""
  root = tmp_path_factory.mktemp('runs')
  trainer.run(tiny.config(root, 'smoke,method=ltp'), root / 'wd')
  return root


def _copy(trained, tmp_path):
  wd = tmp_path / 'wd'
  shutil.copytree(trained / 'wd', wd, symlinks=True)
  return wd


def _config(root, items=''):
  """The ltp smoke config with `items` (key=value,...) applied after tiny.config's settings."""
  items = dict(i.split('=') for i in items.split(',') if i)
  method = items.pop('method', 'ltp')
  return tiny.config(root, f'smoke,method={method}',
                     **{k: ast.literal_eval(v) for k, v in items.items()})


def _files(wd):
  return {p.relative_to(wd): p.read_bytes() for p in sorted(wd.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('arg,stage,rows', [
    ('train.lr=0.5', 'finetune', ['train.lr: 0.001 -> 0.5']),
    ('model.final_threshold=0.05', 'calibrate', ['model.final_threshold: None -> 0.05']),
    ('model.target_token_keep=0.3', 'calibrate', ['model.target_token_keep: 0.5 -> 0.3']),
    ('train.mask_lambda=3.0', 'soft', ['train.mask_lambda: 10.0 -> 3.0']),
    ('data.max_examples=40', 'finetune', ['data.max_examples: 0 -> 40', 'sha256 of the encoded']),
    ('model.random_dims.hidden_size=32', 'finetune',
     ['model.random_dims.hidden_size: 64 -> 32', 'sha256 of the initial weights']),
])
def test_changed_config_is_refused_naming_keys_and_nothing_is_lost(trained, tmp_path, arg,
                                                                   stage, rows):
  wd = _copy(trained, tmp_path)
  before = _files(wd)
  with pytest.raises(runs.Mismatch) as e:
    trainer.run(_config(trained, arg), wd)
  msg = str(e.value)
  assert f'{wd / stage} was trained with a different setup' in msg, msg
  for row in rows:
    assert row in msg, msg
  assert f'--restart_from={stage}' in msg and 'new --workdir' in msg
  assert 'final/, eval/ and config.json aside' in msg
  assert _files(wd) == before  # config.json, stages, checkpoints, final/ and the log untouched



def test_training_grid_is_fingerprinted_as_resolved_on_the_platform(monkeypatch):
  """What older code recorded on every platform matches on GPU/TPU and not on CPU."""
  c = base.build('method=bert')
  assert c.data.length_buckets is None
  old = [32, 64, 128, 256, 512]
  # The CPU grid existing runs were fingerprinted with: a change would refuse every stage.
  cpu = [8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512]
  for platform, want in (('tpu', old), ('gpu', old), ('cpu', cpu)):
    monkeypatch.setattr(jax, 'default_backend', lambda p=platform: p)
    for stage in ('finetune', 'calibrate', 'soft'):
      assert runs.stage_keys(c, stage)['data.length_buckets'] == want
  c.data.length_buckets = (64, 32)
  assert runs.stage_keys(c, 'finetune')['data.length_buckets'] == [32, 64]
  # An older config.json (lists) reads the same way.
  assert runs.legacy_keys(c.to_dict() | {'data': {'length_buckets': old}}, 'finetune')[
      'data.length_buckets'] == old

def test_other_method_is_refused_and_config_json_kept(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  before = _files(wd)
  for method, way_out in (('fastbert', 'calibrate'), ('bert', 'calibrate'), ('mp', 'exits')):
    with pytest.raises(runs.Mismatch, match=f"method='ltp'.*\n.*--restart_from={way_out}"):
      trainer.run(_config(trained, f'method={method}'), wd)
  assert _files(wd) == before
  # The Predictor takes the method and tau from final/, not from a later config.json.
  config = json.loads((wd / 'config.json').read_text())
  (wd / 'config.json').write_text(json.dumps(dict(config, method='bert')))
  assert workdir_lib.load(wd)[0]['method'] == 'ltp'


def test_same_command_again_changes_nothing(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  before = _files(wd)
  meta = json.loads((wd / 'final' / workdir_lib.FINAL_META).read_text())
  assert (meta['method'], meta['tau'], meta['dtype']) == ('ltp', 0.3, 'float32')
  trainer.run(_config(trained), wd)
  assert _files(wd) == before  # no new metrics lines, final/ not re-exported


def test_restart_from_moves_the_stage_and_later_ones_aside(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  before = _files(wd)
  trainer.run(_config(trained, 'model.final_threshold=0.05'), wd,
              restart_from='calibrate')
  (aside,) = wd.glob('replaced-*')
  moved = ['calibrate', 'config.json', 'final', 'hard', 'soft']
  assert sorted(p.name for p in aside.iterdir()) == moved
  for rel, data in before.items():  # every old file is still there, byte-equal
    where = aside / rel if rel.parts[0] in moved else wd / rel
    if rel.name != 'metrics.jsonl':
      assert where.read_bytes() == data, rel
  assert json.loads((wd / 'config.json').read_text())['model']['final_threshold'] == 0.05
  fp = json.loads((wd / 'calibrate' / runs.FINGERPRINT).read_text())
  assert fp['keys']['model.final_threshold'] == 0.05
  assert json.loads((wd / 'calibrate' / 'done.json').read_text())['final_threshold'] == 0.05
  assert (wd / 'hard' / 'done.json').exists() and (wd / 'final' / workdir_lib.FINAL_META).exists()


def test_workdir_lock_names_the_holder_and_recovers_a_stale_one(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  before = _files(wd)
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    (wd / lock.LOCK).write_text(json.dumps({'pid': holder.pid, 'host': socket.gethostname(),
                                            'started': 0}))
    with pytest.raises(lock.Locked, match=f'in use by pid {holder.pid} on host '
                                          f'{socket.gethostname()}'):
      trainer.run(_config(trained), wd)
  finally:
    holder.kill()
    holder.wait()
  assert (wd / lock.LOCK).exists()
  os.unlink(wd / lock.LOCK)
  assert _files(wd) == before
  # The holder is gone: its lock is stale, taken over, and released at the end.
  (wd / lock.LOCK).write_text(json.dumps({'pid': holder.pid, 'host': socket.gethostname(),
                                          'started': 0}))
  trainer.run(_config(trained), wd)
  assert not (wd / lock.LOCK).exists()


def test_workdir_without_fingerprints_is_checked_against_its_config_json(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  for stage in ('finetune', 'soft', 'hard'):
    os.unlink(wd / stage / runs.FINGERPRINT)
  with pytest.raises(runs.Mismatch, match='train.hard_lr: 0.001 -> 0.002'):
    trainer.run(_config(trained, 'train.hard_lr=0.002'), wd)
  weights = (wd / 'final' / 'model.safetensors').read_bytes()
  trainer.run(_config(trained), wd)  # same keys: reused, recorded
  assert all((wd / s / runs.FINGERPRINT).exists() for s in ('finetune', 'soft', 'hard'))
  assert (wd / 'final' / 'model.safetensors').read_bytes() == weights


def test_workdir_from_before_model_dtype_reads_it_as_the_default(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  for stage in ('finetune', 'soft', 'hard'):
    os.unlink(wd / stage / runs.FINGERPRINT)
  config = json.loads((wd / 'config.json').read_text())
  del config['model']['dtype']  # written before model.dtype existed: it ran in float32
  (wd / 'config.json').write_text(json.dumps(config))
  with pytest.raises(runs.Mismatch, match="model.dtype: 'float32' -> 'bfloat16'"):
    trainer.run(_config(trained, "model.dtype='bfloat16'"), wd)
  trainer.run(_config(trained), wd)
  assert all((wd / s / runs.FINGERPRINT).exists() for s in ('finetune', 'soft', 'hard'))


def test_restart_from_checks_the_stages_kept_before_moving_anything(trained, tmp_path):
  wd = _copy(trained, tmp_path)
  before = _files(wd)
  with pytest.raises(runs.Mismatch, match=r'(?s)finetune was trained with a different setup.*'
                                          r'train.lr: 0.001 -> 0.5.*Nothing was changed'):
    trainer.run(_config(trained, 'train.lr=0.5'), wd, restart_from='soft')
  # fastbert differs from ltp from `calibrate` on: restarting from `hard` would keep ltp's soft.
  with pytest.raises(runs.Mismatch, match="method='ltp'.*\n.*--restart_from=calibrate"):
    trainer.run(_config(trained, 'method=fastbert'), wd, restart_from='hard')
  assert not list(wd.glob('replaced-*')) and _files(wd) == before


def test_error_after_taking_the_lock_releases_it(trained, tmp_path, monkeypatch):
  wd = _copy(trained, tmp_path)
  before = _files(wd)
  write_text = fsio.write_text

  def failing(path, text):
    if path.name == 'config.json':
      raise OSError(errno.ENOSPC, 'No space left on device', str(path))
    return write_text(path, text)

  monkeypatch.setattr(fsio, 'write_text', failing)
  with pytest.raises(OSError, match='No space left'):
    trainer.run(_config(trained), wd)
  assert not (wd / lock.LOCK).exists() and _files(wd) == before


def test_unreadable_config_json_and_final_record_count_as_absent(trained, tmp_path, caplog):
  wd = _copy(trained, tmp_path)
  (wd / 'config.json').write_text('{"method": "lt')  # cut short
  (wd / 'final' / workdir_lib.FINAL_META).write_text('["ltp"]')  # JSON, not an object
  with caplog.at_level(logging.WARNING):
    trainer.run(_config(trained), wd)
  warned = '\n'.join(r.getMessage() for r in caplog.records)
  assert f'{wd / "config.json"}: not valid JSON' in warned, warned
  assert f'{wd / "final" / workdir_lib.FINAL_META}: not a JSON object' in warned, warned
  assert json.loads((wd / 'config.json').read_text())['method'] == 'ltp'
  meta = wd / 'final' / workdir_lib.FINAL_META
  assert json.loads(meta.read_text())['method'] == 'ltp'  # re-exported


def _hold(path, host, age_s):
  path.write_text(json.dumps({'pid': 4242, 'host': host, 'started': 0}))
  os.utime(path, (time.time() - age_s,) * 2)


def test_lock_lease_a_lapsed_one_is_taken_over_from_any_host(tmp_path, caplog):
  path = tmp_path / lock.LOCK
  _hold(path, 'elsewhere', age_s=lock.LEASE_S - 60)  # renewed a minute ago: in use
  with pytest.raises(lock.Locked, match='in use by pid 4242 on host elsewhere'):
    lock.Lock(tmp_path).acquire()
  _hold(path, 'elsewhere', age_s=lock.LEASE_S + 60)  # a preempted job's, on another host
  with caplog.at_level(logging.WARNING):
    held = lock.Lock(tmp_path).acquire()
  assert 'stale lock of pid 4242 on elsewhere' in caplog.text and 'lease' in caplog.text
  assert json.loads(path.read_text()) == held.me
  held.release()
  assert not path.exists()


def test_lock_holder_renews_its_lease(tmp_path, monkeypatch):
  monkeypatch.setattr(lock, 'LEASE_RENEW_S', 0.02)
  held = lock.Lock(tmp_path).acquire()
  path = tmp_path / lock.LOCK
  try:
    os.utime(path, (0, 0))
    deadline = time.time() + 5
    while path.stat().st_mtime < time.time() - 60 and time.time() < deadline:
      time.sleep(0.02)
    assert path.stat().st_mtime > time.time() - 60
  finally:
    held.release()
  assert not path.exists()


def test_lock_without_hard_links_and_no_takeover_of_a_new_holder(tmp_path, monkeypatch):
  def no_link(*_):
    raise OSError(errno.EPERM, 'Operation not permitted')

  monkeypatch.setattr(os, 'link', no_link)
  held = lock.Lock(tmp_path).acquire()  # exclusive create instead
  path = tmp_path / lock.LOCK
  assert json.loads(path.read_text()) == held.me
  with pytest.raises(lock.Locked, match=f'in use by pid {os.getpid()}'):
    lock.Lock(tmp_path).acquire()
  # A stale lock judged from its old text is not removed once another run has replaced it.
  lock.Lock(tmp_path)._remove_if('{"pid": 1, "host": "elsewhere", "started": 0}')
  assert json.loads(path.read_text()) == held.me
  held.release()
  assert not path.exists() and not list(tmp_path.iterdir())


def test_width_fingerprints_are_shared_by_costeff_and_pyramid_and_chain_on(tmp_path):
  params = bert.init_params(tiny_config())
  fps = lambda m, items='': runs.chain(_config(tmp_path, f'method={m}{items}'), m, 'data', params)
  costeff, pyramid, mp = fps('costeff'), fps('pyramid'), fps('mp')
  assert costeff['width'] == pyramid['width']  # trained once, linked between the two
  stages_ = methods.STAGES['pyramid']
  for prev, stage in zip(stages_, stages_[1:]):
    assert pyramid[stage]['previous'] == pyramid[prev]['sha256'], stage
  assert pyramid['exits']['pruning'] == 'hard'
  for stage in ('calibrate', 'soft', 'hard', 'exits'):  # after width: never mp's
    assert pyramid[stage]['sha256'] != mp[stage]['sha256'], stage
  narrower = fps('pyramid', ',model.head_keep=0.25')
  assert narrower['finetune'] == pyramid['finetune']
  assert 'model.head_keep: 0.5 -> 0.25' in runs._diff(pyramid['width'], narrower['width'])
  assert all(narrower[s]['sha256'] != pyramid[s]['sha256'] for s in stages_[1:])
  # A costeff workdir asked for pyramid (or back): the first stage they do not share is named.
  for old, new in (('costeff', 'pyramid'), ('pyramid', 'costeff')):
    wd = tmp_path / old
    wd.mkdir()
    (wd / 'config.json').write_text(json.dumps({'method': old}))
    with pytest.raises(runs.Mismatch, match=f"method='{old}'.*\n.*--restart_from=calibrate"):
      runs.check(wd, _config(tmp_path, f'method={new}'), fps(new))


def test_a_cut_models_final_from_before_the_unpruned_baseline_is_not_current(tmp_path):
  """static/width finals and reports without format 2 (timed against their own smaller dense
  model) and those of methods with exits without format 3 (no exit plan) are redone; an older
  final of another method is still current (same export)."""
  old = {'method': 'static', 'tau': 0.0, 'dtype': 'float32'}
  for method, cut in (('static', True), ('costeff', True), ('pyramid', True), ('mp', False),
                      ('ltp', False), ('bert', False)):
    assert methods.cuts_model(method) == cut
    fresh = not cut and not methods.has_exits(method)
    assert runs.current_format(method, dict(old, method=method)) == fresh
    assert runs.current_format(method, dict(old, method=method, format=2)) == (
        not methods.has_exits(method))
    assert runs.current_format(method, dict(old, method=method, format=runs.FINAL_FORMAT))
  c = tiny.config(tmp_path, 'smoke,method=static')
  meta = runs.final_meta(c, {}, None)
  assert runs._same_export(meta, c)
  assert not runs._same_export({k: v for k, v in meta.items() if k != 'format'}, c)

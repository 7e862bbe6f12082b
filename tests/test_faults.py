"""Fault tolerance: SIGKILL anywhere then the same command, corrupt checkpoints, NaN losses."""

import dataclasses
import json
import logging
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from mp_jax import methods
from mp_jax.training import checkpoint, stages, trainer
from tests import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
STAGES = methods.STAGES['mp']  # finetune, calibrate, soft, hard, exits


def _state(seed):
  rng = np.random.default_rng(seed)
  return {'params': {'w': rng.normal(size=(256, 256)).astype(np.float32),
                     'b': rng.normal(size=(256,)).astype(np.float32)},
          'opt_state': {'mu': rng.normal(size=(256,)).astype(np.float32)},
          'step': np.asarray(seed, np.int32)}


def _files(d):
  return sorted(p for p in pathlib.Path(d).rglob('*') if p.is_file())


def _truncate(d):
  for p in _files(d):
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def _garbage_metadata(d):
  for p in _files(d):
    if 'METADATA' in p.name or p.name.startswith('manifest'):
      p.write_bytes(b'\x00garbage{' * 7)


def _drop_item(d):
  for p in _files(d / 'default'):
    p.unlink()


def _flip_data_bytes(d):
  """Damages the array bytes but leaves every file parseable (only the digest notices)."""
  big = max((p for p in _files(d) if p.parent.name == 'd'), key=lambda p: p.stat().st_size)
  raw = bytearray(big.read_bytes())
  for i in range(len(raw) // 2, len(raw) // 2 + 64):
    raw[i] ^= 0xFF
  big.write_bytes(bytes(raw))


@pytest.mark.parametrize('damage', [_truncate, _garbage_metadata, _drop_item, _flip_data_bytes])
def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, caplog, damage):
  ck = checkpoint.Stage(tmp_path / 'stage', keep=3)
  ck.save(2, _state(2))
  ck.save(4, _state(4))
  ck.close()
  damage(tmp_path / 'stage' / 'ckpt' / '4')
  ck = checkpoint.Stage(tmp_path / 'stage', keep=3)
  with caplog.at_level(logging.WARNING):
    step, got = ck.restore(_state(0))
  assert step == 2
  for a, b in zip(_leaves(got), _leaves(_state(2)), strict=True):
    np.testing.assert_array_equal(a, b)
  assert any('ckpt/4 unreadable' in r.getMessage() for r in caplog.records), caplog.text
  if damage is _flip_data_bytes:  # orbax reads these bytes without complaint; the digest does not
    assert 'CorruptCheckpoint' in caplog.text
  assert not (tmp_path / 'stage' / 'corrupt').exists()  # nothing moved unless step 4 is redone
  ck.save(4, _state(4))  # the resumed run writes step 4 again; the bad one is kept aside
  assert len(list((tmp_path / 'stage' / 'corrupt').iterdir())) == 1
  step, got = ck.restore(_state(0))
  assert step == 4 and int(got['step']) == 4
  ck.close()


def test_save_of_an_existing_step_keeps_it(tmp_path):
  ck = checkpoint.Stage(tmp_path / 'stage')
  ck.save(3, _state(3))
  ck.save(3, _state(5))  # a re-run after a kill between the last save and the done marker
  assert ck.restore(_state(0))[0] == 3 and int(ck.restore(_state(0))[1]['step']) == 3
  ck.close()


def _held_manager(hold):
  """ocp.CheckpointManager whose background write calls `hold()` before the step directory is
  renamed into place (AsyncOptions.post_finalization_callback runs in orbax's commit thread;
  orbax accepts it only for asynchronous saves)."""
  real = ocp.CheckpointManager

  def make(directory, options, **kw):
    held = dataclasses.replace(options.async_options or ocp.AsyncOptions(),
                               post_finalization_callback=hold)
    return real(directory, options=dataclasses.replace(options, async_options=held), **kw)

  return make


def test_save_returns_while_the_write_goes_on_and_the_state_may_be_donated(tmp_path,
                                                                           monkeypatch):
  release = threading.Event()
  monkeypatch.setattr(ocp, 'CheckpointManager', _held_manager(lambda: release.wait(60)))
  ck = checkpoint.Stage(tmp_path / 'stage')
  state = jax.device_put(_state(2))
  ck.save(2, state)  # returns with the write held back in the background
  ckpt = tmp_path / 'stage' / 'ckpt'
  assert ck.mngr.is_saving_in_progress() and not (ckpt / '2').exists()
  # At most the temporary directory (orbax may still be creating it on its own thread).
  assert {p.name for p in ckpt.iterdir()} <= {'2.orbax-checkpoint-tmp'}
  # Training goes on: the next step donates the saved buffers and overwrites them.
  state = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)(state)
  jax.block_until_ready(state)
  release.set()
  ck.mark_done({})  # waits for the write, then the digest, then the marker
  assert (ckpt / '2' / checkpoint.DIGEST).exists() and not ck.mngr.is_saving_in_progress()
  step, got = ck.restore(_state(0))
  assert step == 2
  for a, b in zip(_leaves(got), _leaves(_state(2)), strict=True):
    np.testing.assert_array_equal(a, b)
  ck.close()


def _leaves(state):
  return [state['params']['w'], state['params']['b'], state['opt_state']['mu'], state['step']]


def _stage_setup(tmp_path, **overrides):
  c = tiny.config(tmp_path, 'method=bert,smoke', **{'data.length_buckets': (64,), **overrides})
  ds, cfg, params, tok = trainer.build(c)
  enc = trainer.encode_splits(ds, tok, cfg.max_seq_length)
  return c, cfg, params, enc, trainer.MetricsLog(tmp_path / 'm.jsonl')


def test_nan_loss_stops_before_a_bad_state_is_saved(tmp_path, monkeypatch):
  c, cfg, params, enc, log = _stage_setup(tmp_path, **{'train.checkpoint_every': 1,
                                                      'train.log_every': 100})
  batches = trainer.batching.batches

  def poisoned(*args, start_batch=0, **kw):  # batch index 4 = step 5 gets NaN weights
    for i, b in enumerate(batches(*args, start_batch=start_batch, **kw), start_batch):
      yield dict(b, weights=b['weights'] * np.float32('nan')) if i == 4 else b

  monkeypatch.setattr(trainer.batching, 'batches', poisoned)
  with pytest.raises(FloatingPointError, match=r'stage finetune, step 5: non-finite loss .*'
                     r'last good checkpoint \(step 4\) is kept'):
    trainer.run_stage(c, tmp_path / 'w', 'finetune', cfg, params, enc, log)
  ck = checkpoint.Stage(tmp_path / 'w' / 'finetune')
  assert max(ck.mngr.all_steps()) == 4 and not ck.done
  _, state = ck.restore(_restore_target(c, params))
  assert all(np.isfinite(v).all() for v in traverse_util.flatten_dict(state['params']).values())
  ck.close()


def _restore_target(c, params):
  train_p, _ = stages.split(params, 'finetune')
  tx = stages.optimizer('finetune', train_p, 6, c.train)
  return {'params': train_p, 'opt_state': tx.init(train_p), 'step': np.asarray(0, np.int32)}


# ------------------------------------------------------------------ SIGKILL at random points


# The killed runs hold every checkpoint write back 1 s in orbax's background thread (training
# goes on meanwhile), so a kill can be aimed at a save in flight.
HELD_TRAIN = """
import runpy, time
import orbax.checkpoint as ocp
from tests.test_faults import _held_manager
ocp.CheckpointManager = _held_manager(lambda: time.sleep(1.0))
runpy.run_path('train.py', run_name='__main__')
"""


def _progress(workdir, stages_=STAGES):
  """What a watcher can see of a run: per stage, whether it started, the newest complete step,
  whether it is done and whether a save is in flight (orbax's temporary directory)."""
  out = {}
  for stage in stages_:
    d = workdir / stage
    names = [p.name for p in (d / 'ckpt').glob('*')]
    steps = [int(n) for n in names if n.isdigit()]
    out[stage] = (d.exists(), max(steps, default=0), (d / checkpoint.DONE).exists(),
                  any(n.endswith('.orbax-checkpoint-tmp') for n in names))
  return out


def _kill_plan(rng):
  """Five kill conditions, in run order, each followed by a random delay (seconds).

  finetune->soft lands in calibrate (the stage between, a few hard-mask passes) or at soft's start.
  """
  k1, k3, k5 = (rng.randint(1, 2) for _ in range(3))
  return [
      ('finetune', lambda p: p['finetune'][1] >= k1, rng.uniform(0, 0.3)),
      ('finetune->soft', lambda p: p['finetune'][2], rng.uniform(0, 0.5)),
      ('soft mid-save', lambda p: p['soft'][3] and p['soft'][1] >= k3 - 1, rng.uniform(0, 0.2)),
      ('hard', lambda p: p['hard'][0], rng.uniform(0.2, 1.5)),
      ('exits', lambda p: p['exits'][1] >= k5, rng.uniform(0, 0.3)),
  ]


def test_sigkill_at_random_points_of_every_stage_resumes_exactly(tmp_path):
  """Five SIGKILLs (random delays after progress points of every stage, one while a save is in
  flight), one truncated checkpoint of a finished stage, then the same command: bit-identical
  to an uninterrupted run."""
  seed = int(os.environ.get('MP_JAX_KILL_SEED', random.randrange(10**6)))
  rng = random.Random(seed)
  c = tiny.config(tmp_path, 'method=mp,smoke')
  args = ['--config=configs/base.py:method=mp,smoke', *tiny.flags_for(c),
          '--config.train.max_steps=3', '--config.train.checkpoint_every=1',
          '--config.data.length_buckets=(64,)', '--config.model.random_dims.num_layers=2']
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  cmd = [sys.executable, str(ROOT / 'train.py'), f'--workdir={tmp_path / "run"}', *args]
  ref = subprocess.run([*cmd[:2], f'--workdir={tmp_path / "ref"}', *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)  # also fills the XLA cache
  assert ref.returncode == 0, ref.stderr[-3000:]
  kills, logs = [], []
  for i, (where, ready, delay) in enumerate(_kill_plan(rng)):
    logs.append(tmp_path / f'run{i}.log')
    with logs[-1].open('wb') as f:
      proc = subprocess.Popen([cmd[0], '-c', HELD_TRAIN, *cmd[2:]], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
      deadline = time.time() + 120
      while proc.poll() is None and time.time() < deadline and not ready(
          _progress(tmp_path / 'run')):
        time.sleep(0.01)
      time.sleep(delay)
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        kills.append((where, round(delay, 2), _progress(tmp_path / 'run')))
      proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), logs[-1].read_text()[-3000:]
    if where == 'soft mid-save':  # the kill landed before the save in flight was complete
      assert _progress(tmp_path / 'run')['soft'][3], f'seed {seed}: {kills}'
    if where == 'finetune->soft':  # finetune is done: truncate its newest (final) step as well
      ckpt = tmp_path / 'run' / 'finetune' / 'ckpt'
      _truncate(ckpt / str(max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())))
  logs.append(tmp_path / 'last.log')
  final = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  logs[-1].write_text(final.stderr)
  assert final.returncode == 0, final.stderr[-3000:]
  assert len(kills) >= 5, f'seed {seed}: only {len(kills)} kills landed: {kills}'
  text = [p.read_text() for p in logs]
  assert all('resuming from checkpoint' in t or 'already finished' in t for t in text[1:])
  assert 'unreadable' in text[2] and 'training the remaining steps again' in text[2]
  got, want = (json.loads((tmp_path / w / 'final' / 'summary.json').read_text())
               for w in ('run', 'ref'))
  assert got == want, f'seed {seed}, kills {kills}'
  for name in ('model.safetensors', 'mp_jax_extras.safetensors'):
    a, b = (load_file(tmp_path / w / 'final' / name) for w in ('run', 'ref'))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=f'{name}:{k} seed {seed} kills {kills}')
  for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines():
    json.loads(line)  # a kill mid-write leaves no broken line behind


def test_sigkill_inside_the_width_stage_resumes_exactly(tmp_path):
  """costeff, 8 width steps, cuts after steps 2 and 4: SIGKILL mid-cycle (a random step, saves
  held back), then again once the checkpoint right after the second cut is on disk (its masks,
  zeroed weights, fresh moments and cleared importance are what resumes); then the same
  command: final/ is bit-identical to an uninterrupted run."""
  seed = int(os.environ.get('MP_JAX_KILL_SEED', random.randrange(10**6)))
  rng = random.Random(seed)
  c = tiny.config(tmp_path, 'method=costeff,smoke')
  args = ['--config=configs/base.py:method=costeff,smoke', *tiny.flags_for(c),
          '--config.train.max_steps=8', '--config.train.checkpoint_every=1',
          '--config.train.width_cycles=2', '--config.data.length_buckets=(64,)',
          '--config.model.random_dims.num_layers=2']
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'xla'),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  cmd = [sys.executable, str(ROOT / 'train.py'), f'--workdir={tmp_path / "run"}', *args]
  ref = subprocess.run([*cmd[:2], f'--workdir={tmp_path / "ref"}', *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]
  k = rng.choice([1, 3])  # inside the first or the second cycle
  plan = [('width mid-cycle', lambda p: p['width'][1] >= k, rng.uniform(0, 0.5)),
          ('width after cut 2', lambda p: p['width'][1] >= 4, 0.0)]
  kills = []
  for where, ready, delay in plan:
    with (tmp_path / 'killed.log').open('wb') as f:
      proc = subprocess.Popen([cmd[0], '-c', HELD_TRAIN, *cmd[2:]], cwd=ROOT, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
      deadline = time.time() + 120
      while proc.poll() is None and time.time() < deadline and not ready(
          _progress(tmp_path / 'run', ('finetune', 'width'))):
        time.sleep(0.01)
      time.sleep(delay)
      if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        kills.append((where, round(delay, 2), _progress(tmp_path / 'run', ('width',))))
      proc.wait()
    assert proc.returncode in (0, -signal.SIGKILL), (tmp_path / 'killed.log').read_text()[-3000:]
  final = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert final.returncode == 0, final.stderr[-3000:]
  assert len(kills) == 2, f'seed {seed}: {kills}'
  assert 'stage width: resuming from checkpoint' in final.stderr, final.stderr[-3000:]
  got, want = (json.loads((tmp_path / w / 'final' / 'summary.json').read_text())
               for w in ('run', 'ref'))
  assert got == want, f'seed {seed}, kills {kills}'
  for name in ('model.safetensors', 'mp_jax_extras.safetensors', 'mp_jax.json'):
    a, b = ((tmp_path / w / 'final' / name) for w in ('run', 'ref'))
    if name.endswith('.json'):
      assert a.read_text() == b.read_text()
      continue
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f'{name}:{key} seed {seed} {kills}')

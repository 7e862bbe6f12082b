"""Data parallelism: 1 device, 2 forced CPU devices and 2 processes on localhost train alike."""

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from mp_jax.training import checkpoint, distributed, stages, trainer
from tests import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
OVERRIDES = {'train.max_steps': STEPS, 'train.checkpoint_every': 2, 'train.log_every': 1,
             'data.length_buckets': (64,), 'model.random_dims.num_layers': 2}


def _flags(c):
  return ['--config=configs/base.py:method=bert,smoke', *tiny.flags_for(c),
          f'--config.train.max_steps={STEPS}', '--config.train.checkpoint_every=2',
          '--config.train.log_every=1', '--config.data.length_buckets=(64,)',
          '--config.model.random_dims.num_layers=2']


def _env(**kw):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return dict(env, JAX_PLATFORMS='cpu', **kw)


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  """The single-device run (this process) that the parallel runs must reproduce."""
  if jax.device_count() != 1:
    pytest.skip('the reference run needs a single-device test process')
  tmp = tmp_path_factory.mktemp('dp')
  c = tiny.config(tmp, 'method=bert,smoke', **OVERRIDES)
  trainer.run(c, tmp / 'one')
  return c, tmp / 'one'


def _losses(workdir):
  rows = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: (r['loss'], r['grad_norm']) for r in rows if 'loss' in r and 'split' not in r}


def _checkpoint(workdir, c, step=STEPS):
  """The finetune state saved at `step` (its digest is checked on the way)."""
  _, cfg, params, _ = trainer.build(c)
  del cfg
  train_p, _ = stages.split(params, 'finetune')
  tx = stages.optimizer('finetune', train_p, STEPS, c.train)
  ck = checkpoint.Stage(workdir / 'finetune')
  got_step, state = ck.restore({'params': train_p, 'opt_state': tx.init(train_p),
                                'step': np.asarray(0, np.int32)})
  ck.close()
  assert got_step == step
  return state


def _assert_same_training(workdir, one_device):
  c, one = one_device
  want, got = _losses(one), _losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1)) and sorted(want) == sorted(got)
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=2e-5, err_msg=f'step {step}')
  a, b = _checkpoint(one, c), _checkpoint(workdir, c)
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name and "['params']" in name:
      # Softmax ignores the key bias, so its true gradient is 0 and Adam scales rounding noise
      # up to full-size steps: only bounded by lr * steps.
      assert np.abs(x - y).max() <= 2 * c.train.lr * STEPS, name
    else:
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=name)
  summary = [json.loads((w / 'final' / 'summary.json').read_text()) for w in (one, workdir)]
  assert summary[0]['accuracy'] == summary[1]['accuracy']


def test_two_forced_cpu_devices_match_one_device(one_device, tmp_path):
  c, _ = one_device
  out = subprocess.run(
      [sys.executable, str(ROOT / 'train.py'), f'--workdir={tmp_path / "two"}', *_flags(c)],
      cwd=ROOT, env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=2'),
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'data parallel over 2 devices (1 processes)' in out.stderr
  _assert_same_training(tmp_path / 'two', one_device)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_on_localhost_train_and_save(one_device, tmp_path):
  c, _ = one_device
  port = _free_port()
  procs, logs = [], []
  try:
    for i in range(2):
      logs.append(tmp_path / f'process{i}.log')
      with logs[-1].open('wb') as f:
        procs.append(subprocess.Popen(
            [sys.executable, str(ROOT / 'train.py'), f'--workdir={tmp_path / "w"}', *_flags(c),
             '--config.dist.num_processes=2', f'--config.dist.coordinator=127.0.0.1:{port}',
             f'--config.dist.process_id={i}'],
            cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  text = [p.read_text() for p in logs]
  assert codes == [0, 0], '\n'.join(t[-2000:] for t in text)
  for i, t in enumerate(text):
    assert f'process {i} of 2; 1 local / 2 global devices' in t
    assert 'data parallel over 2 devices (2 processes)' in t
  w = tmp_path / 'w'
  assert (w / 'finetune' / checkpoint.DONE).exists() and (w / 'final' / 'summary.json').exists()
  assert (w / 'finetune' / 'ckpt' / str(STEPS) / checkpoint.DIGEST).exists()
  _assert_same_training(w, one_device)


def test_settings_from_config_and_env(monkeypatch):
  assert distributed.settings({'coordinator': '', 'num_processes': 1, 'process_id': -1}) == (
      '', 1, -1)
  distributed.initialize({'num_processes': 1})  # a no-op for one process
  monkeypatch.setenv('MP_JAX_COORDINATOR', '127.0.0.1:1234')
  monkeypatch.setenv('MP_JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('MP_JAX_PROCESS_ID', '3')
  assert distributed.settings(None) == ('127.0.0.1:1234', 4, 3)
  assert distributed.settings({'process_id': 2}) == ('127.0.0.1:1234', 4, 2)  # config wins
  with pytest.raises(ValueError, match='process_id < num_processes'):
    distributed.settings({'num_processes': 2, 'process_id': 2})


def test_batch_must_split_over_devices(monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 4)
  distributed.check_batch_size(32)
  with pytest.raises(ValueError, match=r'train.batch_size=30 must be divisible by the number '
                     r'of devices \(4\)'):
    distributed.check_batch_size(30)


def test_shard_batch_on_one_device_is_the_batch():
  mesh = distributed.mesh()
  batch = {'input_ids': np.arange(12, dtype=np.int32).reshape(4, 3),
           'labels': np.arange(4, dtype=np.int32)}
  out = distributed.shard_batch(batch, mesh)
  assert distributed.local_rows(4, mesh) == slice(0, 4)
  for k, v in batch.items():
    np.testing.assert_array_equal(distributed.to_host(out[k]), v)
  with contextlib.suppress(ImportError):
    assert out['labels'].sharding == distributed.batch_sharded(mesh)

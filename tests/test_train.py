"""Staged trainer: end to end, resume after SIGKILL, frozen parameters, clear errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from mp_jax import checkpoint, stages
from mp_jax import train as train_lib
from tests import tiny

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(script, *args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _flat(params):
  return traverse_util.flatten_dict(jax.device_get(params))


def test_mp_all_stages_end_to_end(tmp_path):
  c = tiny.config(tmp_path, 'method=mp,smoke')
  final, summary = train_lib.run(c, tmp_path / 'w')
  for stage in stages.STAGES['mp']:
    assert checkpoint.Stage(tmp_path / 'w' / stage).done
  records = [json.loads(x) for x in (tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()]
  assert {r.get('stage') for r in records} >= set(stages.STAGES['mp'])
  assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)
  assert 0.0 <= summary['accuracy'] <= 1.0 and summary['flops_speedup'] >= 1.0
  assert (final / 'model.safetensors').exists() and (final / 'mp_jax_extras.safetensors').exists()
  # A second run skips every finished stage and gives the same answer.
  _, again = train_lib.run(c, tmp_path / 'w')
  assert again == summary


def test_finetune_learns_the_tiny_task(tmp_path):
  c = tiny.config(tmp_path, 'method=bert,smoke',
                  **{'train.max_steps': 60, 'train.epochs.finetune': 10})
  _, summary = train_lib.run(c, tmp_path / 'w')
  assert summary['accuracy'] >= 0.8


def test_exit_stage_freezes_backbone_and_teacher(tmp_path):
  c = tiny.config(tmp_path, 'method=fastbert,smoke')
  ds, cfg, params, tok = train_lib.build(c)
  enc = train_lib.encode_splits(ds, tok, cfg.max_seq_length)
  log = train_lib.MetricsLog(tmp_path / 'm.jsonl')
  after = train_lib.run_stage(c, tmp_path / 'w', 'exits', cfg, params, enc, log)
  before, after = _flat(params), _flat(after)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all(k[0].startswith('exit_') for k in changed)
  for k in before:
    if not k[0].startswith('exit_'):
      assert before[k].tobytes() == after[k].tobytes(), k


def test_soft_stage_moves_thresholds_and_hard_stage_does_not(tmp_path):
  c = tiny.config(tmp_path, 'method=ltp,smoke', **{'train.threshold_lr': 0.05})
  ds, cfg, params, tok = train_lib.build(c)
  enc = train_lib.encode_splits(ds, tok, cfg.max_seq_length)
  log = train_lib.MetricsLog(tmp_path / 'm.jsonl')
  soft = train_lib.run_stage(c, tmp_path / 'w', 'soft', cfg, params, enc, log)
  assert not np.allclose(soft['thresholds'], params['thresholds'])
  hard = train_lib.run_stage(c, tmp_path / 'w', 'hard', cfg, soft, enc, log)
  np.testing.assert_array_equal(hard['thresholds'], soft['thresholds'])
  assert not np.array_equal(hard['layer_0']['output']['dense']['kernel'],
                            soft['layer_0']['output']['dense']['kernel'])


def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(tmp_path):
  c = tiny.config(tmp_path, 'method=bert,smoke',
                  **{'train.max_steps': 12, 'train.checkpoint_every': 2})
  _, reference = train_lib.run(c, tmp_path / 'ref')
  args = ['--config=configs/base.py:method=bert,smoke', f'--workdir={tmp_path / "run"}',
          '--config.train.max_steps=12', '--config.train.checkpoint_every=2',
          *tiny.flags_for(c)]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, str(ROOT / 'train.py'), *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  ckpt = tmp_path / 'run' / 'finetune' / 'ckpt'
  deadline = time.time() + 240
  while time.time() < deadline and not (ckpt / '4').exists():
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert (ckpt / '4').exists(), 'no checkpoint appeared before the kill'
  assert not (tmp_path / 'run' / 'finetune' / checkpoint.DONE).exists()
  out = _cli('train.py', *args)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'resuming from checkpoint at step' in out.stderr
  resumed = json.loads((tmp_path / 'run' / 'final' / 'summary.json').read_text())
  assert resumed == reference
  want = load_file(tmp_path / 'ref' / 'final' / 'model.safetensors')
  got = load_file(tmp_path / 'run' / 'final' / 'model.safetensors')
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_config_typo_fails_clearly(tmp_path):
  out = _cli('train.py', '--config=configs/mr.py:smoke', f'--workdir={tmp_path}',
             '--config.train.lrr=0.1')
  assert out.returncode != 0 and 'lrr' in out.stderr
  with pytest.raises(ValueError, match='final_treshold'):
    tiny.config(tmp_path, 'smoke,model.final_treshold=0.1')
  with pytest.raises(ValueError, match="no section 'modle'"):
    tiny.config(tmp_path, 'smoke,modle.final_threshold=0.1')


def test_missing_checkpoint_dir_is_one_clear_line(tmp_path):
  c = tiny.config(tmp_path, 'method=bert,smoke')
  out = _cli('train.py', '--config=configs/base.py:method=bert,smoke', f'--workdir={tmp_path}/w',
             '--config.model.init=/no/such/ckpt', *tiny.flags_for(c))
  assert out.returncode == 2
  assert 'error: checkpoint directory not found: /no/such/ckpt' in out.stderr
  assert 'Traceback' not in out.stderr


def test_malformed_row_names_file_and_line(tmp_path):
  c = tiny.config(tmp_path, 'method=bert,smoke')
  train_tsv = pathlib.Path(c.data.path) / 'train.tsv'
  lines = train_tsv.read_text().splitlines()
  lines[5] = lines[5].replace('\t', ' ')  # a row with one column
  train_tsv.write_text('\n'.join(lines) + '\n')
  out = _cli('train.py', '--config=configs/base.py:method=bert,smoke', f'--workdir={tmp_path}/w',
             *tiny.flags_for(c))
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert 'train.tsv' in out.stderr and '6' in out.stderr

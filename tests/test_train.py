"""Staged trainer: end to end, resume after SIGKILL, frozen parameters, clear errors."""

import functools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file

from mp_jax import methods
from mp_jax.evaluation import report
from mp_jax.model import bert, hf
from mp_jax.serving import shapes
from mp_jax.training import calibration, checkpoint, stages, trainer
from tests import tiny
from tests.conftest import make_batch, tiny_config
from tests.test_engine import random_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(script, *args, timeout=300, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _flat(params):
  return traverse_util.flatten_dict(jax.device_get(params))


def test_mp_all_stages_end_to_end(tmp_path):
  c = tiny.config(tmp_path, 'method=mp,smoke')
  final, summary = trainer.run(c, tmp_path / 'w')
  for stage in methods.STAGES['mp']:
    assert checkpoint.Stage(tmp_path / 'w' / stage).done
  records = [json.loads(x) for x in (tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()]
  assert {r.get('stage') for r in records} >= set(methods.STAGES['mp'])
  assert all(np.isfinite(r['loss']) for r in records if 'loss' in r)
  assert 0.0 <= summary['accuracy'] <= 1.0 and summary['flops_speedup'] >= 1.0
  assert (final / 'model.safetensors').exists() and (final / 'mp_jax_extras.safetensors').exists()
  # A second run skips every finished stage and gives the same answer.
  _, again = trainer.run(c, tmp_path / 'w')
  assert again == summary


def test_the_heap_goes_back_after_each_stage(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(trainer.heap, 'release', lambda: calls.append(1) or 0)
  trainer.run(tiny.config(tmp_path, 'method=fastbert,smoke'), tmp_path / 'w')
  assert len(calls) == len(methods.STAGES['fastbert'])  # finetune, exits


def test_finetune_learns_the_tiny_task(tmp_path):
  c = tiny.config(tmp_path, 'method=bert,smoke',
                  **{'train.max_steps': 60, 'train.epochs.finetune': 10})
  _, summary = trainer.run(c, tmp_path / 'w')
  assert summary['accuracy'] >= 0.8


def test_training_batches_pad_to_the_platform_grid_by_default(tmp_path, monkeypatch):
  """data.length_buckets None: each batch pads to the CPU grid's bucket of its longest row."""
  seen = []
  real = trainer.batching.batches

  def spy(encoded, batch_size, *, buckets, **kw):
    for b in real(encoded, batch_size, buckets=buckets, **kw):
      seen.append((tuple(buckets), int(b['attention_mask'].sum(-1).max()),
                   b['input_ids'].shape[1]))
      yield b

  monkeypatch.setattr(trainer.batching, 'batches', spy)
  c = tiny.config(tmp_path, 'method=bert,smoke', **{'data.length_buckets': None,
                                                    'train.max_steps': 3})
  trainer.run(c, tmp_path / 'w')
  platform = shapes.train_lengths(c.data)  # CPU here: every 8 tokens up to 64
  grid = tuple(b for b in platform if b <= c.model.max_seq_length)
  assert seen and {s[0] for s in seen} == {grid}
  for _, longest, width in seen:
    assert width == min(b for b in grid if b >= longest)
  assert len({w for *_, w in seen}) > 1  # the tiny task's rows span several buckets
  fp = json.loads((tmp_path / 'w' / 'finetune' / 'fingerprint.json').read_text())
  assert fp['keys']['data.length_buckets'] == list(platform)  # resolved: never resumed elsewhere


def test_exit_stage_freezes_backbone_and_teacher(tmp_path):
  c = tiny.config(tmp_path, 'method=fastbert,smoke')
  ds, cfg, params, tok = trainer.build(c)
  enc = trainer.encode_splits(ds, tok, cfg.max_seq_length)
  log = trainer.MetricsLog(tmp_path / 'm.jsonl')
  after = trainer.run_stage(c, tmp_path / 'w', 'exits', cfg, params, enc, log)
  before, after = _flat(params), _flat(after)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all(k[0].startswith('exit_') for k in changed)
  for k in before:
    if not k[0].startswith('exit_'):
      assert before[k].tobytes() == after[k].tobytes(), k


def test_soft_stage_moves_thresholds_and_hard_stage_does_not(tmp_path):
  c = tiny.config(tmp_path, 'method=ltp,smoke', **{'train.threshold_lr': 0.05})
  ds, cfg, params, tok = trainer.build(c)
  enc = trainer.encode_splits(ds, tok, cfg.max_seq_length)
  log = trainer.MetricsLog(tmp_path / 'm.jsonl')
  rec = calibration.run(c, tmp_path / 'w', cfg, params, enc['dev'])
  cfg, params = calibration.apply(cfg, params, rec)
  soft = trainer.run_stage(c, tmp_path / 'w', 'soft', cfg, params, enc, log,
                           target=rec['token_keep'])
  assert not np.allclose(soft['thresholds'], params['thresholds'])
  hard = trainer.run_stage(c, tmp_path / 'w', 'hard', cfg, soft, enc, log)
  np.testing.assert_array_equal(hard['thresholds'], soft['thresholds'])
  assert not np.array_equal(hard['layer_0']['output']['dense']['kernel'],
                            soft['layer_0']['output']['dense']['kernel'])


def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(tmp_path):
  c = tiny.config(tmp_path, 'method=bert,smoke',
                  **{'train.max_steps': 12, 'train.checkpoint_every': 2})
  _, reference = trainer.run(c, tmp_path / 'ref')
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
  assert 'error: not found: /no/such/ckpt' in out.stderr
  assert 'to use a local copy' not in out.stderr  # the hint is for hub ids (tests/test_cli.py)
  assert not (tmp_path / 'w').exists()  # a refused run leaves no workdir behind
  assert 'Traceback' not in out.stderr
  (tmp_path / 'broken').mkdir()  # a local folder that is no checkpoint: hf's error alone
  c.model.init = str(tmp_path / 'broken')
  with pytest.raises(hf.CheckpointError) as e:
    trainer.build(c)
  assert str(e.value) == (f'{tmp_path}/broken: no config.json (not a Hugging Face checkpoint '
                          'directory)')


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


def test_bfloat16_train_step_keeps_float32_state(tmp_path):
  """In bfloat16 the gradients, parameters, optimizer state and losses stay float32."""
  tc = tiny.config(tmp_path, 'method=mp,smoke').train
  cfg = tiny_config(dtype='bfloat16')
  params = random_params(cfg)
  ids, types, mask = make_batch((11, 4, 7, 9), 11)
  batch = {'input_ids': ids, 'token_type_ids': types, 'attention_mask': mask,
           'labels': np.asarray([0, 1, 2, 1], np.int32), 'weights': np.ones(4, np.float32)}
  f32 = np.dtype('float32')
  for stage in ('soft', 'exits'):
    train_p, frozen = stages.split(params, stage)
    tx = stages.optimizer(stage, train_p, 10, tc)
    state = {'params': train_p, 'opt_state': tx.init(train_p), 'step': np.int32(0)}
    kw = dict(model=bert.MagicPyramid(cfg), method='mp', stage=stage, tc=tc, target=0.5)
    grads, m = jax.jit(jax.grad(functools.partial(stages.loss_fn, **kw), has_aux=True))(
        train_p, frozen, batch, jax.random.PRNGKey(0))
    assert {g.dtype for g in jax.tree.leaves(grads)} == {f32}
    assert {v.dtype for v in jax.tree.leaves(m)} == {f32}
    state, m = jax.jit(trainer.make_step(cfg, 'mp', stage, tc, tx, target=0.5))(
        state, frozen, batch, jax.random.PRNGKey(0))
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert {x.dtype for x in floats} == {f32} and bool(m['finite']), stage
    assert float(m['grad_norm']) > 0, stage


def test_bfloat16_smoke_run_trains_and_evaluates(tmp_path):
  c = tiny.config(tmp_path, 'method=fastbert,smoke', **{'model.dtype': 'bfloat16',
                                                        'train.max_steps': 2})
  final, summary = trainer.run(c, tmp_path / 'w')
  assert 0.0 <= summary['accuracy'] <= 1.0
  cfg, params, _ = hf.load(final)
  assert cfg.dtype == 'bfloat16'
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype('float32')}
  rep = report.build(c, tmp_path / 'w', measure=False)
  assert rep['dtype'] == 'bfloat16'
  # bfloat16 contract (docs/DESIGN.md, "Engine equals reference in bfloat16"): near-ties may
  # differ between engine and reference, so agreement is high, not exact.
  assert rep['engine_agreement']['labels'] >= 0.9
  assert rep['engine_agreement']['exit_layers'] >= 0.9
  assert rep['accuracy'] == summary['accuracy']
  c.model.dtype = 'float32'  # the config decides how a model is served, as it does tau
  assert report.build(c, tmp_path / 'w', measure=False)['dtype'] == 'float32'

"""The calibrate stage: thresholds that meet model.target_token_keep, recorded and reused."""

import json

import numpy as np
import pytest

from mp_jax import workdir as workdir_lib
from mp_jax.model import pruning
from mp_jax.training import calibration, runs, trainer
from tests import tiny


def _setup(tmp_path, arg='method=mp,smoke'):
  c = tiny.config(tmp_path, arg)
  ds, cfg, params, tok = trainer.build(c)
  enc = trainer.encode_splits(ds, tok, cfg.max_seq_length)
  return c, cfg, params, enc


@pytest.mark.parametrize('target', [0.8, 0.4])
def test_calibrated_thresholds_keep_the_target_on_dev_and_follow_ltp_schedule(tmp_path, target):
  c, cfg, params, enc = _setup(tmp_path, f'method=mp,smoke,model.target_token_keep={target}')
  rec = calibration.run(c, tmp_path / 'w', cfg, params, enc['dev'])
  assert rec == json.loads((tmp_path / 'w' / 'calibrate' / 'done.json').read_text())
  assert rec['calibrated'] and rec['target_token_keep'] == target
  assert rec['token_keep'] == pytest.approx(target, abs=0.03)
  theta = np.asarray(rec['thresholds'])
  np.testing.assert_allclose(theta, rec['final_threshold'] * np.arange(1, 4) / 3, rtol=1e-6)
  cal_cfg, out = calibration.apply(cfg, params, rec)
  np.testing.assert_array_equal(out['thresholds'], theta.astype(np.float32))
  assert cal_cfg.final_threshold == rec['final_threshold']  # what final/ will record
  # What the record says is what the hard masks do with these thresholds on dev.
  keep, m = calibration.measure(params, cfg, enc['dev'], rec['final_threshold'], c)
  assert keep == pytest.approx(rec['token_keep']) and m['accuracy'] == rec['accuracy']


def test_explicit_final_threshold_is_measured_not_searched(tmp_path):
  c, cfg, params, enc = _setup(tmp_path, 'method=mp,smoke,model.final_threshold=0.02')
  rec = calibration.run(c, tmp_path / 'w', cfg, params, enc['dev'])
  assert not rec['calibrated'] and rec['final_threshold'] == 0.02
  np.testing.assert_allclose(rec['thresholds'], pruning.init_thresholds(3, 0.02))
  keep, _ = calibration.measure(params, cfg, enc['dev'], 0.02, c)
  assert rec['token_keep'] == pytest.approx(keep)


def test_finished_calibration_is_reused_and_a_partial_one_redone(tmp_path, monkeypatch):
  c, cfg, params, enc = _setup(tmp_path)
  wd = tmp_path / 'w'
  first = calibration.run(c, wd, cfg, params, enc['dev'])
  calls = []
  monkeypatch.setattr(calibration, 'measure', lambda *a: calls.append(a) or (0.5, {}))
  again = calibration.run(c, wd, cfg, params, enc['dev'])
  assert not calls and again == first  # done.json: nothing measured again
  (wd / 'calibrate' / 'done.json').write_text('{"final_thres')  # a write cut short
  monkeypatch.undo()
  assert calibration.run(c, wd, cfg, params, enc['dev']) == first


def test_soft_stage_starts_from_the_calibrated_thresholds_and_holds_their_keep(tmp_path):
  c, cfg, params, enc = _setup(tmp_path, 'method=ltp,smoke,model.target_token_keep=0.6')
  trainer.run(c, tmp_path / 'w')
  wd = tmp_path / 'w'
  rec = json.loads((wd / 'calibrate' / 'done.json').read_text())
  fp = json.loads((wd / 'calibrate' / runs.FINGERPRINT).read_text())
  assert fp['keys']['model.target_token_keep'] == 0.6 and fp['init_sha256'] == ''
  # Relative Adam steps from the calibrated start: each threshold within steps * lr of itself
  # (the tiny model's random init is 0.01 * l / L, far from calibrate's for this target).
  theta0 = np.asarray(rec['thresholds'])
  theta = np.asarray(workdir_lib.load(wd)[2]['thresholds'])
  steps, lr = c.train.max_steps, c.train.threshold_lr
  assert np.all(np.abs(theta - theta0) <= steps * lr * theta0 * 1.01), (theta, theta0)
  assert not np.allclose(theta0, pruning.init_thresholds(3, 0.01), rtol=0.05)
  meta = json.loads((wd / 'final' / 'mp_jax.json').read_text())
  assert meta['model_config']['final_threshold'] == pytest.approx(rec['final_threshold'])
  logs = [json.loads(x) for x in (wd / 'metrics.jsonl').read_text().splitlines()]
  soft = [r['soft_keep'] for r in logs if r.get('stage') == 'soft' and 'soft_keep' in r]
  assert soft and all(abs(k - rec['token_keep']) < 0.1 for k in soft), (soft, rec)


def test_target_token_keep_out_of_range_is_refused_by_name():
  from configs import base
  with pytest.raises(ValueError, match='model.target_token_keep must be in'):
    base.build('model.target_token_keep=1.5')
  with pytest.raises(ValueError, match='model.final_threshold must be > 0'):
    base.build('model.final_threshold=-0.1')


def test_the_dev_subset_is_a_fixed_token_budget_in_order(tmp_path):
  _, _, _, enc = _setup(tmp_path)
  total = int(np.sum(enc['dev'].lengths))
  sub = calibration._subset(enc['dev'], total // 3)
  assert 0 < np.sum(sub.lengths) <= total // 3 and len(sub.ids) < len(enc['dev'].ids)
  rows = {tuple(x) for x in enc['dev'].ids}
  assert all(tuple(x) in rows for x in sub.ids)
  again = calibration._subset(enc['dev'], total // 3)
  assert [tuple(x) for x in again.ids] == [tuple(x) for x in sub.ids]
  assert calibration._subset(enc['dev'], total) is enc['dev']

"""experiments/cls_last_layer.py: a [CLS]-only last layer gives the dense program's answers."""

import numpy as np
import pytest

from experiments import cls_last_layer
from mp_jax.model import flops
from mp_jax.serving import engine as engine_lib
from tests.test_engine import CFG, FAST_COMPILE, make_rows, random_params


def test_cls_only_last_layer_answers_as_the_dense_program():
  params = random_params(CFG, seed=3)
  rows = make_rows(5, 12, max_len=40)  # lengths 2-40: padding inside every batch
  kw = dict(length_buckets=(16, 64), batch_buckets=(4,), compiler_options=FAST_COMPILE)
  dense = engine_lib.DenseEngine(CFG, params, **kw).predict(rows)
  cls = cls_last_layer.ClsDenseEngine(CFG, params, **kw).predict(rows)
  np.testing.assert_allclose(cls['logits'], dense['logits'], atol=1e-5)
  np.testing.assert_array_equal(cls['labels'], dense['labels'])
  for k in ('exit_layer', 'n_attn', 'n_ffn'):
    np.testing.assert_array_equal(cls[k], dense[k])


def _res(n_attn_NxL, n_ffn_NxL, cfg=CFG, exit_logits_NxExC=None):
  n = len(n_attn_NxL)
  res = {'logits': np.zeros((n, cfg.num_labels), np.float32), 'labels': np.zeros(n, np.int64),
         'lengths': np.asarray(n_attn_NxL)[:, 0], 'n_attn': np.asarray(n_attn_NxL),
         'n_ffn': np.asarray(n_ffn_NxL)}
  if exit_logits_NxExC is not None:
    res['exit_logits'] = np.asarray(exit_logits_NxExC, np.float32)
  return res


def test_cls_count_credits_no_pruning_of_the_last_layers_ffn():
  full = np.full((3, CFG.num_layers), 20)
  assert cls_last_layer.cls_flops_speedup(CFG, _res(full, full), 0.0, None) == (
      pytest.approx(1.0), pytest.approx(1.0))
  ffn = full.copy()
  ffn[:, -1] = 5  # only the last layer's FFN pruned: nothing [CLS]'s answer needed
  spec, cls = cls_last_layer.cls_flops_speedup(CFG, _res(full, ffn), 0.0, None)
  assert spec > 1.0 and cls == pytest.approx(1.0)
  attn = full.copy()
  attn[:, -1] = ffn[:, -2] = 5  # fewer tokens into the last layer: its keys and values shrink
  spec, cls = cls_last_layer.cls_flops_speedup(CFG, _res(attn, ffn), 0.0, None)
  assert spec > cls > 1.0


def test_cls_count_credits_only_the_rows_that_ran_the_last_layer():
  full = np.full((3, CFG.num_layers), 20)
  exit_NxExC = np.zeros((3, CFG.num_layers - 1, CFG.num_labels))
  exit_NxExC[0, 0, 0] = 50.0  # row 0 is sure at layer 1 (u ~ 0) and exits there at tau 0.5
  before = cls_last_layer.cls_flops_speedup(CFG, _res(full, full, exit_logits_NxExC=exit_NxExC),
                                            0.5, None)
  assert before[0] > 1.0
  cut = full.copy()
  cut[0, -1] = 3  # the exited row's last-layer counts: a layer it never ran
  after = cls_last_layer.cls_flops_speedup(CFG, _res(full, cut, exit_logits_NxExC=exit_NxExC),
                                           0.5, None)
  assert after == pytest.approx(before)
  cut[1, -1] = 3  # a row that answered at the last layer: its FFN pruning counts in SPEC §5 only
  spec, cls = cls_last_layer.cls_flops_speedup(CFG, _res(full, cut, exit_logits_NxExC=exit_NxExC),
                                               0.5, None)
  assert spec > before[0] and cls == pytest.approx(before[1])


def test_cls_count_is_against_the_unpruned_model():
  cfg = CFG.replace(num_layers=2, unpruned_layers=4)  # static: half the layers of its model
  n = 20
  full = np.full((2, cfg.num_layers), n)
  layer, last = flops.model_layer_macs(cfg, n, n), cls_last_layer.last_layer_macs(cfg, n)
  spec, cls = cls_last_layer.cls_flops_speedup(cfg, _res(full, full, cfg), 0.0, None)
  assert spec == pytest.approx(2.0)
  assert cls == pytest.approx((3 * layer + last) / (layer + last))


def test_last_layer_macs_are_a_full_layers_for_one_token_plus_keys_and_values():
  d, a = CFG.hidden_size, CFG.attention_size
  full_1 = flops.model_layer_macs(CFG, 1, 1)
  assert cls_last_layer.last_layer_macs(CFG, 1) == pytest.approx(full_1)
  assert (cls_last_layer.last_layer_macs(CFG, 11) - cls_last_layer.last_layer_macs(CFG, 1)
          == pytest.approx(10 * (2 * d * a + 2 * a)))

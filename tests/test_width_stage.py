"""The width stage (training/slim.py): masks, Taylor importance, cuts, joint loss, slicing."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import base
from mp_jax.model import bert, flops, width
from mp_jax.training import checkpoint, slim, stages, trainer
from tests import tiny
from tests.conftest import make_batch, tiny_config

CFG = tiny_config(intermediate_size=12)  # 3 layers, 4 heads of 8, 12 FFN neurons, 3 labels
TC = base.build('smoke,method=costeff').train


def _batch(seed):
  ids, types, mask = make_batch([16, 9, 5, 12], 16, CFG.vocab_size, seed=seed)
  return {'input_ids': ids, 'token_type_ids': types, 'attention_mask': mask,
          'labels': np.asarray([0, 1, 2, 1]), 'weights': np.ones(4, np.float32)}


def _setup(total, cycles=3, head_keep=0.5, ffn_keep=0.5, teacher=False):
  """(jitted step, state, frozen, plan) of a width stage on the tiny model."""
  params = bert.init_params(CFG, 0)
  c = base.build(f'smoke,method=costeff,train.width_cycles={cycles},'
                 f'model.head_keep={head_keep},model.ffn_keep={ffn_keep}')
  train_p, frozen = stages.split(params, 'width')
  tx, state, kw = slim.setup(CFG, train_p, total, c)
  if teacher:
    frozen = dict(frozen, **{stages.TEACHER: params})
  step = jax.jit(trainer.make_step(CFG, 'costeff', 'width', c.train, tx,
                                   teacher_cfg=CFG if teacher else None, **kw))
  return step, state, frozen, kw['plan']


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree))


def _pruned(units, flat):
  """{flat path: boolean array} of the weights the dead units own (shapes from `flat`)."""
  fac = width.unit_factors(1.0 - units['heads_LxH'], 1.0 - units['ffn_LxF'], CFG)
  return {k: np.broadcast_to(np.asarray(v) > 0, flat[k].shape) for k, v in fac.items()}


def test_pruned_units_get_zero_gradient_and_stay_zero():
  step, state, frozen, plan = _setup(total=40, cycles=2)  # cuts after steps 10 and 20
  assert plan.cuts == (10, 20)
  rng = jax.random.PRNGKey(0)
  for i in range(13):
    state, m = step(state, frozen, _batch(i), rng)
    assert bool(m['finite'])
  units = jax.device_get(state['units'])
  before = _flat(state['params'])
  dead = _pruned(units, before)
  assert all(d.any() and not d.all() for d in dead.values())
  for k, d in dead.items():
    assert np.all(before[k][d] == 0), k  # zeroed at the cut, still zero 3 steps later
  # The masked loss gives them no gradient; the alive units' weights keep moving.
  cfg_kw = dict(model=bert.MagicPyramid(CFG), method='costeff', stage='width', tc=TC)
  loss = lambda p: stages.loss_fn(width.masked(p, units['heads_LxH'], units['ffn_LxF'], CFG),
                                  frozen, _batch(99), rng, **cfg_kw)[0]
  g = _flat(jax.grad(loss)(state['params']))
  for k, d in dead.items():
    assert np.all(g[k][d] == 0) and np.abs(g[k][~d]).sum() > 0, k
  for i in range(3):
    state, _ = step(state, frozen, _batch(20 + i), rng)
  after = _flat(state['params'])
  for k, d in dead.items():
    assert np.all(after[k][d] == 0) and not np.array_equal(after[k][~d], before[k][~d]), k


def test_accumulated_importance_is_width_scores_summed_over_the_batches():
  step, state, frozen, _ = _setup(total=100)  # no cut in the first steps
  # Head 1 and neurons 0, 5 dead in every layer, their raw weights left non-zero: they score 0
  # (masked weights, zero gradient), the alive ones sum their scores over the three batches.
  heads_LxH = np.ones((3, 4), np.float32)
  heads_LxH[:, 1] = 0
  ffn_LxF = np.ones((3, 12), np.float32)
  ffn_LxF[:, [0, 5]] = 0
  state['units'] = dict(state['units'], heads_LxH=heads_LxH, ffn_LxF=ffn_LxF)
  alive_h = np.tile([0, 2, 3], (3, 1))
  alive_f = np.tile([i for i in range(12) if i not in (0, 5)], (3, 1))
  kw = dict(model=bert.MagicPyramid(CFG), method='costeff', stage='width', tc=TC)
  rng = jax.random.PRNGKey(3)
  want_h, want_f = np.zeros((3, 4)), np.zeros((3, 12))
  for i in range(3):
    full = stages.merge(jax.device_get(state['params']), frozen)
    p_m, _ = stages.split(width.mask_params(full, CFG, alive_h, alive_f), 'width')
    g = jax.grad(lambda p, i=i: stages.loss_fn(p, frozen, _batch(i), jax.random.fold_in(rng, i),
                                               **kw)[0])(p_m)
    want_h += width.head_scores(p_m, jax.device_get(g), CFG)
    want_f += width.ffn_scores(p_m, jax.device_get(g), CFG)
    state, _ = step(state, frozen, _batch(i), rng)
  got = jax.device_get(state['units'])
  np.testing.assert_allclose(got['head_imp_LxH'], want_h, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(got['ffn_imp_LxF'], want_f, rtol=1e-4, atol=1e-9)
  assert np.all(want_h[:, 1] == 0) and np.all(want_f[:, [0, 5]] == 0) and want_h.min(
      initial=1, where=heads_LxH > 0) > 0


def test_cut_schedule_keeps_the_geometric_fractions_and_never_revives():
  total, cycles = 12, 3
  step, state, frozen, plan = _setup(total=total, cycles=cycles, head_keep=0.5, ffn_keep=0.25)
  assert plan.cuts == (2, 4, 6)
  assert plan.heads == tuple(max(1, round(0.5 ** (c / 3) * 4)) for c in range(4)) == (4, 3, 3, 2)
  assert plan.neurons == (12, 8, 5, 3)
  prev_h, prev_f = np.ones((3, 4), bool), np.ones((3, 12), bool)
  for s in range(1, total + 1):
    state, m = step(state, frozen, _batch(s), jax.random.PRNGKey(0))
    u = jax.device_get(state['units'])
    h, f = u['heads_LxH'] > 0, u['ffn_LxF'] > 0
    c = sum(cut <= s for cut in plan.cuts)
    assert (h.sum(1) == plan.heads[c]).all() and (f.sum(1) == plan.neurons[c]).all(), s
    assert not (h & ~prev_h).any() and not (f & ~prev_f).any(), s  # no unit comes back
    if s in plan.cuts:
      assert not u['head_imp_LxH'].any()  # importance starts afresh after a cut
    prev_h, prev_f = h, f
  # The learning rate starts its warmup again at every cut.
  lr = stages.schedule(1.0, total, 0.5, plan.cuts)
  assert [float(lr(s)) for s in (0, 1, 2, 3, 4, 5, 6, 9)] == [0, 1, 0, 1, 0, 1, 0, 1]


def test_a_cut_keeps_the_best_alive_units_as_width_select_would():
  rng = np.random.default_rng(0)
  imp_LxK = rng.random((3, 10)).astype(np.float32)
  alive_LxK = np.ones((3, 10), np.float32)
  alive_LxK[:, [1, 4, 7]] = 0
  imp_LxK[:, 4] = 9.0  # dead and "important": stays dead
  got = np.asarray(slim.keep_best(imp_LxK, alive_LxK, 4)) > 0
  idx = np.asarray([0, 2, 3, 5, 6, 8, 9])
  want = idx[width.select(imp_LxK[:, idx], 4 / 7)]
  assert [np.flatnonzero(r).tolist() for r in got] == want.tolist()


def test_joint_loss_trains_every_exit_and_the_backbone_through_them():
  params = bert.init_params(CFG, 0)
  train_p, frozen = stages.split(params, 'width')
  batch, rng = _batch(0), jax.random.PRNGKey(0)
  kw = dict(model=bert.MagicPyramid(CFG), tc=TC, method='costeff')
  g = jax.grad(lambda p: stages.loss_fn(p, frozen, batch, rng, stage='width', **kw)[0])(train_p)
  for l in range(CFG.num_layers - 1):
    assert float(jnp.abs(g[f'exit_{l}']['logits']['kernel']).sum()) > 0, l
  # The classifier's share alone would be 1/L of the fine-tuning gradient; the exits add more.
  ft_p, ft_frozen = stages.split(params, 'finetune')
  g_ft = jax.grad(lambda p: stages.loss_fn(p, ft_frozen, batch, rng, stage='finetune',
                                           **kw)[0])(ft_p)
  np.testing.assert_allclose(g['classifier']['kernel'], g_ft['classifier']['kernel'] / 3,
                             rtol=1e-4, atol=1e-7)
  k = ('layer_0', 'intermediate', 'dense', 'kernel')
  a, b = _flat(g)[k], _flat(g_ft)[k] / 3
  assert np.abs(a - b).max() > 1e-3 * np.abs(b).max()
  # With KD the frozen fine-tuned teacher gets no gradient.
  fz = dict(frozen, **{stages.TEACHER: params})
  (val, m), g_t = jax.value_and_grad(
      lambda t: stages.loss_fn(train_p, dict(fz, **{stages.TEACHER: t}), batch, rng,
                               stage='width', teacher=bert.MagicPyramid(CFG), **kw),
      has_aux=True)(params)
  assert np.isfinite(val) and float(m['kd']) > 0
  assert float(val) == pytest.approx((1 - TC.width_kd) * float(m['exit_ce'])
                                     + TC.width_kd * float(m['kd']), rel=1e-5)
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(g_t))


def test_stage_end_slices_to_the_masked_model_and_a_finished_stage_rebuilds_it(tmp_path):
  c = tiny.config(tmp_path, 'method=costeff,smoke', **{'model.embedding_rank': 16,
                                                       'data.length_buckets': (64,)})
  ds, cfg, params, tok = trainer.build(c)
  enc = trainer.encode_splits(ds, tok, cfg.max_seq_length)
  log = trainer.MetricsLog(tmp_path / 'm.jsonl')
  r_cfg, r_params = slim.prepare(cfg, params, 16)
  masked = trainer.run_stage(c, tmp_path / 'w', 'width', r_cfg, r_params, enc, log)
  s_cfg, s_params = slim.apply(r_cfg, masked, tmp_path / 'w' / 'width')
  assert (s_cfg.num_heads, s_cfg.intermediate_size, s_cfg.embedding_rank) == (2, 64, 16)
  assert s_cfg.unpruned() == cfg  # FLOPs and timings count against the fine-tuned model
  rec = json.loads((tmp_path / 'w' / 'width' / checkpoint.DONE).read_text())
  assert np.asarray(rec['heads']).shape == (3, 2) and np.asarray(rec['neurons']).shape == (3, 64)
  ids, types, mask = make_batch([40, 17, 64, 5], 64, cfg.vocab_size)
  run = lambda k, p: bert.MagicPyramid(k).apply({'params': p}, ids, types, mask, exits=True)
  (z_m, aux_m), (z_s, aux_s) = run(r_cfg, masked), run(s_cfg, s_params)
  np.testing.assert_allclose(z_s, z_m, atol=1e-5)
  np.testing.assert_allclose(aux_s['exit_logits'], aux_m['exit_logits'], atol=1e-5)
  # Run again: the stage is done; the checkpoint and done.json give the same slim model.
  again = trainer.run_stage(c, tmp_path / 'w', 'width', r_cfg, r_params, enc, log)
  a_cfg, a_params = slim.apply(r_cfg, again, tmp_path / 'w' / 'width')
  assert a_cfg == s_cfg
  for (k, x), y in zip(_flat(a_params).items(), _flat(s_params).values(), strict=True):
    np.testing.assert_array_equal(x, y, err_msg=str(k))


def test_width_config_keys_are_checked_by_name_and_kept_off_the_initial_model(tmp_path):
  for item, key in (('model.head_keep=0', 'model.head_keep'),
                    ('model.ffn_keep=1.5', 'model.ffn_keep'),
                    ('model.embedding_rank=-1', 'model.embedding_rank'),
                    ('train.width_cycles=0', 'train.width_cycles'),
                    ('train.width_kd=2.0', 'train.width_kd')):
    with pytest.raises(ValueError, match=key):
      base.build(f'method=pyramid,{item}')
  c = tiny.config(tmp_path, 'method=costeff,smoke', **{'model.embedding_rank': 8})
  assert not set(trainer.model_overrides(c)) & {
      'num_heads', 'intermediate_size', 'head_size', 'embedding_rank', 'unpruned_heads',
      'unpruned_intermediate_size', 'unpruned_layers'}
  with pytest.raises(ValueError, match='model.embedding_rank must be in'):
    slim.prepare(tiny_config(), bert.init_params(tiny_config()), 32)
  # A rank the model cannot take fails when the model is built, before any fine-tuning.
  big = tiny.config(tmp_path, 'method=costeff,smoke', **{'model.embedding_rank': 4096})
  with pytest.raises(ValueError, match='embedding_rank=4096 must be < the model'):
    trainer.build(big)


# costeff and pyramid end to end (run.py: linked width stage, slim finals, 2x at tau 0):
# tests/test_experiments.py's smoke reproduction; through train.py with kills: tests/test_faults.py.


def test_the_stages_dev_flops_are_counted_at_the_alive_widths():
  """The masked full-shape model's FLOPs are the sliced model's (slim.counted), not 1x."""
  units = slim.init_units(CFG)
  units['heads_LxH'][:, 1::2] = 0.0  # half the heads
  units['ffn_LxF'][:, :CFG.intermediate_size // 2] = 0.0
  c = slim.counted(CFG, units)
  _, sliced = width.slice_params(bert.init_params(CFG), CFG,
                                 np.tile(np.arange(0, CFG.num_heads, 2), (CFG.num_layers, 1)),
                                 np.tile(np.arange(CFG.intermediate_size // 2,
                                                   CFG.intermediate_size), (CFG.num_layers, 1)))
  assert c == sliced and c.unpruned() == CFG
  n = np.full((2, CFG.num_layers), 7)
  assert flops.summarize(c, n, n)['flops_speedup'] > 1.5  # 1.0 if counted at full width

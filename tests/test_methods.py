"""mp_jax.methods: the one table of methods -> stages -> pruning and exit modes (SPEC §4)."""

import pytest

from configs import base
from mp_jax import methods


def test_every_method_runs_a_subsequence_of_the_stage_order():
  assert set(methods.STAGES) == set(methods.METHODS)
  for method, stages in methods.STAGES.items():
    idx = [methods.ORDER.index(s) for s in stages]
    assert idx == sorted(idx) and stages[0] == 'finetune', method


@pytest.mark.parametrize('method, stage, want', [
    ('bert', 'finetune', 'none'), ('ltp', 'soft', 'soft'), ('ltp', 'hard', 'hard'),
    ('fastbert', 'exits', 'none'), ('mp', 'exits', 'hard'),  # MP's exits train on the pruned model
    ('mp', 'calibrate', 'hard'), ('static', 'static', 'none'),
])
def test_pruning_mode_while_training(method, stage, want):
  assert methods.pruning_mode(method, stage) == want


def test_eval_modes_after_each_stage():
  assert [methods.eval_modes(m) for m in methods.METHODS] == [
      ('none', False), ('hard', False), ('none', True), ('hard', True), ('none', False)]
  assert methods.eval_modes('mp', 'finetune') == ('none', False)
  assert methods.eval_modes('mp', 'calibrate') == ('hard', False)
  assert methods.eval_modes('mp', 'soft') == ('hard', False)  # evaluation always hard-masks
  assert methods.eval_modes('mp', 'hard') == ('hard', False)
  assert [methods.has_exits(m) for m in methods.METHODS] == [False, False, True, True, False]


def test_shared_stages_are_the_common_prefix_with_mp():
  assert {m: methods.shared_stages(m) for m in methods.METHODS} == {
      'bert': ('finetune',), 'ltp': ('finetune', 'calibrate', 'soft', 'hard'),
      'fastbert': ('finetune',), 'mp': methods.STAGES['mp'], 'static': ('finetune',)}


def test_unknown_method_is_refused_by_name():
  with pytest.raises(ValueError, match="method must be one of .*got 'lpt'"):
    methods.check('lpt')
  with pytest.raises(ValueError, match="got 'lpt'"):
    base.build('method=lpt')

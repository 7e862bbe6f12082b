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
    ('costeff', 'width', 'none'), ('pyramid', 'width', 'none'), ('pyramid', 'soft', 'soft'),
    ('pyramid', 'exits', 'hard'),  # re-distilled on the pruned slim backbone, as mp does
])
def test_pruning_mode_while_training(method, stage, want):
  assert methods.pruning_mode(method, stage) == want


def test_eval_modes_after_each_stage():
  assert [methods.eval_modes(m) for m in methods.METHODS] == [
      ('none', False), ('hard', False), ('none', True), ('hard', True), ('none', False),
      ('none', True), ('hard', True)]
  assert methods.eval_modes('mp', 'finetune') == ('none', False)
  assert methods.eval_modes('mp', 'calibrate') == ('hard', False)
  assert methods.eval_modes('mp', 'soft') == ('hard', False)  # evaluation always hard-masks
  assert methods.eval_modes('mp', 'hard') == ('hard', False)
  assert [methods.has_exits(m) for m in methods.METHODS] == [
      False, False, True, True, False, True, True]
  # The width stage trains the exits with the backbone: costeff has exits without an exits stage,
  # and pyramid's heads are there (and evaluated) from its width stage on.
  assert methods.eval_modes('costeff', 'finetune') == ('none', False)
  assert methods.eval_modes('pyramid', 'width') == ('none', True)
  assert methods.eval_modes('pyramid', 'calibrate') == ('hard', True)


def test_shared_stages_are_the_common_prefix_with_mp():
  assert {m: methods.shared_stages(m) for m in methods.METHODS} == {
      'bert': ('finetune',), 'ltp': ('finetune', 'calibrate', 'soft', 'hard'),
      'fastbert': ('finetune',), 'mp': methods.STAGES['mp'], 'static': ('finetune',),
      'costeff': ('finetune',), 'pyramid': ('finetune',)}
  # pyramid shares costeff's width stage (the same fingerprint: tests/test_runs.py).
  assert methods.shared_stages('pyramid', base='costeff') == ('finetune', 'width')


def test_unknown_method_is_refused_by_name():
  with pytest.raises(ValueError, match="method must be one of .*got 'lpt'"):
    methods.check('lpt')
  with pytest.raises(ValueError, match="got 'lpt'"):
    base.build('method=lpt')
  assert base.build('method=costeff').method == 'costeff'
  assert base.build('method=pyramid,smoke').method == 'pyramid'


def test_axes_of_the_methods():
  assert {m: methods.axes(m) for m in methods.METHODS} == {
      'bert': (), 'static': (), 'ltp': ('length',), 'fastbert': ('depth',),
      'mp': ('length', 'depth'), 'costeff': ('depth', 'width'),
      'pyramid': ('length', 'depth', 'width')}

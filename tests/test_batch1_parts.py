"""experiments/batch1_parts.py: the kept fraction's factors, and its direct one-row calls."""

import types

import numpy as np
import pytest

from experiments import batch1_parts as bp
from mp_jax.serving import engine as engine_lib
from tests.test_engine import CFG, FAST_COMPILE, make_rows, random_params

GRID = dict(length_buckets=(16, 64), batch_buckets=(1, 8), compiler_options=FAST_COMPILE)


@pytest.fixture(scope='module')
def params():
  return random_params(CFG)


def _served(params, prune, tau):
  """What bp.forms reads of a served.Served: its engines at tau (plan: every head)."""
  def engine(**kw):
    return engine_lib.Engine(CFG, params, **{'prune': prune, 'exits': True, 'tau': tau,
                                             **GRID, **kw})
  return types.SimpleNamespace(engine=engine, dense=lambda: engine_lib.DenseEngine(
      CFG, params, **GRID))


@pytest.mark.parametrize('score', [True, False])
def test_the_factors_multiply_to_the_kept_fraction(score):
  sec = {'dense': 6.0, 'engine': 3.5, 'every head': 7.0, 'no head': 6.3,
         'predict engine': 3.8, 'predict dense': 6.4}
  if score:
    sec['no score'] = 6.1
  k_N = np.array([1, 2, 3, 3])  # mean 2.25 of 6 layers: the bound is 6 / 2.25
  f = bp.factors(sec, k_N, 6)
  assert f['layer bound'] == pytest.approx(6 / 2.25)
  assert f['kept'] == pytest.approx(6.0 / 3.5 / (6 / 2.25))
  assert f['score'] == (pytest.approx(6.1 / 6.3) if score else 1.0)
  assert f['conds'] * f['score'] * f['heads'] * f['per request'] == pytest.approx(f['kept'])
  assert f['kept through predict'] == pytest.approx(6.4 / 3.8 / (6 / 2.25))
  del sec['predict dense']
  assert 'host' not in bp.factors(sec, k_N, 6)


def test_a_direct_one_row_call_is_the_program_predict_calls(params):
  eng = engine_lib.Engine(CFG, params, prune=True, exits=True, tau=0.97, **GRID)
  zero_L = np.zeros(CFG.num_layers, np.float32)
  rows = make_rows(0, 6, max_len=40)
  assert {int(eng.predict([r])['exit_layer'][0]) for r in rows} == {1, 2}  # rows exit, not alike
  compiled = set(eng.programs)
  for row in rows:
    want = eng.predict([row])
    got = bp.one_row(eng, row, eng.halts())()
    np.testing.assert_array_equal(np.asarray(got['exit_layer'])[:1], want['exit_layer'])
    np.testing.assert_allclose(np.asarray(got['logits'])[:1], want['logits'], atol=1e-6)
    # halt 0: no head runs, every layer does (the "no head" form)
    none = bp.one_row(eng, row, zero_L)()
    assert int(np.asarray(none['exit_layer'])[0]) == CFG.num_layers
  assert set(eng.programs) == compiled  # no program of another shape than predict's


@pytest.mark.parametrize('prune', [True, False])
def test_the_forms_time_every_layer_where_they_should(params, prune):
  rows = make_rows(1, 4, max_len=40)
  fns, k_N, eng, dense = bp.forms(_served(params, prune, 0.97), rows)
  want = {'dense', 'engine', 'every head', 'no head', 'predict engine', 'predict dense'}
  assert set(fns) == want | ({'no score'} if prune else set())
  assert (k_N < CFG.num_layers).any()  # at tau 0.97 rows exit: the engine form is not dense
  assert eng.exits and eng.prune == prune and not (dense.prune or dense.exits)
  sec, ranges = bp.timed(fns, 2, k_N, CFG.num_layers)
  assert set(sec) == set(fns)
  assert ranges['kept'][0] <= ranges['kept'][1]


def test_a_tau_where_no_head_runs_is_refused(params):
  # Without pruning and with no head running, predict hands the rows to the dense program.
  with pytest.raises(SystemExit, match='no head runs'):
    bp.forms(_served(params, False, 0.0), make_rows(1, 2, max_len=40))

"""experiments/round_neighbours.py: which call precedes the engine, and the per-kind medians."""

import pytest

from experiments import round_neighbours as rn


def test_the_engine_follows_fused_only_in_kind_b():
  assert {k: rn.before(k, 'engine') for k in rn.KINDS} == {'A': 'dense', 'B': 'fused',
                                                            'C': 'dense'}
  assert rn.before('C', 'dense') == 'fused' and rn.before('A', 'dense') == 'engine'


def test_summary_takes_medians_per_kind():
  blocks = [{'kind': 'A', 'engine': 1.0, 'dense': 3.0, 'speedup': 3.0},
            {'kind': 'B', 'engine': 2.0, 'dense': 3.0, 'speedup': 1.5},
            {'kind': 'A', 'engine': 1.5, 'dense': 3.0, 'speedup': 2.0},
            {'kind': 'A', 'engine': 9.0, 'dense': 9.0, 'speedup': 1.0}]
  s = rn.summary(blocks)
  assert set(s) == {'A', 'B'}  # no block of kind C: no row
  assert s['A'] == {'blocks': 3, 'speedup': pytest.approx(2.0), 'engine_s': pytest.approx(1.5),
                    'dense_s': pytest.approx(3.0)}
  assert s['B']['speedup'] == pytest.approx(1.5)

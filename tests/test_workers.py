"""Per-core worker processes: same answers as the in-process engine, caller order, errors."""

import os

import numpy as np
import pytest

from mp_jax import engine as engine_lib
from mp_jax import workers
from tests.test_engine import CFG, FAST_COMPILE, make_rows, random_params, reference

KW = dict(length_buckets=(16, 64), batch_buckets=(2, 8), compiler_options=FAST_COMPILE)


def _broken_build(**kw):
  raise ValueError(f'cannot build from {sorted(kw)}')


@pytest.fixture(scope='module')
def params():
  p = random_params(CFG, seed=3)
  p['thresholds'] = np.full_like(p['thresholds'], 0.05)  # prunes some tokens
  return p


@pytest.fixture(scope='module')
def tau(params):
  """A tau at which some rows exit early and some do not."""
  return float(np.quantile(reference(params, make_rows(21, 16))['u'], 0.3))


@pytest.fixture(scope='module')
def pool(params, tau):
  core = sorted(os.sched_getaffinity(0))
  build_kw = dict(cfg=CFG, params=params, prune=True, exits=True, tau=tau, engine_kw=KW)
  with workers.WorkerPool(workers.build_engines, build_kw, cores=[core[0], core[-1]],
                          block=8) as p:
    yield p


def test_split_deals_sorted_blocks():
  p = workers.WorkerPool.__new__(workers.WorkerPool)
  p.cores, p.block = [0, 1], 3
  lengths = [5, 9, 1, 7, 3, 8, 2]
  parts = p.split(lengths)
  # Length-sorted: 9 8 7 | 5 3 2 | 1 -> whole blocks alternate, the last row goes to worker 0.
  assert [lengths[i] for i in parts[0]] == [9, 8, 7, 1]
  assert [lengths[i] for i in parts[1]] == [5, 3, 2]
  # 213 rows in blocks of 32 (bbc's test split): 6 whole blocks, the other 21 shared 11 / 10.
  p.block = 32
  parts = p.split(list(range(213)))
  assert [len(x) for x in parts] == [107, 106]
  assert sorted(np.concatenate(parts).tolist()) == list(range(213))
  p.cores = [0, 1, 2]
  assert [len(x) for x in p.split([4] * 5)] == [2, 2, 1]  # fewer rows than one block each


def test_pool_matches_in_process_engine(pool, params, tau):
  assert pool.names == ['dense', 'engine']
  rows = make_rows(21, 37, min_len=3)  # 5 blocks of 8: both workers get work
  eng = engine_lib.Engine(CFG, params, prune=True, exits=True, tau=tau, **KW)
  dense = engine_lib.DenseEngine(CFG, params, **KW)
  for name, local in (('engine', eng), ('dense', dense)):
    out, ref = pool.predict(name, rows), local.predict(rows)
    assert set(out) == set(ref)
    for k in ('labels', 'exit_layer', 'n_attn', 'n_ffn'):
      np.testing.assert_array_equal(out[k], ref[k], err_msg=f'{name} {k}')
    np.testing.assert_allclose(out['logits'], ref['logits'], atol=1e-5, rtol=0)
  out = pool.predict('engine', rows)
  assert (out['n_ffn'][:, 0] < out['n_attn'][:, 0]).any()  # pruning happened in the workers
  assert len(set(out['exit_layer'].tolist())) >= 2  # and rows exited at different layers


def test_pool_errors_are_reported_and_survived(pool):
  with pytest.raises(KeyError, match='no runner'):
    pool.predict('teacher', make_rows(0, 2))
  with pytest.raises(ValueError, match='no rows'):
    pool.predict('engine', [])
  with pytest.raises(RuntimeError, match='(?s)core.*largest length bucket'):
    pool.predict('engine', make_rows(1, 2, min_len=65, max_len=65))
  out = pool.predict('engine', make_rows(2, 3))  # the worker that failed still answers
  assert out['labels'].shape == (3,)


def test_failed_build_names_the_cause():
  with pytest.raises(RuntimeError, match='(?s)while starting.*cannot build from'):
    workers.WorkerPool(_broken_build, {'x': 1}, cores=[sorted(os.sched_getaffinity(0))[0]])

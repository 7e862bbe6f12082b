"""Serving shapes per platform (mp_jax/serving/shapes.py): defaults, config overrides, cuts."""

import pathlib
import subprocess
import sys

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from configs import base
from experiments import warmup
from mp_jax.model import bert
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import predictor, shapes
from tests import conftest

ACCEL = (shapes.ACCEL_LENGTHS, shapes.BATCH_BUCKETS, shapes.ACCEL_CHUNK_TOKENS)
ROOT = str(pathlib.Path(__file__).resolve().parents[1])
CPU = (shapes.CPU_LENGTHS, shapes.BATCH_BUCKETS, shapes.CPU_CHUNK_TOKENS)


def _tuple(s):
  return (s.length_buckets, s.batch_buckets, s.chunk_tokens)


@pytest.mark.parametrize('platform,want', [('cpu', CPU), ('gpu', ACCEL), ('cuda', ACCEL),
                                           ('tpu', ACCEL), ('TPU', ACCEL)])
def test_defaults_per_platform(platform, want):
  assert _tuple(shapes.defaults(platform)) == want
  assert _tuple(shapes.resolve(base.defaults().eval, platform)) == want


def test_engine_takes_the_platform_defaults(monkeypatch):
  cfg = conftest.tiny_config(max_position_embeddings=512)
  params = bert.init_params(cfg)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  eng = engine_lib.Engine(cfg, params)
  assert (eng.length_buckets, eng.batch_buckets, eng.chunk_tokens) == ACCEL
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  eng = engine_lib.Engine(cfg, params, chunk_tokens=64)  # an explicit value wins
  assert (eng.length_buckets, eng.batch_buckets, eng.chunk_tokens) == CPU[:2] + (64,)


def test_platform_comes_from_the_backend(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  assert _tuple(shapes.resolve(base.defaults().eval)) == ACCEL
  p = predictor.Predictor(conftest.tiny_config(max_seq_length=64), {}, None, ['a', 'b'])
  assert (p.grid.length_buckets, p.grid.chunk_tokens) == ((32, 64), 0)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert _tuple(shapes.resolve(base.defaults().eval)) == CPU


def test_explicit_values_win(monkeypatch):
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')
  c = base.build('eval.chunk_tokens=512')
  c.eval.length_buckets = (64, 16)
  assert _tuple(shapes.resolve(c.eval)) == ((16, 64), shapes.BATCH_BUCKETS, 512)
  c = base.build('smoke')  # smoke pins its shapes on every platform
  assert _tuple(shapes.resolve(c.eval)) == ((16, 32, 64), (16,), shapes.ACCEL_CHUNK_TOKENS)
  # A workdir's config.json (lists, nulls) resolves the same way.
  assert shapes.resolve({'length_buckets': [128, 32], 'batch_buckets': None,
                         'chunk_tokens': 0}, 'cpu') == shapes.Serving((32, 128), (1, 8, 32), 0, 256)


def test_schedule_max_length_per_platform_and_in_the_engine():
  """Layer-major up to 256 tokens on CPU, never on GPU/TPU; a set value (0: off) wins."""
  assert shapes.resolve({}, 'cpu').schedule_max_length == shapes.CPU_SCHEDULE_MAX_LENGTH == 256
  for accel in ('tpu', 'gpu'):
    assert shapes.resolve({}, accel).schedule_max_length == 0
  assert shapes.resolve({'schedule_max_length': 16}, 'tpu').schedule_max_length == 16
  grid = shapes.for_model(shapes.resolve({'schedule_max_length': 16}, 'cpu'), 32)
  assert grid.engine_kw()['schedule_max_length'] == 16
  cfg = conftest.tiny_config(max_seq_length=32)
  params = conftest.peaky_params(cfg)
  eng = engine_lib.Engine(cfg, params, **grid.engine_kw())
  assert eng.schedule.lbs == (2, 4, 6, 8, 10, 12, 14, 16)  # the grid's buckets up to 16
  off = shapes.for_model(shapes.resolve({'schedule_max_length': 0}, 'cpu'), 32)
  assert engine_lib.Engine(cfg, params, **off.engine_kw()).schedule is None


def test_command_line_overrides_parse():
  argv = ['prog', f'--config={ROOT}/configs/qqp.py', '--config.eval.chunk_tokens=512',
          '--config.eval.length_buckets=(32, 64, 128)']
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'x', flag_values=fv, lock_config=True,
                                  sys_argv=argv)  # override flags are made from this argv
  fv(argv)
  c = fv['config'].value
  assert (c.eval.chunk_tokens, tuple(c.eval.length_buckets)) == (512, (32, 64, 128))
  assert c.eval.batch_buckets is None


@pytest.mark.parametrize('platform,want', [('cpu', shapes.CPU_TRAIN_LENGTHS), ('tpu', ACCEL[0]),
                                           ('gpu', ACCEL[0])])
def test_training_lengths_follow_the_platform_unless_set(platform, want, monkeypatch):
  data = base.defaults().data
  assert data.length_buckets is None
  assert shapes.train_lengths(data, platform) == want
  monkeypatch.setattr(jax, 'default_backend', lambda: platform)
  assert shapes.train_lengths(data) == want
  data.length_buckets = (64, 16)
  assert shapes.train_lengths(data, platform) == (16, 64)
  assert shapes.train_lengths({'length_buckets': [128, 32]}, platform) == (32, 128)  # config.json
  assert shapes.train_lengths(base.build('smoke').data, platform) == (16, 32, 64)
  with pytest.raises(ValueError, match=r'config.data.length_buckets must be a non-empty'):
    shapes.train_lengths({'length_buckets': (0, 8)}, platform)
  argv = ['prog', f'--config={ROOT}/configs/mr.py', '--config.data.length_buckets=(64,)']
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'x', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  assert shapes.train_lengths(fv['config'].value.data, platform) == (64,)


@pytest.mark.parametrize('key,value,match', [
    ('chunk_tokens', 'many', 'config.eval.chunk_tokens must be an int'),
    ('length_buckets', (), 'config.eval.length_buckets must be a non-empty'),
    ('batch_buckets', (0, 8), 'config.eval.batch_buckets must be a non-empty'),
    ('length_buckets', ('a',), 'config.eval.length_buckets'),
    ('schedule_max_length', -1, r'config.eval.schedule_max_length must be an int >= 0'),
    ('schedule_max_length', True, r'config.eval.schedule_max_length must be an int >= 0')])
def test_bad_values(key, value, match):
  with pytest.raises(ValueError, match=match):
    shapes.resolve({key: value}, 'cpu')


@pytest.mark.parametrize('max_len, batch, lengths, batches', [
    (128, None, (8, 64, 128), (1, 8, 32)),  # batch None: the grid's own batch buckets
    (100, 16, (8, 64, 100), (1, 8, 16)),  # a top that is no bucket is added
    (64, 64, (8, 64), (1, 8, 32, 64)),
    (4, 1, (4,), (1,)),
])
def test_for_model_cuts_the_grid_at_the_model_and_the_batch(max_len, batch, lengths, batches):
  grid = shapes.Serving((8, 64, 256), (1, 8, 32), 512)
  got = shapes.for_model(grid, max_len, batch)
  assert (got.length_buckets, got.batch_buckets, got.chunk_tokens) == (lengths, batches, 512)


def test_unknown_platform():
  with pytest.raises(ValueError, match="unknown platform 'metal'"):
    shapes.defaults('metal')


def test_configs_import_no_jax():
  code = ('import sys, importlib\n'
          'for n in ("base", "mr", "bbc", "qqp", "mrpc", "rte", "ag_news", "yelp"):\n'
          '  importlib.import_module("configs." + n).get_config("")\n'
          'import mp_jax.serving.shapes\n'
          'print(sorted(m for m in sys.modules if m == "jax" or m.startswith("jax.")))\n')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=ROOT)
  assert out.stdout.strip() == '[]', out.stdout


def test_warm_compiles_each_program_once():
  """The measurement's guard: with the persistent cache off, every program is one XLA compile."""
  cfg = conftest.tiny_config(num_layers=2)
  old = jax.config.jax_enable_compilation_cache
  try:
    assert warmup.disable_compilation_cache()['jax_enable_compilation_cache'] is False
    eng = engine_lib.Engine(cfg, conftest.peaky_params(cfg), length_buckets=(8, 16),
                            batch_buckets=(2,), chunk_tokens=0,
                            compiler_options={'xla_backend_optimization_level': 0})
    rows = warmup.warm(eng)
  finally:
    jax.config.update('jax_enable_compilation_cache', old)
  assert [(r['batch'], r['length'], r['branches']) for r in rows] == [(2, 8, 1), (2, 16, 2)]
  assert all(r['backend_compiles'] == 1 and r['argument_size_in_bytes'] > 0 for r in rows)
  assert warmup.summary(rows)['programs'] == 2

"""Every program we run lowers for TPU and CUDA (jax.export needs no such device) in float32 and
bfloat16: the train step of each stage and each engine / dense-engine program, on smoke shapes.

A program that needs the host (a Python callback, host offloading) fails here: jax.export cannot
lower a callback for an absent platform, and `host_only` rejects any custom call outside the
device-side allowlist in the module text.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export as jax_export

from configs import base
from mp_jax import methods
from mp_jax.model import bert
from mp_jax.model import config as model_config
from mp_jax.serving import engine as engine_lib
from mp_jax.training import stages, trainer

PLATFORMS = ('tpu', 'cuda')
CASES = [pytest.param(p, d, id=f'{p}-{d}') for p in PLATFORMS for d in model_config.DTYPES]
B, T = 4, 16
# Custom calls that stay on the device: sharding annotations. Anything else (Python callbacks
# `xla_python_cpu_callback` / `xla_ffi_python_*_callback`, host offloading `MoveToHost`, ...)
# is host-only or unknown and fails the test.
DEVICE_CUSTOM_CALLS = frozenset({'Sharding', 'SPMDFullToShardShape', 'SPMDShardToFullShape'})
HOST_MARKERS = ('"pinned_host"', '"unpinned_host"', '_xla_compute_type = "host"')
ENGINE_KW = dict(batch_buckets=(1, B), length_buckets=(8, T), schedule_max_length=T)
# 32: row chunks (a lax.map) in the (B, T) programs, as on CPU; 0: none, the GPU/TPU default.
CHUNKS = (32, 0)


def tiny_config(dtype):
  """Smoke-sized pruning + exits model."""
  return model_config.ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, num_heads=4,
                                  intermediate_size=64, max_position_embeddings=64,
                                  max_seq_length=T, exit_width=16, dtype=dtype)


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


@functools.lru_cache
def abstract_params(dtype):
  ids = jnp.zeros((1, 4), jnp.int32)
  return jax.eval_shape(lambda: bert.MagicPyramid(tiny_config(dtype)).init(
      jax.random.PRNGKey(0), ids, ids, ids + 1, exits=True))['params']


def host_only(mlir_text):
  """Custom-call targets not known to run on the device, and host memory / compute markers."""
  targets = set(re.findall(r'custom_call\s*@([\w.$-]+)', mlir_text)) - DEVICE_CUSTOM_CALLS
  return targets | {m for m in HOST_MARKERS if m in mlir_text}


def lower(fn_jit, platform, *args):
  """jax.export of `fn_jit` for `platform`; asserts the module is device-only."""
  exported = jax_export.export(fn_jit, platforms=[platform])(*args)
  assert exported.platforms == (platform,)
  assert not host_only(exported.mlir_module()), host_only(exported.mlir_module())
  return exported


TRAINED = tuple(s for s in methods.ORDER if s != 'calibrate')  # calibrate has no train step


@functools.lru_cache
def train_steps(dtype):
  """(stage, jitted step, abstract args) for every stage with a train step, as run_stage jits it."""
  config = base.defaults()
  cfg, tc = tiny_config(dtype), config.train
  i32 = jax.ShapeDtypeStruct((B, T), jnp.int32)
  batch = {'input_ids': i32, 'token_type_ids': i32, 'attention_mask': i32,
           'labels': jax.ShapeDtypeStruct((B,), jnp.int32),
           'weights': jax.ShapeDtypeStruct((B,), jnp.float32)}
  out = []
  for stage in TRAINED:
    method = {'static': 'static', 'width': 'costeff'}.get(stage, 'mp')
    s_cfg, params, teacher = cfg, abstract_params(dtype), None
    if stage == 'static':
      box = {}

      def student(p, box=box):
        box['cfg'], q = trainer.static_student(cfg, p)
        return q
      teacher, params = (cfg, params), jax.eval_shape(student, params)
      s_cfg = box['cfg']
    train_p, frozen = stages.split(params, stage)
    if stage == 'width':  # with its distillation from the fine-tuned model (train.width_kd)
      teacher = (cfg, params)
    if teacher is not None:
      frozen = dict(frozen, **{stages.TEACHER: teacher[1]})
    setup = {}

    def initial(p, stage=stage, s_cfg=s_cfg, setup=setup):  # as run_stage makes it, abstractly
      setup['tx'], state, setup['kw'] = trainer.stage_setup(stage, s_cfg, p, 100, config)
      return state
    state = jax.eval_shape(initial, train_p)
    step = jax.jit(trainer.make_step(s_cfg, method, stage, tc, setup['tx'], target=0.5,
                                     teacher_cfg=teacher and teacher[0], **setup['kw']),
                   donate_argnums=0)
    out.append((stage, step, (state, frozen, batch, abstract(jax.random.PRNGKey(0)))))
  return out


@functools.lru_cache
def engines(dtype, chunk_tokens):
  """A pruning + exits Engine and a DenseEngine (zero params: only shapes matter here)."""
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(dtype))
  cfg, kw = tiny_config(dtype), dict(ENGINE_KW, chunk_tokens=chunk_tokens)
  return (engine_lib.Engine(cfg, params, prune=True, exits=True, **kw),
          engine_lib.DenseEngine(cfg, params, **kw))


def programs(eng):
  """The fused (batch, length) programs that `eng.warmup()` compiles."""
  return eng.program_shapes()


@pytest.mark.parametrize('platform,dtype', CASES)
def test_train_step_of_every_stage_lowers(platform, dtype):
  steps = train_steps(dtype)
  assert [s for s, _, _ in steps] == list(TRAINED)
  for stage, step, args in steps:
    exported = lower(step, platform, *args)
    # Parameters, optimizer state and metrics stay float32 in every dtype.
    out = jax.tree.leaves(jax.tree.unflatten(exported.out_tree, exported.out_avals))
    floats = {a.dtype for a in out if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floats == {jnp.dtype('float32')}, (stage, floats)
    if dtype == 'bfloat16':
      assert 'bf16' in exported.mlir_module(), stage


@pytest.mark.parametrize('platform,dtype', CASES)
def test_every_engine_program_lowers(platform, dtype):
  for e in (e for c in CHUNKS for e in engines(dtype, c)):
    assert programs(e) == [(1, 8), (1, T), (B, 8), (B, T)]
    for b, t in programs(e):
      ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
      exported = lower(e._jitted, platform, abstract(e.operands(b, t)), ids, ids, ids,
                       jax.ShapeDtypeStruct((e.cfg.num_layers,), jnp.float32))
      out = jax.tree.unflatten(exported.out_tree, exported.out_avals)
      assert out['logits'].dtype == out['probs'].dtype == jnp.float32
      assert ('bf16' in exported.mlir_module()) == (dtype == 'bfloat16')


@pytest.mark.parametrize('platform,dtype', CASES)
def test_every_schedule_program_lowers(platform, dtype):
  """The layer-major schedule's programs (embed, layer per bucket pair), buffers donated."""
  eng = engines(dtype, 0)[0]
  keys = eng.schedule.keys()
  assert len(keys) == 2 * len(eng.batch_buckets) * len(eng.length_buckets)
  for key in keys:
    fn, args = eng.schedule.jitted(eng.params, *key)
    exported = lower(fn, platform, *args)
    out = jax.tree.leaves(jax.tree.unflatten(exported.out_tree, exported.out_avals))
    h = out[0]  # the row buffer comes back in place, in the compute dtype
    assert h.shape == args[{'embed': 1, 'layer': 6}[key[0]]].shape
    assert h.dtype == jnp.dtype(dtype)


def test_host_only_programs_fail():
  """The checks can fail: a Python callback does not lower for TPU/CUDA, and on CPU (where it
  lowers, though jax.export refuses it) its custom call is reported as host-only."""
  fn = jax.jit(lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct((4,), jnp.float32), x))
  x = jax.ShapeDtypeStruct((4,), jnp.float32)
  for platform in PLATFORMS:
    with pytest.raises(ValueError, match='lowering platform'):
      lower(fn, platform, x)
  with pytest.raises(NotImplementedError, match='host_callbacks'):
    lower(fn, 'cpu', x)
  text = fn.trace(x).lower(lowering_platforms=('cpu',)).as_text()
  assert host_only(text) & {'xla_python_cpu_callback', 'xla_ffi_python_cpu_callback'}
  assert not host_only(jax.jit(jnp.sin).trace(x).lower(lowering_platforms=('cpu',)).as_text())

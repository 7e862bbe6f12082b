"""Compiled inference, host side: programs per (batch, length) bucket, scheduling, answers.

`Engine.predict` runs a call's requests of at most `schedule_max_length` tokens layer-major when
there are several and rows can exit (exits, a head running at tau) or shrink (pruning):
mp_jax.serving.schedule, where exited rows leave at once and the rest regroup by length between
layers. Which heads run at a tau is the exit plan's (mp_jax.model.exit_plan; every head without
one); an engine with exits but no pruning runs the dense program when none does. Everything else, or
schedule='fused', runs the fused programs (mp_jax.serving.programs): requests sorted by length, cut
into calls of the batch buckets (batching.plan_calls: least padded tokens plus FUSED_CALL_TOKENS a
call, each call at its longest row's input bucket; a call of one row of at most
programs.UNROLL_MAX_LENGTH tokens at the fine grid, `input_length`: the one-row form), every call
dispatched before any is awaited. Results come back in the caller's order.
"""

import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mp_jax.data import batching
from mp_jax.model import bert, checks, exit_plan
from mp_jax.model import config as model_config
from mp_jax.serving import packing, programs, shapes
from mp_jax.serving import schedule as schedule_lib

SCHEDULES = ('layers', 'fused')
# A fused call costs about this many padded tokens beyond its own (route's plan): one request's
# dense program took 5.1 ms on average (48 `mr` test requests, 25 tokens on average), ~70 tokens'
# worth where a batch of 32 ran 73-75 us a padded token (MiniLM; a call streams every weight), so
# ~40 beyond the request's own. Calls split at every length bucket (leftover rows in calls of 1
# and 8) ran the dense pass over `mr`'s test rows in 2.36 s, planned 2.24 s (docs/RESULTS.md,
# session 23). Measured on CPU; not tuned for GPU/TPU, where a call costs more next to a token
# (so this errs towards more calls).
FUSED_CALL_TOKENS = 40


class Prepared(NamedTuple):
  """Engine params on the device (programs.stack_params) that several engines of one model
  share."""

  tree: dict


class Route(NamedTuple):
  """How `Engine.predict` runs a request set (which engine, which rows layer-major, which calls).

  `engine` is an exit engine's dense one when no head runs; `calls` are the fused program calls
  [(request indices, batch, length)] in dispatch order.
  """

  engine: 'Engine'
  layer_major: np.ndarray
  calls: list


def on_device(params, device=None):
  """`params` on one local device: host values copied once; a replicated array lends its shard."""
  device = device or jax.local_devices()[0]

  def put(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
      if not x.is_fully_replicated:
        raise ValueError(f'evaluation needs replicated parameters, got an array of shape '
                         f'{x.shape} sharded as {x.sharding}')
      x = next((s.data for s in x.addressable_shards if s.device == device),
               x.addressable_data(0))
    return jax.device_put(x, device)

  return jax.tree.map(put, params)


def prepare(cfg: model_config.ModelConfig, params, stacked: bool = True) -> Prepared:
  """Model params (host or device) -> engine params on the default device, copied there once
  (`stacked`: also the stacked layer weights, which only pruning and exit programs read)."""
  return Prepared(programs.stack_params(cfg, on_device(params), stacked))


def _int32(x):
  """x as an int32 device array; host values are copied explicitly (one transfer)."""
  if isinstance(x, jax.Array):
    return x if x.dtype == jnp.int32 else x.astype(jnp.int32)
  return jax.device_put(np.asarray(x, np.int32))


class Engine:
  """Compiled pruned early-exit classifier; one AOT-compiled program per (batch, length) bucket.

  Params are a runtime argument of every program (not baked in), so `set_params` (e.g. new
  thresholds) and `tau` never recompile; only a new (batch, length) shape does. `plan`
  (exit_plan.ExitPlan) picks the heads that run at each tau; None: all of them.
  """

  def __init__(self, cfg: model_config.ModelConfig, params, *, prune: bool = True,
               exits: bool = True, tau: float = 0.0,
               length_buckets: Sequence[int] | None = None,
               batch_buckets: Sequence[int] | None = None,
               compiler_options: dict | None = None, chunk_tokens: int | None = None,
               schedule: str = 'layers', schedule_max_length: int | None = None,
               plan: exit_plan.ExitPlan | None = None):
    # Passed to XLA, e.g. {'xla_backend_optimization_level': 0}: half the compile time, slower.
    self.compiler_options = dict(compiler_options or {})
    self.cfg, self.prune, self.exits, self.tau = cfg, bool(prune), bool(exits), float(tau)
    self.plan = plan  # checked against cfg; keeps the halt values per tau (halts)
    # Unset shapes take this platform's serving defaults (mp_jax.serving.shapes), as configs do.
    grid = shapes.resolve(dict(length_buckets=length_buckets, batch_buckets=batch_buckets,
                               chunk_tokens=chunk_tokens, schedule_max_length=schedule_max_length))
    self.length_buckets = grid.length_buckets
    self.batch_buckets = grid.batch_buckets
    if self.length_buckets[-1] > cfg.max_position_embeddings:
      raise ValueError(f'length bucket {self.length_buckets[-1]} > max_position_embeddings '
                       f'{cfg.max_position_embeddings}')
    # With pruning the loop's first switch already runs at the real lengths' bucket, so inputs
    # need only a few shapes (each program compiles every working-length branch below its own);
    # the one-row form runs at its input's shape and takes the fine grid (input_length).
    self.input_buckets = programs.spaced(self.length_buckets) if self.prune else self.length_buckets
    self.chunk_tokens = grid.chunk_tokens
    self.forward = forward = programs.chunked(self._make_forward(), self.chunk_tokens)
    traces = self._traces = [0]

    def counted(*args):
      traces[0] += 1  # runs at trace time only
      return forward(*args)

    # Not a bound method: that would tie the engine into a reference cycle, and a dropped
    # engine's compiled programs would live on until Python's cycle collector ran.
    self._jitted = jax.jit(counted)
    self.programs: dict[tuple[int, int], jax.stages.Compiled] = {}
    self.compile_seconds: dict[tuple[int, int], float] = {}
    if schedule not in SCHEDULES:
      raise ValueError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')
    # Layer-major where rows leave (exits) or shrink (pruning): with pruning alone it ran
    # 1.60-1.63x over dense on `mr` against the fused programs' 1.35-1.36x, groups holding up to
    # chunk_tokens tokens, the FFN over kept tokens packed (docs/RESULTS.md, session 21). Not for
    # an exit engine without pruning where no head runs at the call's tau (route: dense program).
    self.schedule = None
    if schedule == 'layers' and not self.dense and grid.schedule_max_length > 0:
      self.schedule = schedule_lib.Schedule(
          cfg, prune=self.prune, exits=self.exits,
          length_buckets=batching.upto(
              self.length_buckets, min(grid.schedule_max_length, self.length_buckets[-1])),
          batch_buckets=self.batch_buckets, compiler_options=self.compiler_options,
          token_budget=self.chunk_tokens)
    self.headless = None
    self._halt_dev = self._params = None
    self.set_params(params)
    # Exits without pruning and no head running (tau <= 0, or none pays): the dense program
    # gives the same answers without the loop's overhead (FastBERT at tau 0 on `mr`, session
    # 12: 0.76x of dense layer-major; 1.04x as the dense program, session 15).
    if self.exits and not self.prune:  # it shares this engine's device params
      self.headless = Engine(cfg, Prepared(self.params), prune=False, exits=False,
                             length_buckets=self.length_buckets, batch_buckets=self.batch_buckets,
                             compiler_options=self.compiler_options, chunk_tokens=self.chunk_tokens)

  @property
  def plan(self) -> exit_plan.ExitPlan | None:
    """The exit plan (None: every head runs); assigning one forgets the halt values."""
    return self._plan

  @plan.setter
  def plan(self, plan: exit_plan.ExitPlan | None) -> None:
    if plan is not None and plan.num_layers != self.cfg.num_layers:
      raise ValueError(f'exit plan of {plan.num_layers} layers for a '
                       f'{self.cfg.num_layers}-layer model')
    self._plan = plan
    # After the plan: a halts() that reads the new (empty) dict then reads the new plan too.
    self._halts = {}

  @property
  def dense(self) -> bool:
    """Nothing to save (no pruning, no exits): the dense program, same answers."""
    return not (self.prune or self.exits)

  def operands(self, batch: int, length: int) -> dict:
    """The params the (batch, length) program reads (programs.operands of `params`)."""
    return programs.operands(self.params, dense=self.dense,
                             unrolled=programs.unrolls(batch, length, self.chunk_tokens))

  def _make_forward(self):
    if self.dense:
      return programs.make_dense_forward(self.cfg)
    return programs.make_forward(self.cfg, prune=self.prune, exits=self.exits,
                                 batch_buckets=self.batch_buckets,
                                 length_buckets=self.length_buckets)

  def _prepare(self, params):
    return prepare(self.cfg, params, stacked=not self.dense).tree

  @property
  def num_traces(self) -> int:
    """Traces of the fused forward so far (each new (batch, length) shape traces once)."""
    return self._traces[0]

  def set_params(self, params) -> None:
    """Replaces the params (same structure and shapes: compiled programs stay valid).

    `params`: a model parameter tree (copied to the device once), or a `Prepared` one, which
    is used as it is (several engines then share one device copy).
    """
    tree = params.tree if isinstance(params, Prepared) else self._prepare(params)
    if self._params is None and isinstance(params, Prepared):  # made elsewhere: maybe another's
      programs.check_prepared(self.cfg, tree)
    elif self._params is not None:  # later ones: on what its programs read
      read = programs.read_params(self._params, dense=self.dense)
      if why := packing.mismatch({k: tree[k] for k in read if k in tree}, read):
        raise ValueError(f"params do not match the engine's (its programs take theirs): {why}")
    # predict hands its inputs to the programs as host arrays, in a scope that allows the
    # transfer (jax.transfer_guard): params must not ride along as host data at every call.
    host = [packing.name(k) for k, x in jax.tree_util.tree_leaves_with_path(tree)
            if not isinstance(x, jax.Array)]
    if host:
      raise ValueError('Prepared params must be on the device (engine.prepare); '
                       f'{len(host)} host leaves: {", ".join(host[:3])}')
    self._params = tree
    if self.headless is not None:
      self.headless.set_params(Prepared(tree))

  @property
  def params(self) -> dict:
    """The engine params on the device; assigning goes through set_params (and its check)."""
    return self._params

  @params.setter
  def params(self, params) -> None:
    self.set_params(params)

  def halts(self, tau: float | None = None) -> np.ndarray:
    """float32 (L,), read-only: the per-layer halt values at tau (the engine's own if None)."""
    tau = self.tau if tau is None else float(tau)
    # Kept per tau: a single request's predict spent ~30 us on them (cProfile; session 27).
    cache = self._halts  # read once: `plan`'s setter may swap it from another thread
    if len(cache) >= 4096:  # a server sweeping tau
      cache.clear()
    halt_L = cache.get(tau)
    if halt_L is None:
      if not self.exits:
        halt_L = np.zeros(self.cfg.num_layers, np.float32)
      else:
        halt_L = np.array(exit_plan.halts_of(self.plan, tau, self.cfg.num_layers), np.float32)
      halt_L.setflags(write=False)
      cache[tau] = halt_L
    return halt_L

  @property
  def num_compiles(self) -> int:
    return (len(self.compile_seconds)
            + (len(self.schedule.compile_seconds) if self.schedule else 0)
            + (self.headless.num_compiles if self.headless else 0))

  def program(self, batch: int, length: int) -> jax.stages.Compiled:
    """The compiled program for a (batch, length) input; compiled on first use."""
    key = (int(batch), int(length))
    if key not in self.programs:
      start = time.perf_counter()
      specs = (jax.ShapeDtypeStruct(key, jnp.int32),) * 3
      halt_spec = jax.ShapeDtypeStruct((self.cfg.num_layers,), jnp.float32)
      lowered = self._jitted.lower(self.operands(*key), *specs, halt_spec)
      self.programs[key] = lowered.compile(compiler_options=self.compiler_options or None)
      self.compile_seconds[key] = time.perf_counter() - start
    return self.programs[key]

  def warmup(self, batch_buckets=None, length_buckets=None) -> dict[tuple[int, int], float]:
    """Compiles every (batch, length) program and the schedule's; returns the fused programs'
    compile seconds."""
    for b, t in self.program_shapes(batch_buckets, length_buckets):
      self.program(b, t)
    if self.schedule is not None:  # its programs, all of them (one per kind and bucket pair)
      self.schedule.warmup(self.params)
    if self.headless is not None:
      self.headless.warmup(batch_buckets, length_buckets)
    return dict(self.compile_seconds)

  def run(self, ids_BxT, types_BxT, mask_BxT, tau: float | None = None) -> dict:
    """One padded batch of any (B, T) (its own fused program); returns device arrays (async).

    Inputs go to the device with explicit copies; the params are already there.
    """
    return self._run(ids_BxT, types_BxT, mask_BxT, self._halt_on_device(self.halts(tau)))

  def _halt_on_device(self, halt_L):
    """halt_L on the device, kept for the next call with the same values (a tau's)."""
    key = np.asarray(halt_L, np.float32).tobytes()
    if self._halt_dev is None or self._halt_dev[0] != key:
      self._halt_dev = (key, jax.device_put(np.asarray(halt_L, np.float32)))
    return self._halt_dev[1]

  def _run(self, ids_BxT, types_BxT, mask_BxT, halt_L):
    ids_BxT, types_BxT, mask_BxT = _int32(ids_BxT), _int32(types_BxT), _int32(mask_BxT)
    shape = ids_BxT.shape
    return self.program(*shape)(self.operands(*shape), ids_BxT, types_BxT, mask_BxT, halt_L)

  def route(self, lengths_N, halt_L) -> Route:
    """How `predict` runs requests of these lengths at these halt values (module docstring)."""
    lengths_N = np.asarray(lengths_N, np.int64)
    if self.headless is not None and not np.any(halt_L):
      return self.headless.route(lengths_N, halt_L)
    n = len(lengths_N)
    if n == 1:  # one fused call (layer-major needs several rows)
      (_, b, t), = batching.plan_calls(lengths_N, self.batch_buckets, self.input_length,
                                       FUSED_CALL_TOKENS)
      return Route(self, np.zeros(0, np.int64), [(np.zeros(1, np.int64), b, t)])
    fused, layered = np.arange(n), np.zeros(0, np.int64)
    # Several requests of at most schedule_max_length tokens whose rows can exit or shrink.
    if self.schedule is not None and (self.prune or np.any(halt_L)):
      s = np.flatnonzero(lengths_N <= self.schedule.lbs[-1])
      if len(s) > 1:
        layered, fused = s, np.setdiff1d(fused, s)
    order = fused[np.argsort(-lengths_N[fused], kind='stable')]
    plan = batching.plan_calls(lengths_N[order], self.batch_buckets, self.input_length,
                               FUSED_CALL_TOKENS)
    return Route(self, layered, [(order[i:i + b], b, t) for i, b, t in plan])

  def input_length(self, batch: int, length: int) -> int:
    """The input length bucket of a fused call of `batch` rows whose longest has `length`
    tokens: a one-row form's (programs.unrolls) is the finest, as it runs every layer at its
    input's shape; others take `input_buckets`."""
    fine = batching.bucket_length(length, self.length_buckets)
    if not self.dense and programs.unrolls(batch, fine, self.chunk_tokens):
      return fine
    return batching.bucket_length(length, self.input_buckets)

  def program_shapes(self, batch_buckets=None, lengths=None) -> list[tuple[int, int]]:
    """Every (batch, length) of a fused program `route` can call (for requests of `lengths`
    tokens in batches of `batch_buckets`; None: every one)."""
    return sorted({(b, self.input_length(b, n)) for b in batch_buckets or self.batch_buckets
                   for n in lengths or self.length_buckets})

  def predict(self, inputs, tau: float | None = None) -> dict[str, np.ndarray]:
    """Runs requests in calls (route), all dispatched before any is awaited; numpy, input order."""
    rows = batching.as_rows(inputs)
    n, n_layers = len(rows), self.cfg.num_layers
    lengths = np.asarray([len(r[0]) for r in rows], np.int64)
    if n and lengths.max() > self.length_buckets[-1]:
      raise ValueError(f'a request has {lengths.max()} tokens > largest length bucket '
                       f'{self.length_buckets[-1]}')
    if n and lengths.min() < 1:
      raise ValueError('empty request (0 tokens)')
    # Out-of-range ids would read NaN embeddings (jnp.take fills) and still yield a label.
    checks.check_token_ids([r[0] for r in rows], self.cfg.vocab_size, 'Engine.predict')
    halt_L = self.halts(tau)
    route = self.route(lengths, halt_L)
    if route.engine is not self:  # the headless dense engine: no head runs at this tau
      return route.engine.predict(rows)
    c = self.cfg.num_labels
    dims = {'labels': (), 'logits': (c,), 'probs': (c,), 'exit_layer': (),
            'n_attn': (n_layers,), 'n_ffn': (n_layers,)}
    dtypes = {'logits': np.float32, 'probs': np.float32}
    out = {k: np.zeros((n, *s), dtypes.get(k, np.int32)) for k, s in dims.items()}
    if len(route.layer_major):
      layered = route.layer_major
      res = self.schedule.predict(self.params, [rows[i] for i in layered], halt_L)
      for k in programs.OUTPUTS:
        out[k][layered] = res[k]
    pending, halt_dev = [], self._halt_on_device(halt_L)
    for chunk, b, t in route.calls:
      x_3xBxT = np.zeros((3, b, t), np.int32)  # ids, types, mask
      for i, r in enumerate(chunk):
        x_3xBxT[:2, i, :lengths[r]] = rows[r]
        x_3xBxT[2, i, :lengths[r]] = 1
      # The three go in as host arrays: the program's call copies them faster than an explicit
      # jax.device_put (70 us of a call in isolation), which a single request pays in full
      # (docs/RESULTS.md, session 23). Only they are host data: set_params holds the params.
      program, ops = self.program(b, t), self.operands(b, t)
      with jax.transfer_guard_host_to_device('allow'):
        res = program(ops, *x_3xBxT, halt_dev)
      pending.append((chunk, res))  # dispatch all, then wait
    # Every output's copy started before the first is awaited: as jax.device_get, without its
    # tree handling (50-90 us of a single request's 2.6 ms; docs/RESULTS.md, session 23).
    for _, res in pending:
      for v in res.values():
        v.copy_to_host_async()
    for chunk, res in pending:
      for k in programs.OUTPUTS:
        out[k][chunk] = np.asarray(res[k])[:len(chunk)]
    checks.check_finite(out['logits'], 'Engine.predict')
    return out


class DenseEngine(Engine):
  """Dense compiled baseline: same params and predict API, no pruning, no exits, full shapes."""

  def __init__(self, cfg: model_config.ModelConfig, params, **kw):
    kw.update(prune=False, exits=False)  # so Engine runs the dense program
    super().__init__(cfg, params, **kw)


def unpruned_dense(cfg: model_config.ModelConfig, params, **kw) -> DenseEngine:
  """The DenseEngine every measured speedup is over: the unpruned model's (SPEC §5).

  A model cut in depth (static) or width has a smaller dense program of its own; the baseline is
  the model it was cut from, run at that model's shapes with seeded weights (a dense program's
  time does not depend on the weights' values, and final/ holds only the cut model's).
  """
  full = cfg.unpruned()
  if full == cfg:
    return DenseEngine(cfg, params, **kw)
  return DenseEngine(full, prepare(full, bert.init_params(full), stacked=False), **kw)

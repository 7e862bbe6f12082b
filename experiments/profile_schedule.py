"""Where the layer-major schedule's MAC rate goes: per layer, and what one layer's parts cost.

  python experiments/profile_schedule.py --workdir=runs/paper/bbc/ltp --shape=32x256

Per layer: the requests of the workdir's eval split that Engine.route sends layer-major, run by
the schedule (Schedule.log: each layer's wall time) and by the unpruned dense program, in
--repeats interleaved rounds (medians). Each layer's MACs are the ones its programs compute
(mp_jax.serving.work.layer_major_macs, on the reference run's kept counts and exit layers), so
  rate kept = layer MACs x (dense seconds / dense MACs) / layer seconds
is the layer's MACs/s against the dense program's (1: as fast per MAC; the clock's MAC rate is
their time-weighted whole).

--shape=BxT (a pruning model): one layer program of the schedule at that group shape, timed
interleaved (medians, CALLS calls a round) in four forms: the engine's (attention in row chunks
with the importance score, hard keep, packed FFN); the same with the score replaced by the
alive mask (its answers are not the model's: only what the score costs is timed); without
pruning (attention in chunks of at most grouping.ATTENTION_TOKENS tokens); and the dense
program's layer (its program at B x T / L, embeddings and pooler included). With exits, also
the engine's form and the one without pruning with layer 1's exit head running (with pruning
it reads the group back from H). Threshold 0 keeps every token, so every form's FFN runs the
same tokens. Never run it beside another training or benchmark (2 cores: XLA processes thrash).
"""

import pathlib
import sys
from unittest import mock

import jax
import numpy as np
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mp_jax import cli
from mp_jax.evaluation import reference, served, timing
from mp_jax.model import pruning as pruning_lib
from mp_jax.serving import schedule as schedule_lib
from mp_jax.serving import work

_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir (its final/ weights).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Interleaved rounds (medians).')
_SHAPE = flags.DEFINE_string('shape', None, 'B x T of one layer program to take apart.')
flags.mark_flag_as_required('workdir')
CALLS = 5


def per_layer(cfg, pruning, params, eng, dense, enc, tau):
  """Prints each layer's time, MACs and rate kept (module docstring)."""
  halt_L = eng.halts()
  route = eng.route(enc.lengths, halt_L)
  if eng.schedule is None or not len(route.layer_major):
    raise SystemExit(f'{_WORKDIR.value}: no request runs layer-major at tau {tau:g}')
  idx = route.layer_major
  rows = [(enc.ids[i], enc.type_ids[i]) for i in idx]
  res = reference.run(params, cfg, enc, pruning=pruning, exits=eng.exits,
                      batch_size=max(eng.batch_buckets), length_buckets=eng.length_buckets)
  exit_N = reference.decide(res, tau, cfg.num_layers, eng.plan)[0] if eng.exits else None
  pick = lambda x: None if x is None else np.asarray(x)[idx]
  macs_L = work.layer_major_macs(eng, pick(res['n_attn']), pick(res['n_ffn']), pick(exit_N))
  n_NxL = np.repeat(enc.lengths[idx, None], cfg.num_layers, 1)
  dense_macs = work.engine_macs(dense, n_NxL, n_NxL)
  log = eng.schedule.log = []
  rounds = []  # each predict's log

  def layered():
    log.clear()
    eng.schedule.predict(eng.params, rows, halt_L)
    rounds.append(list(log))
  t = timing.interleaved({'dense': lambda: dense.predict(rows), 'engine': layered},
                         _REPEATS.value, warmup=True)
  rounds = rounds[1:]  # the warm-up's
  eng.schedule.log = None
  s_L = np.zeros(cfg.num_layers)
  for l in range(cfg.num_layers):
    s_L[l] = np.median([sum(s for k, s in w if k == l) for w in rounds])
  per_mac = t['dense'] / dense_macs
  print(f'{_WORKDIR.value}: {len(rows)} requests layer-major at tau {tau:g}; dense '
        f'{t["dense"]:.3f} s, engine {t["engine"]:.3f} s ({t["dense"] / t["engine"]:.2f}x); '
        f'shapes allow {dense_macs / macs_L.sum():.2f}x\n')
  print('| layer | ms | share of time | GMACs | share of MACs | rate kept |\n'
        '|---|---|---|---|---|---|')
  for l in range(cfg.num_layers):
    if s_L[l] > 0:
      print(f'| {l + 1} | {s_L[l] * 1e3:.1f} | {s_L[l] / s_L.sum():.1%} | {macs_L[l] / 1e9:.1f} | '
            f'{macs_L[l] / macs_L.sum():.1%} | {macs_L[l] * per_mac / s_L[l]:.3f} |')
  print(f'| all | {s_L.sum() * 1e3:.1f} | | {macs_L.sum() / 1e9:.1f} | | '
        f'{macs_L.sum() * per_mac / s_L.sum():.3f} |')


def layer_forms(cfg, kw, eng, dense, b, t):
  """Prints one layer program's forms at b x t (module docstring)."""
  sch = eng.schedule
  if sch is None or not eng.prune:
    raise SystemExit(f'--shape: {_WORKDIR.value} has no pruning schedule to take apart')
  if t not in sch.lbs or b > sch.group_rows(t):
    raise SystemExit(f'--shape={b}x{t}: not a group of the schedule (length buckets {sch.lbs}, '
                     f'at most {sch.group_rows(t) if t in sch.lbs else "-"} rows)')
  make = lambda prune, exits=False: schedule_lib.Schedule(
      cfg, prune=prune, exits=exits, length_buckets=sch.lbs, batch_buckets=kw['batch_buckets'],
      token_budget=sch.token_budget).program(sp, 'layer', b, t)
  sp, (h, a) = eng.params, sch._buffers_spec()
  forms = {'pruning (the engine)': make(True)}
  # Traced with the score replaced: nothing reads the attention weights, XLA fuses attention.
  with mock.patch.object(pruning_lib, 'importance', lambda e, z, a, n: a.astype(np.float32)):
    forms['pruning, no score'] = make(True)
  forms['no pruning'] = make(False)
  if eng.exits:  # layer 1's exit head runs at any tau > 0 (called with 1 below)
    forms['pruning + exit head'] = make(True, True)
    forms['no pruning + exit head'] = make(False, True)
  rng = np.random.default_rng(0)
  state = {k: [jax.device_put(rng.standard_normal(h.shape).astype(h.dtype)),
               jax.device_put(np.ones(a.shape, bool))] for k in forms}
  idx = jax.device_put(np.arange(b, dtype=np.int32))
  zero, one, first = (jax.device_put(x) for x in (np.float32(0), np.float32(1), np.int32(0)))
  top, p_l, pe_l = schedule_lib._top(sp), sp['per_layer'][0], schedule_lib._exit_of(sp, 0)

  def call(name):
    def run():
      for _ in range(CALLS):  # H and alive are donated: each call feeds the next its own
        tau = one if name.endswith('exit head') else zero
        out = forms[name](top, p_l, pe_l, zero, first, tau, *state[name], idx)
        state[name][:] = out[:2]
      jax.block_until_ready(out)
    return run
  fns = {k: call(k) for k in forms}
  ids = np.ones((b, t), np.int32)
  dense_args = (dense.operands(b, t), ids, np.zeros_like(ids), ids, dense.halts())
  program = dense.program(b, t)
  fns['dense program / L'] = lambda: jax.block_until_ready(
      [program(*dense_args) for _ in range(CALLS)])
  secs = timing.interleaved(fns, _REPEATS.value, warmup=True)
  print(f'\nOne layer program at {b} x {t} ({CALLS} calls a round, {_REPEATS.value} rounds):\n')
  print('| form | ms a layer | us a token | against the dense layer |\n|---|---|---|---|')
  base = secs['dense program / L'] / CALLS / cfg.num_layers
  for name, s in secs.items():
    ms = s / CALLS / (cfg.num_layers if name.startswith('dense') else 1)
    print(f'| {name} | {ms * 1e3:.1f} | {ms / (b * t) * 1e6:.2f} | {ms / base:.3f} |')


def main(argv):
  del argv
  sv = served.load(_WORKDIR.value)
  eng, dense = sv.engine(), sv.dense()
  per_layer(sv.cfg, sv.pruning, sv.trained.params, eng, dense, sv.enc, sv.tau)
  if _SHAPE.value:
    b, t = (int(v) for v in _SHAPE.value.split('x'))
    layer_forms(sv.cfg, sv.shape_kw, eng, dense, b, t)


if __name__ == '__main__':
  cli.run(main)

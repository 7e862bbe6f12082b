"""The width stage (SPEC §4): COST-EFF slenderization by iterative, masked Taylor pruning.

The stage trains at full shapes, so one compiled step serves every cycle and a checkpoint is
the whole story. Unit masks m (L, H) over heads and (L, F) over FFN neurons multiply the weights
each unit owns (the groups of model.width.unit_factors), so a pruned unit adds nothing and its
weights get zero gradient. Each step adds the first-order Taylor importance of the masked
weights under the joint loss (stages.loss_fn), I(G) += sum_{w in G} |w * dL/dw|
(width.head_scores / ffn_scores). With C = train.width_cycles and S the stage's steps, cut
c = 1..C falls after step s_c = max(1, floor(c * S / (2C))) (the first half of the stage) and
keeps in every layer the m_c = max(1, round(keep^(c/C) * K)) best alive units by I (K heads or
neurons, keep = model.head_keep / model.ffn_keep); the pruned weights are zeroed, Adam's moments
reset, I cleared, and the learning rate starts its warmup and decay again (stages.schedule).
The second half trains at the final widths. At the end the kept indices go to width/done.json
(`record`), from which `apply` slices the physically smaller model (width.slice_params).
"""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mp_jax import fsio
from mp_jax.model import width
from mp_jax.training import checkpoint, stages


@dataclasses.dataclass(frozen=True)
class Plan:
  """The cut steps s_1..s_C and the units kept per layer in cycles 0..C (m_0 = all)."""

  cuts: tuple
  heads: tuple
  neurons: tuple

  def cycle(self, step):
    """Cuts done after `step` steps: #{c : s_c <= step} (coinciding cuts jump together)."""
    return jnp.sum(jnp.asarray(self.cuts) <= step)


def make_plan(cfg, total_steps, cycles, head_keep, ffn_keep):
  """The Plan of a width stage of `total_steps` steps: C cuts over its first half."""
  if cycles < 1:
    raise ValueError(f'train.width_cycles must be >= 1, got {cycles}')
  cuts = tuple(max(1, c * total_steps // (2 * cycles)) for c in range(1, cycles + 1))
  frac = [c / cycles for c in range(cycles + 1)]
  return Plan(cuts, tuple(width.kept_count(cfg.num_heads, head_keep ** f) for f in frac),
              tuple(width.kept_count(cfg.intermediate_size, ffn_keep ** f) for f in frac))


def init_units(cfg):
  """The stage's unit state: every unit alive, no importance yet."""
  shape_LxH, shape_LxF = (cfg.num_layers, cfg.num_heads), (cfg.num_layers, cfg.intermediate_size)
  return {'heads_LxH': np.ones(shape_LxH, np.float32), 'ffn_LxF': np.ones(shape_LxF, np.float32),
          'head_imp_LxH': np.zeros(shape_LxH, np.float32),
          'ffn_imp_LxF': np.zeros(shape_LxF, np.float32)}


def keep_best(imp_LxK, alive_LxK, m):
  """Mask of the m best alive units per layer by importance (ties: lower index first)."""
  score_LxK = jnp.where(alive_LxK > 0, imp_LxK, -jnp.inf)  # the dead rank last, never back
  order_LxK = jnp.argsort(-score_LxK, axis=1, stable=True)
  rank_LxK = jnp.argsort(order_LxK, axis=1)
  return (rank_LxK < m).astype(jnp.float32)


def fresh_moments(opt_state):
  """opt_state with every Adam count and moment zeroed (the schedules' counts kept)."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return jax.tree.map(lambda s: jax.tree.map(jnp.zeros_like, s) if is_adam(s) else s,
                      opt_state, is_leaf=is_adam)


def _cut(state, plan, cfg):
  """Cut at state['step']: keep plan's count of the best alive units, zero the rest."""
  c, u = plan.cycle(state['step']), state['units']
  heads = keep_best(u['head_imp_LxH'], u['heads_LxH'], jnp.asarray(plan.heads)[c])
  ffn = keep_best(u['ffn_imp_LxF'], u['ffn_LxF'], jnp.asarray(plan.neurons)[c])
  units = {'heads_LxH': heads, 'ffn_LxF': ffn, 'head_imp_LxH': jnp.zeros_like(heads),
           'ffn_imp_LxF': jnp.zeros_like(ffn)}
  # Zeroed weights with zero gradient and zero moments get zero Adam and decay updates: they
  # stay exactly zero, so the state's params are the masked model at every step.
  return {'params': width.masked(state['params'], heads, ffn, cfg),
          'opt_state': fresh_moments(state['opt_state']), 'step': state['step'], 'units': units}


def train_step(state, frozen, batch, rng, *, tx, plan, **loss_kw):
  """stages.train_step on the masked weights; adds I, and cuts once step reaches an s_c.

  `state` = {'params', 'opt_state', 'step', 'units': init_units' dict}.
  """
  cfg, u = loss_kw['model'].cfg, state['units']
  mask = lambda p: width.masked(p, u['heads_LxH'], u['ffn_LxF'], cfg)
  rng = jax.random.fold_in(rng, state['step'])
  grads, metrics = jax.grad(lambda p: stages.loss_fn(mask(p), frozen, batch, rng, **loss_kw),
                            has_aux=True)(state['params'])
  # dL/dw of the raw weights is that of the masked ones times the mask: zero for pruned units.
  p_m = mask(state['params'])
  u = dict(u, head_imp_LxH=u['head_imp_LxH'] + width.head_scores(p_m, grads, cfg),
           ffn_imp_LxF=u['ffn_imp_LxF'] + width.ffn_scores(p_m, grads, cfg))
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  new = {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
         'step': state['step'] + 1, 'units': u}
  is_cut = (new['step'] == jnp.asarray(plan.cuts)).any()
  new = jax.lax.cond(is_cut, functools.partial(_cut, plan=plan, cfg=cfg), lambda s: s, new)
  metrics.update(grad_norm=optax.global_norm(grads), heads_kept=new['units']['heads_LxH'].mean(),
                 ffn_kept=new['units']['ffn_LxF'].mean())
  return new, metrics


def setup(cfg, train_params, total_steps, config):
  """(optimizer, initial state, train_step's extra arguments) of a width stage."""
  p = make_plan(cfg, total_steps, int(config.train.width_cycles), float(config.model.head_keep),
           float(config.model.ffn_keep))
  tx = stages.optimizer('width', train_params, total_steps, config.train, restarts=p.cuts)
  state = {'params': train_params, 'opt_state': tx.init(train_params),
           'step': np.asarray(0, np.int32), 'units': init_units(cfg)}
  return tx, state, {'plan': p}


def counted(cfg, units):
  """cfg at the widths alive in `units`: the masked model's FLOPs are the sliced model's."""
  u, full = jax.device_get(units), cfg.unpruned()
  m, n = int(np.asarray(u['heads_LxH'])[0].sum()), int(np.asarray(u['ffn_LxF'])[0].sum())
  return width.with_widths(cfg, m, cfg.head_dim, n, full.num_heads, full.intermediate_size)


def record(units):
  """What width/done.json keeps: the (L, M) head and (L, N) neuron indices still alive."""
  out = {}
  for key, name in (('heads_LxH', 'heads'), ('ffn_LxF', 'neurons')):
    alive_LxK = np.asarray(units[key]) > 0
    if len(set(alive_LxK.sum(1).tolist())) != 1:  # keep_best keeps m in every layer
      raise ValueError(f'width stage: uneven {name} per layer {alive_LxK.sum(1).tolist()}')
    out[name] = [np.flatnonzero(row).tolist() for row in alive_LxK]
  return out


def prepare(cfg, params, rank):
  """(cfg, params) the width stage starts from: the word table factorised when rank > 0.

  Factorised before the stage so that the factors train with it (and in later stages).
  """
  if not rank:
    return cfg, params
  if not 0 < rank < cfg.hidden_size:
    raise ValueError(f'config: model.embedding_rank must be in [0, hidden_size='
                     f'{cfg.hidden_size}) (0: no factorisation), got {rank}')
  params, cfg = width.factorise_embedding(params, cfg, int(rank))
  return cfg, params


def apply(cfg, params, stage_dir):
  """(cfg, params) of the slim model width/done.json records; unchanged if the stage did not run.

  The model keeps its unpruned widths in cfg (unpruned_heads, unpruned_intermediate_size).
  """
  path = pathlib.Path(stage_dir) / checkpoint.DONE
  if not path.exists():
    logging.warning('%s: no record of the width stage (0 steps?); the model keeps its width', path)
    return cfg, params
  rec = fsio.read_json(path)
  params, cfg = width.slice_params(params, cfg, rec['heads'], rec['neurons'])
  logging.info('width: %d of %d heads and %d of %d FFN neurons per layer', cfg.num_heads,
               cfg.unpruned().num_heads, cfg.intermediate_size,
               cfg.unpruned().intermediate_size)
  return cfg, params

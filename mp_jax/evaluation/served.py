"""A trained workdir as its own config serves it: the eval split's rows, its engine, its dense one.

What the experiments that time or trace one workdir's programs share (host_gaps,
round_neighbours, profile_schedule, profile_ops' eval programs, batch1_parts): the method, tau and
exit plan of final/, the eval config's serving shapes, params copied to the device once for every
engine built from them.
"""

from typing import NamedTuple

import ml_collections

from mp_jax import methods
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading
from mp_jax.evaluation import report
from mp_jax.model import exit_plan
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import shapes


class Served(NamedTuple):
  """One workdir's model, eval rows and engine settings (`load`)."""

  trained: workdir_lib.Trained
  task: ml_collections.ConfigDict  # the training config, as final/ was exported
  enc: batching.Encoded  # the eval split
  rows: list  # [(ids, type ids)]: enc as Engine.predict takes it
  pruning: str
  exits: bool
  tau: float  # final/'s (0 without exits)
  shape_kw: dict  # the serving shapes (Engine keywords)
  shared: engine_lib.Prepared

  @property
  def cfg(self):
    return self.trained.cfg

  def engine(self, **kw) -> engine_lib.Engine:
    """The method's engine at final/'s tau and exit plan (`kw` overrides, e.g. schedule)."""
    plan = exit_plan.for_eval(self.trained.plan, self.task.eval)
    return engine_lib.Engine(self.cfg, self.shared, **{
        **self.shape_kw, 'prune': self.pruning == 'hard', 'exits': self.exits, 'tau': self.tau,
        'plan': plan, **kw})

  def dense(self) -> engine_lib.Engine:
    """The unpruned dense engine every method is timed against."""
    return engine_lib.unpruned_dense(self.cfg, self.shared, **self.shape_kw)


def load(workdir) -> Served:
  """`workdir`'s Served (its data loaded and encoded, its params on the device)."""
  tr = workdir_lib.load(workdir)
  cfg, task = tr.cfg, ml_collections.ConfigDict(tr.config)
  pruning, exits = methods.eval_modes(task.method)
  ds = loading.load_task(task.data)
  enc = batching.encode(tr.tokenizer, ds[report.eval_split(task, ds)], cfg.max_seq_length)
  shape_kw = shapes.for_model(shapes.resolve(task.eval), cfg.max_seq_length).engine_kw()
  return Served(tr, task, enc, list(zip(enc.ids, enc.type_ids)), pruning, exits,
                float(task.eval.tau) if exits else 0.0, shape_kw,
                engine_lib.prepare(cfg, tr.params))

"""Which exit heads run at a halt value tau: those that pay for themselves (SPEC §3).

A head after layer l costs its work on every example that reaches l; it saves the layers after l
(and their heads) of the examples that exit there. The reference evaluates every head, so the
export's run over the held-out split knows every head's uncertainty u_il there, and the expected
cost of running a set S of heads at tau is exact on that split:

  e_i(S)  = the first l in S with u_il <= tau, else L
  cost(S) = mean_i [ sum_{l <= e_i} layer_il + w * sum_{l in S, l <= min(e_i, L-1)} head_il ]

with layer_il and head_il the FLOPs of mp_jax.model.flops at the example's kept-token counts and
w = eval.head_weight: what a head's FLOP costs on the clock relative to a layer's (a head is a
chain of small matrix products). The plan starts from every head and drops, one at a time, the
head whose removal lowers the cost most (or keeps it: a head no example reaches or exits at),
until every removal raises it (a local minimum among removals; exact search is 2^(L-1) sets).
At tau <= 0 no head can exit, so none runs. A skipped head never runs and never exits, in
the reference, the engine and the FLOPs count alike: each reads the per-layer halt values
`halts(tau)` (tau where the head runs, 0 where it does not).
"""

import pathlib
import zipfile

import numpy as np

from mp_jax.model import exits, flops

FILE = 'exit_plan.npz'  # in final/: the held-out split's uncertainties and FLOPs
# eval.head_weight None: what a head FLOP costs against a layer FLOP on this CPU at mr's working
# lengths, 32 rows x 16-32 tokens: 1.46 and 1.27 (experiments/profile_layer.py, docs/RESULTS.md).
# Not re-fitted since: on session 34's Xeon the factored head read 1.33 and 1.14, the engine's
# merged one 1.19 and 1.04 (docs/RESULTS.md, session 34).
DEFAULT_WEIGHT = 1.3


def head_weight(value):
  """eval.head_weight as a number (None: DEFAULT_WEIGHT)."""
  return DEFAULT_WEIGHT if value is None else float(value)


def for_eval(plan, eval_config):
  """`plan` at an evaluating config's eval.head_weight (as tau, the call's own); None stays."""
  return plan and plan.reweighted(head_weight(eval_config.get('head_weight')))


def _tau32(tau):
  """tau as the engine and the reference compare it (float32); a clear error if not finite."""
  tau = float(np.float32(tau))
  if not np.isfinite(tau):
    raise ValueError(f'tau must be a finite number, got {tau!r}')
  return tau


class ExitPlan:
  """The heads that pay for themselves at each tau, from one held-out split's profile."""

  def __init__(self, u_NxE, layer_NxL, head_NxE, weight):
    self.u_NxE = np.asarray(u_NxE, np.float32)
    self.layer_NxL = np.asarray(layer_NxL, np.float64)
    self.head_NxE = np.asarray(head_NxE, np.float64)
    n, e = self.u_NxE.shape
    if n == 0:
      raise ValueError('an exit plan needs at least one held-out example')
    if self.layer_NxL.shape != (n, e + 1) or self.head_NxE.shape != (n, e):
      raise ValueError(f'exit plan: u {self.u_NxE.shape}, layers {self.layer_NxL.shape} and heads '
                       f'{self.head_NxE.shape} must be (N, L-1), (N, L), (N, L-1)')
    if not (np.isfinite(weight) and weight >= 0):
      raise ValueError(f'eval.head_weight must be a finite number >= 0, got {weight!r}')
    self.weight = float(weight)
    self._heads = {}  # tau -> bool (L-1,)

  def reweighted(self, weight):
    """The same profile with head weight `weight`."""
    return ExitPlan(self.u_NxE, self.layer_NxL, self.head_NxE, weight)

  @property
  def num_layers(self) -> int:
    """L: the model's layers (the plan decides about the heads after 1..L-1)."""
    return self.layer_NxL.shape[1]

  @classmethod
  def from_reference(cls, cfg, res, weight=None):
    """The plan of a reference run (evaluation.reference.run with exits) over a held-out split;
    weight: eval.head_weight (None: DEFAULT_WEIGHT)."""
    logits_NxExC = np.asarray(res['exit_logits'])
    u_NxE = np.asarray(exits.uncertainty(logits_NxExC))
    n_attn, n_ffn = np.asarray(res['n_attn'], np.float64), np.asarray(res['n_ffn'], np.float64)
    layer_NxL = 2.0 * flops.model_layer_macs(cfg, n_attn, n_ffn)
    head_NxE = 2.0 * flops.exit_head_macs(cfg.hidden_size, cfg.exit_width, n_ffn[:, :-1],
                                          cfg.num_labels)
    return cls(u_NxE, layer_NxL, head_NxE, head_weight(weight))

  def save(self, path):
    """Writes the profile (not the weight: that is the config's) to `path`."""
    with open(path, 'wb') as f:
      np.savez(f, u=self.u_NxE, layer_flops=self.layer_NxL, head_flops=self.head_NxE)

  @classmethod
  def load(cls, path, weight=None):
    """The plan saved at `path` with head weight `weight` (None: DEFAULT_WEIGHT); a ValueError
    naming the file if it is not one."""
    path = pathlib.Path(path)
    try:
      with np.load(path) as z:
        plan = cls(z['u'], z['layer_flops'], z['head_flops'], DEFAULT_WEIGHT)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise ValueError(f'{path}: not an exit plan ({e})') from e
    return plan.reweighted(head_weight(weight))

  def cost(self, heads_E, tau) -> float:
    """Mean FLOPs per example (heads weighted by w) of running `heads_E` at tau."""
    e, tau = self.u_NxE.shape[1], _tau32(tau)
    on_E = np.asarray(heads_E, bool) & (tau > 0)  # at tau <= 0 no head runs
    hit_NxE = (self.u_NxE <= tau) & on_E[None]  # as exits.should_exit compares
    exit_N = np.where(hit_NxE.any(1), hit_NxE.argmax(1) + 1, e + 1)
    ran_NxL = np.arange(1, e + 2)[None] <= exit_N[:, None]
    heads_NxE = ran_NxL[:, :e] & on_E[None]
    return float(((self.layer_NxL * ran_NxL).sum(1)
                  + self.weight * (self.head_NxE * heads_NxE).sum(1)).mean())

  def heads(self, tau) -> np.ndarray:
    """bool (L-1,): the heads that run at tau (greedy elimination, see the module docstring)."""
    tau = _tau32(tau)
    if len(self._heads) >= 4096:  # a server sweeping tau: recomputing costs milliseconds
      self._heads.clear()
    on_E = self._heads.get(tau)  # read once: another thread may clear the cache
    if on_E is None:
      on_E = np.full(self.u_NxE.shape[1], tau > 0)
      best = self.cost(on_E, tau) if on_E.any() else 0.0
      while on_E.any():
        c, j = min((self.cost(np.where(np.arange(len(on_E)) == j, False, on_E), tau), j)
                   for j in np.flatnonzero(on_E))
        if c > best:  # equal: a head no example reaches or exits at goes too
          break
        best, on_E[j] = c, False
      on_E.setflags(write=False)
      self._heads[tau] = on_E
    return on_E

  def halts(self, tau) -> np.ndarray:
    """float32 (L,): tau after each layer whose head runs, else 0 (never exits; the last: 0)."""
    return halts(tau, self.num_layers, self.heads(tau))


def halts(tau, num_layers, heads_E=None) -> np.ndarray:
  """Per-layer halt values: tau where a head runs (all of them if `heads_E` is None), else 0;
  all 0 at tau <= 0 (no head runs)."""
  out = np.zeros(num_layers, np.float32)
  on_E = np.ones(num_layers - 1, bool) if heads_E is None else np.asarray(heads_E, bool)
  out[:-1] = np.where(on_E & (_tau32(tau) > 0), np.float32(tau), 0.0)
  return out


def halts_of(plan, tau, num_layers) -> np.ndarray:
  """The halt values at tau of `plan` (an ExitPlan), or of every head if it is None."""
  return plan.halts(tau) if plan is not None else halts(tau, num_layers)


def heads_at(halts_L) -> np.ndarray:
  """bool (L-1,): the heads a halt vector runs (halt > 0)."""
  return np.asarray(halts_L)[:-1] > 0

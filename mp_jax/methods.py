"""The methods (SPEC §4): which stages each trains, in which pruning/exit modes. No JAX.

The single source for configs, training, evaluation, serving and the experiments.
"""

METHODS = ('bert', 'ltp', 'fastbert', 'mp')
ORDER = ('finetune', 'soft', 'hard', 'exits')  # every method's stages are a subsequence
STAGES = {
    'bert': ('finetune',),
    'ltp': ('finetune', 'soft', 'hard'),
    'fastbert': ('finetune', 'exits'),
    'mp': ('finetune', 'soft', 'hard', 'exits'),
}


def check(method):
  """`method` if it is one of METHODS, else a ValueError naming them."""
  if method not in STAGES:
    raise ValueError(f'config: method must be one of {METHODS}, got {method!r}')
  return method


def pruning_mode(method, stage):
  """Pruning mode the model runs in while training `stage` of `method`."""
  if stage in ('soft', 'hard'):
    return stage
  if stage == 'exits' and method == 'mp':
    return 'hard'  # MP trains its exits on the pruned backbone
  return 'none'


def eval_modes(method, stage=None):
  """(pruning, exits) for evaluation after `stage` (default: all): hard masks where it prunes."""
  stages = STAGES[method] if stage is None else STAGES[method][:STAGES[method].index(stage) + 1]
  return ('hard' if 'soft' in stages else 'none'), 'exits' in stages


def has_exits(method):
  """Whether the method trains exit heads (and so has a halt value tau to choose)."""
  return 'exits' in STAGES[method]


def shared_stages(method, base='mp'):
  """Leading stages `method` has in common with `base` (trained once, shared by both)."""
  out = []
  for a, b in zip(STAGES[method], STAGES[base]):
    if a != b:
      break
    out.append(a)
  return tuple(out)

"""The methods (SPEC §4): which stages each trains, in which pruning/exit modes. No JAX.

The single source for configs, training, evaluation, serving and the experiments.
"""

METHODS = ('bert', 'ltp', 'fastbert', 'mp', 'static')
# Every method's stages are a subsequence. `calibrate` trains nothing: it sets the thresholds the
# soft stage starts from; `static` keeps the first L/2 layers, distilled from the fine-tuned model.
ORDER = ('finetune', 'calibrate', 'soft', 'hard', 'exits', 'static')
STAGES = {
    'bert': ('finetune',),
    'ltp': ('finetune', 'calibrate', 'soft', 'hard'),
    'fastbert': ('finetune', 'exits'),
    'mp': ('finetune', 'calibrate', 'soft', 'hard', 'exits'),
    'static': ('finetune', 'static'),  # the plain-compression baseline (a DistilBERT in spirit)
}
PRUNING_STAGES = ('calibrate', 'soft', 'hard')


def check(method):
  """`method` if it is one of METHODS, else a ValueError naming them."""
  if method not in STAGES:
    raise ValueError(f'config: method must be one of {METHODS}, got {method!r}')
  return method


def pruning_mode(method, stage):
  """Pruning mode the model runs in while training `stage` of `method`."""
  if stage in ('soft', 'hard'):
    return stage
  if stage == 'calibrate':
    return 'hard'  # it measures what hard masks keep
  if stage == 'exits' and method == 'mp':
    return 'hard'  # MP trains its exits on the pruned backbone
  return 'none'


def eval_modes(method, stage=None):
  """(pruning, exits) for evaluation after `stage` (default: all): hard masks where it prunes."""
  stages = STAGES[method] if stage is None else STAGES[method][:STAGES[method].index(stage) + 1]
  prunes = any(s in stages for s in PRUNING_STAGES)
  return ('hard' if prunes else 'none'), 'exits' in stages


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

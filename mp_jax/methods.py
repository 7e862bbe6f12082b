"""The methods (SPEC §4): which stages each trains, in which pruning/exit modes. No JAX.

The single source for configs, training, evaluation, serving and the experiments.
"""

METHODS = ('bert', 'ltp', 'fastbert', 'mp', 'static', 'costeff', 'pyramid')
# Every method's stages are a subsequence. `calibrate` trains nothing: it sets the thresholds the
# soft stage starts from; `static` keeps the first L/2 layers, distilled from the fine-tuned model;
# `width` (COST-EFF) prunes heads and FFN neurons while training the backbone and every exit head
# together, and hands the stages after it a physically smaller model.
ORDER = ('finetune', 'width', 'calibrate', 'soft', 'hard', 'exits', 'static')
STAGES = {
    'bert': ('finetune',),
    'ltp': ('finetune', 'calibrate', 'soft', 'hard'),
    'fastbert': ('finetune', 'exits'),
    'mp': ('finetune', 'calibrate', 'soft', 'hard', 'exits'),
    'static': ('finetune', 'static'),  # the plain-compression baseline (a DistilBERT in spirit)
    'costeff': ('finetune', 'width'),  # width + exits, trained jointly
    # All three axes: width, then token pruning on the slim model, then its exits re-distilled
    # on the pruned slim backbone (as mp does).
    'pyramid': ('finetune', 'width', 'calibrate', 'soft', 'hard', 'exits'),
}
PRUNING_STAGES = ('calibrate', 'soft', 'hard')
EXIT_STAGES = ('width', 'exits')  # stages that train the exit heads


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
  if stage == 'exits' and 'hard' in STAGES[method]:
    return 'hard'  # MP (and pyramid) train their exits on the pruned backbone
  return 'none'


def eval_modes(method, stage=None):
  """(pruning, exits) for evaluation after `stage` (default: all): hard masks where it prunes."""
  stages = STAGES[method] if stage is None else STAGES[method][:STAGES[method].index(stage) + 1]
  prunes = any(s in stages for s in PRUNING_STAGES)
  return ('hard' if prunes else 'none'), any(s in stages for s in EXIT_STAGES)


def axes(method):
  """The axes a method cuts: 'length' (token pruning), 'depth' (exits), 'width' (heads, FFN).

  () for bert and for static (a fixed smaller model, none of the three).
  """
  st = STAGES[method]
  cuts = (('length', any(s in st for s in PRUNING_STAGES)),
          ('depth', any(s in st for s in EXIT_STAGES)), ('width', 'width' in st))
  return tuple(a for a, on in cuts if on)


def cuts_model(method):
  """Whether the method's final model is smaller than the one it was cut from (static, width)."""
  return any(s in STAGES[method] for s in ('static', 'width'))


def has_exits(method):
  """Whether the method trains exit heads (and so has a halt value tau to choose)."""
  return eval_modes(method)[1]


def shared_stages(method, base='mp'):
  """Leading stages `method` has in common with `base` (trained once, shared by both)."""
  out = []
  for a, b in zip(STAGES[method], STAGES[base]):
    if a != b:
      break
    out.append(a)
  return tuple(out)

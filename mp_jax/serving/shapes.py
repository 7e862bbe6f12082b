"""Shapes per platform: the one place `eval.length_buckets/batch_buckets/chunk_tokens` and
`data.length_buckets` left unset (None, the config default) become numbers. No JAX import unless
the platform is asked.

`for_model` cuts them to a model and a batch size with the one bucket rule (data.batching.upto).

Figures behind each default: docs/RESULTS.md, "BERT-base at serving time (issue 13)".
"""

import dataclasses
from collections.abc import Sequence

from mp_jax.data import batching

# CPU: a predict call's requests of at most this many tokens run layer-major
# (mp_jax.serving.schedule) when rows can exit or shrink: FastBERT (τ 0.3) on `mr` (<= 64 tokens) at
# batch 32 ran 1.78x over dense against the fused programs' 1.16-1.17x, LTP 1.60-1.63x against
# 1.35-1.36x (session 21); on `bbc` (256) FastBERT 2.36x against 2.12x, mp 2.59x against 2.37x,
# LTP 1.30x against 1.33x (session 24; docs/RESULTS.md, issue 17). Not measured beyond 256.
# GPU/TPU: 0, off (not measured there).
CPU_SCHEDULE_MAX_LENGTH = 256
ACCEL_SCHEDULE_MAX_LENGTH = 0


@dataclasses.dataclass(frozen=True)
class Serving:
  length_buckets: tuple[int, ...]
  batch_buckets: tuple[int, ...]
  chunk_tokens: int
  schedule_max_length: int = 0  # defaults() and resolve() give the platform's

  def engine_kw(self) -> dict:
    """These shapes as Engine / DenseEngine keyword arguments."""
    return dataclasses.asdict(self)


# CPU serving: lengths at most 1/4 apart from 16 up and 2 apart below: the input lengths of
# requests, and the working lengths pruned rows shrink to (each program's branches, the
# layer-major groups). Pruning leaves few tokens in deep layers, where the earlier grid's
# 8-token steps padded most: on `mr` the padded MACs (mp_jax.serving.work) of LTP were 1.44x its
# counted ones (0.80 of its FLOPs speedup allowed by the shapes; this grid: 0.87, dense padding
# 15% -> 10%; docs/RESULTS.md, issue 17, session 16). Warm-up, paid once per machine with
# JAX_COMPILATION_CACHE_DIR: more programs and branches (same RESULTS section). XLA:CPU maps
# memory per compiled kernel and a process holds at most vm.max_map_count maps: a process that
# builds engine after engine should drop the old ones (experiments/clock.py frees each method's).
CPU_LENGTHS = (2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160,
               192, 224, 256, 320, 384, 448, 512)
# CPU training: lengths 8 apart up to 64, then 1/8 to 1/4 apart (a few % of padding, where
# 32/64/128 buckets waste a third of the work on short inputs). Each length is one more compile
# of a stage's train step, far costlier than a serving program's, so the grid stays coarser.
CPU_TRAIN_LENGTHS = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
                     384, 448, 512)
# CPU: programs run their rows in chunks of ~1024 tokens so that a chunk's activations stay in
# the 32 MB L3 cache: the dense forward at batch 32 x 256 tokens runs 1.28x faster that way.
CPU_CHUNK_TOKENS = 1024

# GPU/TPU: each input length bucket is one more program per batch bucket, and each length bucket
# below a program's input length one more branch of both per-layer switches in it. The compile cost
# follows the branches (about 1 CPU second per branch for bert-base on XLA:CPU): at max_seq_length
# 128 the earlier CPU grid (CPU_TRAIN_LENGTHS) compiled 15 programs with 150 branches in all (166
# CPU s; the CPU grid now has more of both), doubling lengths 9 programs with 36 (40 CPU s;
# docs/RESULTS.md). On an accelerator each host of a job compiles its own programs at every start
# unless a persistent cache is set up (and that compile was not timed here: no accelerator), so the
# grid bounds it, at the price of more padding (a 65-token input runs at 128). All are multiples of
# 32: on TPU the last two dimensions of an array are laid out in (8, 128) tiles for 32-bit and (16,
# 128) for bfloat16 values, and T is the second-minor dimension of the activations h_BxTxD, so these
# lengths fill whole tiles (the attention scores, T minor, pad to 128 lanes below 128 either way).
ACCEL_LENGTHS = (32, 64, 128, 256, 512)
# GPU/TPU: no row chunks. They exist to keep a chunk's activations in a 32 MB CPU L3 cache; an
# accelerator instead wants the largest matmuls (one chunk), and each chunk loop is one more
# sequential step per program. Unchunked, the bert-base engine at 32 x 128 needs 175 MiB of
# temporaries instead of 49 MiB (CPU-compiled estimate), small next to a device's memory.
ACCEL_CHUNK_TOKENS = 0

# All platforms: a single request runs unpadded, 8 serves small bursts, 32 is eval.batch_size;
# inside a program the batch sub-buckets shrink the work as rows exit.
BATCH_BUCKETS = (1, 8, 32)

PLATFORMS = ('cpu', 'gpu', 'cuda', 'rocm', 'tpu')


def defaults(platform: str) -> Serving:
  """Serving shapes for a JAX backend name (`jax.default_backend()`): cpu, gpu, tpu."""
  platform = platform.lower()
  if platform not in PLATFORMS:
    raise ValueError(f'serving defaults: unknown platform {platform!r} (one of {PLATFORMS})')
  if platform == 'cpu':
    return Serving(CPU_LENGTHS, BATCH_BUCKETS, CPU_CHUNK_TOKENS, CPU_SCHEDULE_MAX_LENGTH)
  return Serving(ACCEL_LENGTHS, BATCH_BUCKETS, ACCEL_CHUNK_TOKENS, ACCEL_SCHEDULE_MAX_LENGTH)


def _platform():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend()


def _buckets(key, value):
  try:
    out = tuple(sorted({int(b) for b in value}))
  except (TypeError, ValueError):
    out = ()
  if not out or out[0] < 1:
    raise ValueError(f'config.{key} must be a non-empty list of positive ints, got {value!r}')
  return out


def train_lengths(data_config, platform: str | None = None) -> tuple[int, ...]:
  """Training's length buckets (`data.length_buckets`); None: the platform's (CPU: its own).

  A training batch pads to the bucket of its longest row; fine-tuning, calibration and dev
  metrics use these. On CPU the 8-apart grid pays: `mr`'s training step (batches of 32, mean 27
  tokens) ran 1.39x faster on it than on the GPU/TPU grid, at one more compile of each stage's
  step per length used (at most 8 up to `mr`'s 64; docs/RESULTS.md, issue 17, session 12).
  """
  value = data_config.get('length_buckets')
  if value is None:
    platform = (platform or _platform()).lower()
    value = CPU_TRAIN_LENGTHS if platform == 'cpu' else defaults(platform).length_buckets
  return _buckets('data.length_buckets', value)


def resolve(eval_config, platform: str | None = None) -> Serving:
  """Serving shapes from a config's `eval` section (a mapping); None keys take defaults(platform).

  `platform` defaults to `jax.default_backend()`; an explicit config value always wins.
  """
  get = eval_config.get
  lengths: Sequence[int] | None = get('length_buckets')
  batches: Sequence[int] | None = get('batch_buckets')
  chunk = get('chunk_tokens')
  sched = get('schedule_max_length')
  if lengths is None or batches is None or chunk is None or sched is None:
    base = defaults(platform or _platform())
    lengths = base.length_buckets if lengths is None else lengths
    batches = base.batch_buckets if batches is None else batches
    chunk = base.chunk_tokens if chunk is None else chunk
    sched = base.schedule_max_length if sched is None else sched
  for name, v, what in (('chunk_tokens', chunk, 'no chunks'),
                        ('schedule_max_length', sched, 'never layer-major')):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f'config.eval.{name} must be an int >= 0 (0: {what}), got {v!r}')
  return Serving(_buckets('eval.length_buckets', lengths),
                 _buckets('eval.batch_buckets', batches),
                 int(chunk), int(sched))


def for_model(grid: Serving, max_len: int, batch_size: int | None = None) -> Serving:
  """`grid` cut to a model's max_seq_length and a batch size: buckets below each, plus it.

  batch_size None keeps the grid's batch buckets (their largest is the batch size).
  """
  batches = grid.batch_buckets if batch_size is None else batching.upto(grid.batch_buckets,
                                                                        batch_size)
  return Serving(batching.upto(grid.length_buckets, max_len), batches, grid.chunk_tokens,
                 grid.schedule_max_length)

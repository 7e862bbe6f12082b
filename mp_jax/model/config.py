"""ModelConfig: the architecture (HF BertConfig's fields) plus pruning, exit and dtype settings.

Width (COST-EFF slenderization, mp_jax.model.width): a slim model keeps its head size with fewer
heads, so attention has width a = num_heads * head_dim, which may be < hidden_size; its FFN has
intermediate_size neurons. `unpruned_heads` / `unpruned_intermediate_size` record the widths it
was cut from and `unpruned_layers` the depth (the static baseline keeps L/2 layers; 0 = its own),
and `unpruned()` is that model, the one dense FLOPs and dense timings count against.

No JAX at import: configs and the workdir records read it without starting a backend.
"""

import dataclasses

PRUNING_MODES = ('none', 'soft', 'hard')
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture (mirrors HF BertConfig) plus the pruning and exit-head settings."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  num_labels: int = 2
  pad_token_id: int = 0
  max_seq_length: int = 128  # n in the importance score (SPEC §2)
  # Seeds the thresholds' initial values (theta_l = final_threshold * l / L); training's calibrate
  # stage sets the real ones and records its value here in final/.
  final_threshold: float = 0.01
  temperature: float = 1e-3
  exit_width: int = 128
  exit_heads: int = 2
  # Compute dtype of matmuls and activations; parameters, softmax, LayerNorm statistics, scores,
  # masks, thresholds, logits and losses stay float32.
  dtype: str = 'float32'
  # Width pruning. Defaults (all 0) are plain BERT; JSON without these fields loads as such.
  head_size: int = 0  # 0: hidden_size // num_heads
  embedding_rank: int = 0  # 0: a V x d word table; r > 0: V x r table, then r x d projection
  unpruned_heads: int = 0  # heads before width pruning (0: num_heads)
  unpruned_intermediate_size: int = 0  # FFN neurons before width pruning (0: intermediate_size)
  # Depth: the static baseline keeps the first L/2 layers of an L-layer model (0: num_layers).
  unpruned_layers: int = 0

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f'model.dtype must be one of {DTYPES}, got {self.dtype!r}')
    for name in ('hidden_size', 'num_heads', 'intermediate_size'):
      if getattr(self, name) < 1:
        raise ValueError(f'model.{name} must be >= 1, got {getattr(self, name)}')
    if self.head_size < 0:
      raise ValueError(f'model.head_size must be >= 0 (0: hidden_size // num_heads), '
                       f'got {self.head_size}')
    if not 0 <= self.embedding_rank < self.hidden_size:
      raise ValueError(f'model.embedding_rank must be in [0, hidden_size={self.hidden_size}) '
                       f'(0: no factorisation), got {self.embedding_rank}')
    for name, own in (('unpruned_heads', 'num_heads'),
                      ('unpruned_intermediate_size', 'intermediate_size'),
                      ('unpruned_layers', 'num_layers')):
      full, kept = getattr(self, name), getattr(self, own)
      if full < 0 or 0 < full < kept:
        raise ValueError(f'model.{name}={full} must be 0 (unpruned) or >= model.{own}={kept}')
    # hidden_size % num_heads is checked where a head size is needed (head_dim): FLOPs of
    # attention at width d need no head split, and hand-count configs use such shapes.

  @property
  def head_dim(self):
    """Features per head: head_size, else hidden_size / num_heads (which must divide)."""
    if self.head_size:
      return self.head_size
    if self.hidden_size % self.num_heads:
      raise ValueError(f'model.hidden_size={self.hidden_size} is not divisible by '
                       f'model.num_heads={self.num_heads}; set model.head_size')
    return self.hidden_size // self.num_heads

  @property
  def attention_size(self):
    """Width a of the q/k/v projections and of the context (= hidden_size unless slim)."""
    return self.num_heads * self.head_size if self.head_size else self.hidden_size

  def unpruned(self):
    """The model this one was cut from: all layers and heads, the full FFN, no factorisation."""
    heads = self.unpruned_heads or self.num_heads
    size = self.head_size or (self.head_dim if heads != self.num_heads else 0)
    size = 0 if size * heads == self.hidden_size else size  # the default head size is written 0
    return self.replace(num_heads=heads, head_size=size,
                        intermediate_size=self.unpruned_intermediate_size or self.intermediate_size,
                        num_layers=self.unpruned_layers or self.num_layers, embedding_rank=0,
                        unpruned_heads=0, unpruned_intermediate_size=0, unpruned_layers=0)

  @property
  def compute_dtype(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (configs import no JAX)
    return jnp.dtype(self.dtype)

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

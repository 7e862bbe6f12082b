"""ModelConfig: the architecture (HF BertConfig's fields) plus pruning, exit and dtype settings.

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

  def __post_init__(self):
    if self.dtype not in DTYPES:
      raise ValueError(f'model.dtype must be one of {DTYPES}, got {self.dtype!r}')

  @property
  def compute_dtype(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (configs import no JAX)
    return jnp.dtype(self.dtype)

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

"""Guards at the model's edges: token ids inside the vocabulary, finite logits (never an answer)."""

import numpy as np


class NonFiniteOutput(ValueError):
  """NaN/inf logits: an error, never an answer (the message names the examples)."""

  def __init__(self, message, indices=()):
    super().__init__(message)
    self.indices = list(indices)  # every bad example, for callers that name them their own way


def check_token_ids(ids, vocab_size, where):
  """ValueError naming the first example whose ids fall outside [0, vocab_size)."""
  if not len(ids):
    return
  flat = np.concatenate([np.ravel(r) for r in ids])
  bad = np.flatnonzero((flat < 0) | (flat >= vocab_size))
  if len(bad):
    row = int(np.searchsorted(np.cumsum([np.size(r) for r in ids]), bad[0], side='right'))
    raise ValueError(f'{where}: example {row} has token id {int(flat[bad[0]])}, outside the '
                     f"model's vocabulary [0, {vocab_size}) (a tokenizer from another model?)")


def check_finite(logits_NxC, where):
  """NonFiniteOutput naming how many and which examples have a NaN/inf logit."""
  logits_NxC = np.asarray(logits_NxC)
  bad = np.flatnonzero(~np.isfinite(logits_NxC.reshape(len(logits_NxC), -1)).all(-1))
  if len(bad):
    raise NonFiniteOutput(
        f'{where}: non-finite logits for {len(bad)} of {len(logits_NxC)} examples (indices '
        f'{bad[:5].tolist()}{" ..." if len(bad) > 5 else ""}); likely non-finite weights (a '
        'diverged or damaged checkpoint) or token ids beyond the vocabulary', bad.tolist())

"""Serving API: texts (or pairs) in, labels with exit layers and tokens kept out (SPEC §8)."""

import json
import math
import pathlib

import numpy as np

from mp_jax import engine as engine_lib
from mp_jax import hf, serving, stages, tokenization
from mp_jax import model as model_lib
from mp_jax import pairs as pairs_lib


def load_workdir(workdir):
  """(train config dict, ModelConfig, params, tokenizer, label names) of a trained workdir."""
  workdir = pathlib.Path(workdir)
  final = workdir / 'final'
  if not (final / 'config.json').exists():
    raise hf.CheckpointError(f'{workdir}: no trained model in {final} (run train.py first)')
  config = json.loads((workdir / 'config.json').read_text())
  cfg, params, tok = hf.load(final)
  meta = json.loads((final / hf.META_FILE).read_text())
  names = meta.get('label_names') or [str(i) for i in range(cfg.num_labels)]
  return config, cfg, params, tok, names


def _normalise(inputs):
  """Each input as (text_a, text_b or None); a clear error naming the bad index."""
  if isinstance(inputs, (str, tuple)):
    inputs = [inputs]
  out = []
  for i, x in enumerate(inputs):
    if isinstance(x, str):
      a, b = x, None
    elif isinstance(x, (tuple, list)) and len(x) == 2:
      a, b = x
    else:
      raise TypeError(f'input {i}: expected a text or a (text, text) pair, got {x!r:.80}')
    for side, t in zip(('text', 'second text'), (a,) if b is None else (a, b)):
      if not isinstance(t, str):
        raise TypeError(f'input {i}: {side} must be a str, got {type(t).__name__}')
      try:
        t.encode('utf-8')
      except UnicodeEncodeError as e:
        raise ValueError(f'input {i}: {side} is not valid Unicode (lone surrogate '
                         f'{t[e.start]!r} at character {e.start})') from None
    if b is None and not a.strip():
      raise ValueError(f'input {i}: text is empty')
    if b is not None:
      try:  # the training data's rule: one empty side is a valid pair (QQP has them)
        tokenization.check_pairs([a], [b])
      except ValueError:
        raise ValueError(f'input {i}: text and second text are both empty') from None
    out.append((a, b))
  return out


def _check_tau(tau):
  """tau as a float; a clear error for anything that is not a number (NaN included)."""
  try:
    value = float(tau)
  except (TypeError, ValueError):
    value = math.nan
  if math.isnan(value):
    raise ValueError(f'tau must be a number (exit when uncertainty <= tau), got {tau!r}')
  return value


class Predictor:
  """Compiled pruned/early-exiting classifier for a trained workdir."""

  def __init__(self, cfg, params, tokenizer, label_names, *, method='mp', tau=0.0,
               length_buckets=None, chunk_tokens=None):
    self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
    self.label_names, self.method, self.tau = list(label_names), method, _check_tau(tau)
    pruning, self.exits = stages.eval_modes(method)
    self.prune = pruning == 'hard'
    # None: this platform's serving defaults (mp_jax.serving).
    shapes = serving.resolve(dict(length_buckets=length_buckets, batch_buckets=None,
                                  chunk_tokens=chunk_tokens))
    self.length_buckets = tuple(sorted({b for b in shapes.length_buckets
                                        if b < cfg.max_seq_length} | {cfg.max_seq_length}))
    self.chunk_tokens = shapes.chunk_tokens
    self._engines = {}
    self._device_params = None  # on the device once, shared by the engines of every batch size

  @classmethod
  def from_workdir(cls, workdir, tau=None, dtype=None):
    """The workdir's model; tau and compute dtype default to the trained ones."""
    if dtype is not None and dtype not in model_lib.DTYPES:
      raise ValueError(f'dtype must be None (as trained) or one of {model_lib.DTYPES}, '
                       f'got {dtype!r}')
    config, cfg, params, tok, names = load_workdir(workdir)
    cfg = cfg if dtype is None else cfg.replace(dtype=dtype)
    tau = config['eval']['tau'] if tau is None else tau
    return cls(cfg, params, tok, names, method=config['method'], tau=tau,
               length_buckets=config['eval'].get('length_buckets'),
               chunk_tokens=config['eval'].get('chunk_tokens'))

  def engine(self, batch_size):
    """The compiled engine for this batch size (programs compile on first use)."""
    if batch_size not in self._engines:
      if self._device_params is None:
        self._device_params = engine_lib.prepare(self.cfg, self.params)
      buckets = sorted({1, min(8, batch_size), batch_size})
      self._engines[batch_size] = engine_lib.Engine(
          self.cfg, self._device_params, prune=self.prune, exits=self.exits, tau=self.tau,
          length_buckets=self.length_buckets, batch_buckets=buckets,
          chunk_tokens=self.chunk_tokens)
    return self._engines[batch_size]

  def encode(self, texts_or_pairs):
    pairs = _normalise(texts_or_pairs)
    rows = [None] * len(pairs)
    for is_pair in (False, True):
      idx = [i for i, (_, b) in enumerate(pairs) if (b is not None) == is_pair]
      if idx:
        enc = pairs_lib.encode(self.tokenizer, [pairs[i][0] for i in idx],
                               [pairs[i][1] for i in idx] if is_pair else None,
                               self.cfg.max_seq_length)
        for i, r in zip(idx, enc):
          rows[i] = r
    return rows

  def predict(self, texts_or_pairs, batch_size=32, tau=None):
    """Per input: label, probs (by label name), exit_layer (1-based), tokens_kept."""
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f'batch_size must be a positive int, got {batch_size!r}')
    tau = _check_tau(self.tau if tau is None else tau)
    rows = self.encode(texts_or_pairs)
    if not rows:
      return []
    out = self.engine(batch_size).predict(rows, tau=tau)
    last = np.clip(out['exit_layer'] - 1, 0, self.cfg.num_layers - 1)
    kept = np.take_along_axis(out['n_ffn'], last[:, None], axis=1)[:, 0]
    return [{'label': self.label_names[int(out['labels'][i])],
             'probs': {n: float(p) for n, p in zip(self.label_names, out['probs'][i])},
             'exit_layer': int(out['exit_layer'][i]), 'tokens_kept': int(kept[i]),
             'tokens_in': int(len(rows[i][0]))} for i in range(len(rows))]

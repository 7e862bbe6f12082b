"""Serving API: predict(texts), predict_pairs(firsts, seconds): labels, exits, flags (SPEC §8)."""

import collections
import math
import numbers

import numpy as np

from mp_jax import methods
from mp_jax import workdir as workdir_lib
from mp_jax.data import tokenization
from mp_jax.model import checks
from mp_jax.model import config as model_config
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import shapes

# Characters of input per token position kept before tokenizing (Predictor.max_chars default).
# A token needs at least one character, and a WordPiece word longer than 100 characters is a
# single [UNK], so ordinary text reaches max_seq_length tokens well inside 128 characters per
# position; the cap only bounds what hostile input costs (the tokenizer runs at about 1 us per
# character: a 30 MB text took 32 s and 5.6 GB before it was cut to 128 tokens).
CHARS_PER_TOKEN = 128
# Rows per compiled program at most: a larger batch_size runs as this one (same answers; the
# engine splits any number of rows into its batch buckets), so no request compiles a program
# whose activations grow with it.
MAX_BATCH_SIZE = 256
# Engines (one per batch size, each with its own compiled programs) kept, least recently used
# first out.
MAX_ENGINES = 4


def _kind(x):
  """A short description of a value for error messages: its type, and its length if a container."""
  name = type(x).__name__
  if isinstance(x, (tuple, list, dict)):
    return f'a {name} of {len(x)}'
  return 'None' if x is None else f'{name} {x!r:.40}'


def _hint(x):
  """What to do instead, for the misuses people make."""
  if isinstance(x, (bytes, bytearray)):
    return ': decode it first (e.g. b.decode("utf-8"))'
  if isinstance(x, tuple) and len(x) == 2:
    return ': for a sentence pair use predict_pairs([a], [b])'
  if isinstance(x, dict):
    return ': pass the texts themselves, e.g. [d["text"]]'
  return ''


def _check_list(texts, name, pair_hint):
  """A list of str as a list; anything else a TypeError saying what was passed and what fits."""
  if isinstance(texts, list):
    return texts
  if isinstance(texts, str):
    hint = ': for one text pass [text]' if pair_hint else ': pass lists, predict_pairs([a], [b])'
  elif isinstance(texts, tuple) and len(texts) == 2 and pair_hint:
    hint = ': a tuple of 2 looks like a sentence pair; use predict_pairs([a], [b]) for one, ' \
           'or pass a list for two texts'
  elif isinstance(texts, tuple) or hasattr(texts, 'tolist'):
    hint = f': pass list({name})' if isinstance(texts, tuple) else f': pass {name}.tolist()'
  else:
    hint = _hint(texts)
  raise TypeError(f'{name} must be a list of str, got {_kind(texts)}{hint}')


def _check_text(t, where):
  """A TypeError or ValueError naming `where` unless t is a str the tokenizer can read."""
  if not isinstance(t, str):
    raise TypeError(f'{where} must be a str, got {_kind(t)}{_hint(t)}')
  try:
    t.encode('utf-8')
  except UnicodeEncodeError as e:
    raise ValueError(f'{where} is not valid Unicode (lone surrogate {t[e.start]!r} at '
                     f'character {e.start})') from None


def _check_tau(tau):
  """tau as a float: a finite number in [0, 1] (uncertainty is normalised entropy, in [0, 1])."""
  ok = isinstance(tau, numbers.Real) and not isinstance(tau, bool)
  if not (ok and math.isfinite(tau) and 0.0 <= tau <= 1.0):
    raise ValueError(f'tau must be a finite number in [0, 1] (exit when uncertainty <= tau), '
                     f'got {tau!r}')
  return float(tau)


def _check_count(value, name):
  """value as an int >= 1, else a ValueError naming it."""
  if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{name} must be a positive int, got {value!r}')
  return int(value)


class Predictor:
  """Compiled pruned/early-exiting classifier for a trained workdir (exit plan `plan`: the heads
  that run at each tau; None: all of them)."""

  def __init__(self, cfg, params, tokenizer, label_names, *, method='mp', tau=0.0,
               length_buckets=None, chunk_tokens=None, schedule_max_length=None,
               max_chars=None, plan=None):
    self.cfg, self.params, self.tokenizer, self.plan = cfg, params, tokenizer, plan
    self.label_names, self.method, self.tau = list(label_names), method, _check_tau(tau)
    self.max_chars = _check_count(
        CHARS_PER_TOKEN * cfg.max_seq_length if max_chars is None else max_chars, 'max_chars')
    pruning, self.exits = methods.eval_modes(method)
    self.prune = pruning == 'hard'
    # None: this platform's serving defaults; batch buckets always the platform's (cut to each
    # call's batch size in `engine`), so one request runs unpadded whatever the config says.
    grid = shapes.resolve(dict(length_buckets=length_buckets, batch_buckets=None,
                               chunk_tokens=chunk_tokens, schedule_max_length=schedule_max_length))
    self.grid = shapes.for_model(grid, cfg.max_seq_length)
    self._engines = collections.OrderedDict()  # batch size -> Engine, least recently used first
    self._device_params = None  # on the device once, shared by the engines of every batch size

  @classmethod
  def from_workdir(cls, workdir, tau=None, dtype=None, *, max_chars=None):
    """The workdir's model; tau and compute dtype default to the trained ones; the exit plan
    runs at the head weight final/ was exported with."""
    if dtype is not None and dtype not in model_config.DTYPES:
      raise ValueError(f'dtype must be None (as trained) or one of {model_config.DTYPES}, '
                       f'got {dtype!r}')
    config, cfg, params, tok, names, plan = workdir_lib.load(workdir)
    cfg = cfg if dtype is None else cfg.replace(dtype=dtype)
    tau = config['eval']['tau'] if tau is None else tau
    return cls(cfg, params, tok, names, method=config['method'], tau=tau, plan=plan,
               length_buckets=config['eval'].get('length_buckets'),
               chunk_tokens=config['eval'].get('chunk_tokens'),
               schedule_max_length=config['eval'].get('schedule_max_length'), max_chars=max_chars)

  def engine(self, batch_size):
    """The compiled engine for this batch size, capped at MAX_BATCH_SIZE (compiles on use)."""
    batch_size = min(_check_count(batch_size, 'batch_size'), MAX_BATCH_SIZE)
    if batch_size in self._engines:
      self._engines.move_to_end(batch_size)
      return self._engines[batch_size]
    if self._device_params is None:
      self._device_params = engine_lib.prepare(self.cfg, self.params)
    grid = shapes.for_model(self.grid, self.cfg.max_seq_length, batch_size)
    self._engines[batch_size] = engine_lib.Engine(
        self.cfg, self._device_params, prune=self.prune, exits=self.exits, tau=self.tau,
        plan=self.plan,
        **grid.engine_kw())
    while len(self._engines) > MAX_ENGINES:
      self._engines.popitem(last=False)
    return self._engines[batch_size]

  def _cap(self, texts):
    """Texts cut to max_chars characters (surrounding whitespace first); which were cut."""
    out, cut = [], []
    for t in texts:
      if len(t) > self.max_chars:
        t = t.strip()  # whitespace makes no token: only text beyond the cap counts as cut
      cut.append(len(t) > self.max_chars)
      out.append(t[:self.max_chars])
    return out, cut

  def _encode(self, firsts, seconds):
    """(rows, truncated, empty_after_tokenizing) of checked texts or pairs."""
    n, max_len = len(firsts), self.cfg.max_seq_length
    firsts, cut = self._cap(firsts)
    if seconds is not None:
      seconds, cut_b = self._cap(seconds)
      cut = [x or y for x, y in zip(cut, cut_b, strict=True)]

    def encode(idx, length):
      return tokenization.encode_rows(self.tokenizer, [firsts[i] for i in idx],
                                      None if seconds is None else [seconds[i] for i in idx],
                                      length)

    # One token more than fits: a row that long was cut. Only those are encoded again (they
    # are at most max_chars long), so the tokenizer's own truncation decides what is kept.
    rows = encode(range(n), max_len + 1)
    long_ = [i for i, r in enumerate(rows) if len(r[0]) > max_len]
    for i, r in zip(long_, encode(long_, max_len) if long_ else [], strict=True):
      rows[i] = r
    specials = 2 if seconds is None else 3  # [CLS] a [SEP] (b [SEP])
    cut_tokens = set(long_)
    truncated = [c or i in cut_tokens for i, c in enumerate(cut)]
    return rows, truncated, [len(r[0]) <= specials for r in rows]

  def encode(self, texts, seconds=None):
    """Model rows (ids, type_ids) of texts, or of pairs (texts[i], seconds[i]); checked, capped."""
    return self._encode(*self._check(texts, seconds))[0]

  def _check(self, texts, seconds):
    """(firsts, seconds or None) after the checks predict and predict_pairs promise."""
    if seconds is None:
      texts = _check_list(texts, 'texts', pair_hint=True)
      for i, t in enumerate(texts):
        _check_text(t, f'texts[{i}]')
      return texts, None
    firsts = _check_list(texts, 'firsts', pair_hint=False)
    seconds = _check_list(seconds, 'seconds', pair_hint=False)
    if len(firsts) != len(seconds):
      raise ValueError(f'firsts has {len(firsts)} texts but seconds has {len(seconds)} '
                       '(one second text per first text)')
    for i, (a, b) in enumerate(zip(firsts, seconds)):
      _check_text(a, f'firsts[{i}]')
      _check_text(b, f'seconds[{i}]')
      if not (a.strip() or b.strip()):  # the training data's rule: one empty side is a pair
        raise ValueError(f'pair {i}: firsts[{i}] and seconds[{i}] are both empty')
    return firsts, seconds

  def predict(self, texts, batch_size=32, tau=None):
    """Per text (a list of str): label, probs, exit_layer, tokens_kept, tokens_in and flags.

    `truncated`: the text was cut (at max_chars characters, or at max_seq_length tokens).
    `empty_after_tokenizing`: the tokenizer kept nothing (the text is empty, whitespace-only, or
    only control, format or zero-width characters), so the model saw `[CLS] [SEP]`; it is
    answered, flagged, rather than refused: the text is valid, one such text should not fail a
    whole batch, and the caller decides what an answer without content is worth. Non-finite
    model output is a `checks.NonFiniteOutput` naming the texts, never an answer.
    """
    return self._predict(texts, None, batch_size, tau)

  def predict_pairs(self, firsts, seconds, batch_size=32, tau=None):
    """predict for sentence pairs (firsts[i], seconds[i]): two lists of str of equal length.

    One empty or whitespace-only side is a valid pair (as in the training data, `[CLS] a [SEP]
    [SEP]`); both is refused, the training data's rule (tokenization.check_pairs): a pair with
    no text on either side is not a pair. Sides of invisible characters only are text the
    tokenizer drops: answered, flagged `empty_after_tokenizing`. Each side is capped at
    max_chars characters.
    """
    return self._predict(firsts, seconds, batch_size, tau)

  def _predict(self, texts, seconds, batch_size, tau):
    batch_size = _check_count(batch_size, 'batch_size')
    tau = _check_tau(self.tau if tau is None else tau)
    rows, truncated, empty = self._encode(*self._check(texts, seconds))
    if not rows:
      return []
    try:
      out = self.engine(batch_size).predict(rows, tau=tau)
    except checks.NonFiniteOutput as e:
      # The engine's indices are the caller's: it got one row per input, in the caller's order.
      name = 'texts[{}]' if seconds is None else 'pair {}'
      where = ', '.join(name.format(i) for i in e.indices[:5])
      raise checks.NonFiniteOutput(
          f'{where}{" ..." if len(e.indices) > 5 else ""}: the model returned non-finite logits '
          f'({len(e.indices)} of {len(rows)} inputs); the weights hold NaN/inf (a diverged or '
          'damaged checkpoint)', e.indices) from e
    last = np.clip(out['exit_layer'] - 1, 0, self.cfg.num_layers - 1)
    kept = np.take_along_axis(out['n_ffn'], last[:, None], axis=1)[:, 0]
    return [{'label': self.label_names[int(out['labels'][i])],
             'probs': {n: float(p) for n, p in zip(self.label_names, out['probs'][i])},
             'exit_layer': int(out['exit_layer'][i]), 'tokens_kept': int(kept[i]),
             'tokens_in': int(len(rows[i][0])), 'truncated': truncated[i],
             'empty_after_tokenizing': empty[i]} for i in range(len(rows))]

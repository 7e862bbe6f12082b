"""Text-pair encoding whose cost is linear in the text lengths.

`tokenizers` truncates a pair by building every combination of the two sides' overflow pieces:
two 100k-character texts at max_len=24 need tens of GB. Here each side is encoded alone (no
truncation), the Hugging Face `longest_first` rule picks how many tokens each side keeps, and
the pair `[CLS] a [SEP] b [SEP]` is assembled. The result is the tokenizer's own pair encoding;
a probe checks that the tokenizer uses that template, else its pair encoding is used as is.
"""

import weakref

import numpy as np

from mp_jax import tokenization

NO_LIMIT = 2**31 - 1
# Side lengths (in words) that exercise every branch of the rule at max_len 6..12.
_PROBE = (['a b c d e f', 'x', 'a b c d e', 'a b c d e f g', 'a b c d'],
          ['g h', 'y z w v u t s', 'f g h i j k', 'h i j k l', 'e f g h'])
_CHECKED = weakref.WeakKeyDictionary()


def longest_first(len_a, len_b, budget):
  """Tokens kept from each side: `tokenizers`' longest_first (right truncation) rule."""
  if len_a + len_b <= budget:
    return len_a, len_b
  short, long_ = sorted((len_a, len_b))
  long_ = short if short > budget else max(short, budget - short)
  if short + long_ > budget:
    short, long_ = budget // 2, budget // 2 + budget % 2
  return (long_, short) if len_a > len_b else (short, long_)


def _singles(tok, texts):
  """Untruncated single encodings; an empty side is `[CLS] [SEP]` (singles must be non-empty)."""
  full = [t for t in texts if t.strip()]
  encs = iter(tok.encode(full, max_len=NO_LIMIT) if full else [])
  empty = np.asarray([tok.cls_id, tok.sep_id], np.int32)
  return [next(encs)[0] if t.strip() else empty for t in texts]


def _assemble(tok, texts_a, texts_b, max_len):
  singles_a, singles_b = _singles(tok, texts_a), _singles(tok, texts_b)
  cls_sep = np.asarray([tok.cls_id, tok.sep_id], np.int32)
  out = []
  for ids_a, ids_b in zip(singles_a, singles_b, strict=True):
    ka, kb = longest_first(len(ids_a) - 2, len(ids_b) - 2, max_len - 3)
    ids = np.concatenate([cls_sep[:1], ids_a[1:ka + 1], cls_sep[1:], ids_b[1:kb + 1],
                          cls_sep[1:]]).astype(np.int32)
    types = np.concatenate([np.zeros(ka + 2, np.int32), np.ones(kb + 1, np.int32)])
    out.append((ids, types))
  return out


def _standard_template(tok):
  """True if the tokenizer's pairs are `[CLS] a [SEP] b [SEP]` with types 0..0 1..1."""
  if tok not in _CHECKED:
    ok = True
    for max_len in (6, 7, 8, 9, 12):
      want = tok.encode(*_PROBE, max_len=max_len)
      got = _assemble(tok, *_PROBE, max_len)
      ok = ok and all(np.array_equal(w[0], g[0]) and np.array_equal(w[1], g[1])
                      for w, g in zip(want, got, strict=True))
    _CHECKED[tok] = ok
  return _CHECKED[tok]


def encode(tok, texts_a, texts_b, max_len):
  """`tok.encode(texts_a, texts_b, max_len=max_len)` in linear time and memory for pairs."""
  if texts_b is None:
    return tok.encode(texts_a, None, max_len=max_len)
  texts_a, texts_b = list(texts_a), list(texts_b)
  if len(texts_a) != len(texts_b):
    raise ValueError(f'texts_a has {len(texts_a)} items but texts_b has {len(texts_b)}')
  tokenization.check_pairs(texts_a, texts_b)
  if max_len < 5 or not texts_a or not _standard_template(tok):
    return tok.encode(texts_a, texts_b, max_len=max_len)
  return _assemble(tok, texts_a, texts_b, max_len)

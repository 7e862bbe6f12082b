"""BERT WordPiece tokenizer (HF `tokenizers`) and text -> model rows: singles, pairs, truncation.

Pairs: `tokenizers` truncates a pair by building every combination of the two sides' overflow
pieces (two 100k-character texts at max_len=24 need tens of GB). `encode_pairs` encodes each side
alone (no truncation), picks how many tokens each keeps by the Hugging Face `longest_first` rule,
and assembles `[CLS] a [SEP] b [SEP]`: the tokenizer's own pair encoding, in linear time and
memory. A probe checks that the tokenizer uses that template, else its pair encoding is used.
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors

_SPECIALS = {'unk_token': '[UNK]', 'sep_token': '[SEP]', 'pad_token': '[PAD]',
             'cls_token': '[CLS]', 'mask_token': '[MASK]'}


def _read_vocab(path: Path) -> dict[str, int]:
  """Reads vocab.txt (one token a line; id = line number; later duplicates win)."""
  with open(path, encoding='utf-8') as f:
    return {line.rstrip('\n'): i for i, line in enumerate(f)}


def _read_json(path: Path) -> dict:
  if not path.is_file():
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def build_wordpiece(vocab: dict[str, int], *, do_lower_case: bool = True,
                    tokenize_chinese_chars: bool = True, strip_accents: bool | None = None,
                    specials: dict[str, str] | None = None) -> tokenizers.Tokenizer:
  """Builds the standard BERT WordPiece pipeline from a vocabulary."""
  sp = {**_SPECIALS, **(specials or {})}
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token=sp['unk_token']))
  tok.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
      strip_accents=strip_accents, lowercase=do_lower_case)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix='##')
  cls, sep = sp['cls_token'], sp['sep_token']
  for name in (cls, sep):
    if name not in vocab:
      raise ValueError(f'special token {name!r} is not in the vocabulary')
  tok.post_processor = processors.TemplateProcessing(
      single=f'{cls}:0 $A:0 {sep}:0', pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
      special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
  tok.add_special_tokens([t for t in sp.values() if t in vocab])
  return tok


class Tokenizer:
  """The checkpoint's fast WordPiece tokenizer: [CLS] a [SEP] (b [SEP]), no padding."""

  def __init__(self, tok: tokenizers.Tokenizer, *, do_lower_case: bool = True,
               specials: dict[str, str] | None = None):
    self._tok = tok
    self._tok.no_padding()
    self._tok.no_truncation()
    self.do_lower_case = do_lower_case
    self.specials = {**_SPECIALS, **(specials or {})}

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads `tokenizer.json` if present, else builds from `vocab.txt` + `tokenizer_config.json`."""
    path = Path(path)
    cfg = _read_json(path / 'tokenizer_config.json')
    specials = {k: cfg[k] for k in _SPECIALS if isinstance(cfg.get(k), str)}
    if (path / 'tokenizer.json').is_file():
      tok = tokenizers.Tokenizer.from_file(str(path / 'tokenizer.json'))
      norm = json.loads(tok.to_str()).get('normalizer') or {}
      lower = bool(norm.get('lowercase', cfg.get('do_lower_case', True)))
      return cls(tok, do_lower_case=lower, specials=specials)
    if not (path / 'vocab.txt').is_file():
      raise FileNotFoundError(f'{path}: neither tokenizer.json nor vocab.txt found')
    lower = bool(cfg.get('do_lower_case', True))
    tok = build_wordpiece(
        _read_vocab(path / 'vocab.txt'), do_lower_case=lower,
        tokenize_chinese_chars=bool(cfg.get('tokenize_chinese_chars', True)),
        strip_accents=cfg.get('strip_accents'), specials=specials)
    return cls(tok, do_lower_case=lower, specials=specials)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def max_id(self) -> int:
    """The largest id this tokenizer emits (ids need not be contiguous: vocab_size can be less)."""
    return max(self._tok.get_vocab(with_added_tokens=True).values())

  @property
  def pad_id(self) -> int:
    pid = self._tok.token_to_id(self.specials['pad_token'])
    return 0 if pid is None else pid

  @property
  def cls_id(self) -> int:
    return self._tok.token_to_id(self.specials['cls_token'])

  @property
  def sep_id(self) -> int:
    return self._tok.token_to_id(self.specials['sep_token'])

  def encode(self, texts_a: Sequence[str], texts_b: Sequence[str] | None = None, *,
             max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encodes singles or pairs to a list of (ids_T, type_ids_T) int32 arrays, truncated."""
    if isinstance(texts_a, str) or isinstance(texts_b, str):
      raise TypeError('encode takes sequences of strings, not a single string')
    texts_a = list(texts_a)
    inputs = texts_a
    if texts_b is None:
      _check_texts(texts_a, 'texts_a')
    else:
      texts_b = list(texts_b)
      if len(texts_b) != len(texts_a):
        raise ValueError(f'texts_a has {len(texts_a)} items but texts_b has {len(texts_b)}')
      check_pairs(texts_a, texts_b)
      inputs = list(zip(texts_a, texts_b, strict=True))
    min_len = 3 if texts_b is None else 5
    if max_len < min_len:
      raise ValueError(f'max_len={max_len} leaves no room for text (need >= {min_len})')
    if not inputs:
      return []
    self._tok.enable_truncation(max_len, strategy='longest_first')
    try:
      encs = self._tok.encode_batch(inputs, add_special_tokens=True)
    finally:
      self._tok.no_truncation()
    return [(np.asarray(e.ids, np.int32), np.asarray(e.type_ids, np.int32)) for e in encs]

  def tokenize(self, text: str) -> list[str]:
    """Word pieces of one text (no special tokens)."""
    return self._tok.encode(text, add_special_tokens=False).tokens

  def decode(self, ids: Sequence[int]) -> str:
    """Text of ids with special tokens removed."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, path: str | os.PathLike) -> None:
    """Writes tokenizer.json, vocab.txt, tokenizer_config.json (HF BertTokenizerFast loads it)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    self._tok.save(str(path / 'tokenizer.json'))
    vocab = self._tok.get_vocab(with_added_tokens=True)
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
      raise ValueError('vocabulary ids are not contiguous from 0; cannot write vocab.txt')
    with open(path / 'vocab.txt', 'w', encoding='utf-8') as f:
      f.writelines(f'{t}\n' for t, _ in by_id)
    cfg = {'tokenizer_class': 'BertTokenizer', 'do_lower_case': self.do_lower_case,
           **self.specials, 'model_max_length': 512}
    with open(path / 'tokenizer_config.json', 'w', encoding='utf-8') as f:
      json.dump(cfg, f, indent=2)
    with open(path / 'special_tokens_map.json', 'w', encoding='utf-8') as f:
      json.dump(self.specials, f, indent=2)


def _check_texts(texts: list, name: str, allow_empty: bool = False) -> None:
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f'{name}[{i}] is {type(t).__name__}, not str')
    if not (allow_empty or t.strip()):
      raise ValueError(f'{name}[{i}] is empty or whitespace-only')


def check_pairs(texts_a: Sequence, texts_b: Sequence) -> None:
  """Strings only; one empty side is a valid pair (HF: `[CLS] a [SEP] [SEP]`), both is not."""
  _check_texts(texts_a, 'texts_a', allow_empty=True)
  _check_texts(texts_b, 'texts_b', allow_empty=True)
  for i, (a, b) in enumerate(zip(texts_a, texts_b, strict=True)):
    if not (a.strip() or b.strip()):
      raise ValueError(f'pair {i}: texts_a[{i}] and texts_b[{i}] are both empty')


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
  """Untruncated single encodings (ids only); a blank side is `[CLS] [SEP]` (encode_rows)."""
  return [ids for ids, _ in encode_rows(tok, texts, None, NO_LIMIT)]


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


def encode_pairs(tok, texts_a, texts_b, max_len):
  """`tok.encode(texts_a, texts_b, max_len=max_len)` in linear time and memory for pairs."""
  if texts_b is None:
    return tok.encode(texts_a, None, max_len=max_len)
  texts_a, texts_b = list(texts_a), list(texts_b)
  if len(texts_a) != len(texts_b):
    raise ValueError(f'texts_a has {len(texts_a)} items but texts_b has {len(texts_b)}')
  check_pairs(texts_a, texts_b)
  if max_len < 5 or not texts_a or not _standard_template(tok):
    return tok.encode(texts_a, texts_b, max_len=max_len)
  return _assemble(tok, texts_a, texts_b, max_len)


def encode_rows(tok, texts_a, texts_b, max_len):
  """Model rows (ids_T, type_ids_T) of texts and pairs, in input order (the one text -> rows rule).

  Row i is a pair if `texts_b[i]` is a str, a single if it is None (`texts_b=None`: all
  singles). A blank single is `[CLS] [SEP]`, as a blank side of a pair is; callers that must
  refuse blank input check before.
  """
  texts_a = list(texts_a)
  texts_b = [None] * len(texts_a) if texts_b is None else list(texts_b)
  if len(texts_b) != len(texts_a):
    raise ValueError(f'texts_a has {len(texts_a)} items but texts_b has {len(texts_b)}')
  blank = np.asarray([tok.cls_id, tok.sep_id], np.int32)
  rows = [(blank, np.zeros(2, np.int32))] * len(texts_a)
  singles = [i for i, b in enumerate(texts_b) if b is None and texts_a[i].strip()]
  pairs = [i for i, b in enumerate(texts_b) if b is not None]
  if singles:
    for i, r in zip(singles, tok.encode([texts_a[i] for i in singles], max_len=max_len),
                    strict=True):
      rows[i] = r
  if pairs:
    encs = encode_pairs(tok, [texts_a[i] for i in pairs], [texts_b[i] for i in pairs], max_len)
    for i, r in zip(pairs, encs, strict=True):
      rows[i] = r
  return rows

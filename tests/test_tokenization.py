"""mp_jax.data.tokenization: parity with transformers.BertTokenizerFast on a tiny vocab."""

import json

import numpy as np
import pytest
import transformers

from mp_jax.data import tokenization
from mp_jax.data.tokenization import Tokenizer

VOCAB = ['[PAD]', '[unused0]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'the', 'a', 'movie', 'is',
         'good', 'bad', 'not', 'very', 'play', '##ing', '##ed', '##s', 'un', '##believ', '##able',
         ',', '.', '!', '?', "'", 'cafe', 'naive', '中', '文', 'hello', 'world', 'it', 'was',
         'Good', 'The', 'Movie', 'what', 'do', 'you', 'think']

SINGLES = ['The movie is very good!', 'It was unbelievable, not bad.', 'Café naïve 中文 hello',
           'playing played plays movies xyzzy', 'the ' * 40 + 'end', "what do you think? it's good"]
PAIRS_B = ['good', 'The movie ' * 30, 'hello world', 'a ' * 25, 'bad.', 'very very very good']


@pytest.fixture(name='vocab_dir')
def fixture_vocab_dir(tmp_path):
  d = tmp_path / 'vocab'
  d.mkdir()
  (d / 'vocab.txt').write_text(''.join(f'{t}\n' for t in VOCAB), encoding='utf-8')
  return d


def _hf(path):
  return transformers.BertTokenizerFast.from_pretrained(str(path))


def _assert_same(ours, hf_out):
  assert len(ours) == len(hf_out['input_ids'])
  for (ids, types), hf_ids, hf_types in zip(ours, hf_out['input_ids'], hf_out['token_type_ids']):
    assert ids.dtype == np.int32 and types.dtype == np.int32
    assert ids.tolist() == hf_ids
    assert types.tolist() == hf_types


@pytest.mark.parametrize('max_len', [8, 13, 64])
def test_singles_match_hf(vocab_dir, max_len):
  ours = Tokenizer.from_dir(vocab_dir).encode(SINGLES, max_len=max_len)
  _assert_same(ours, _hf(vocab_dir)(SINGLES, truncation=True, max_length=max_len))
  assert max(len(ids) for ids, _ in ours) == min(max_len, max(len(i) for i, _ in ours))


@pytest.mark.parametrize('max_len', [9, 16, 200])
def test_pairs_match_hf_longest_first(vocab_dir, max_len):
  ours = Tokenizer.from_dir(vocab_dir).encode(SINGLES, PAIRS_B, max_len=max_len)
  hf = _hf(vocab_dir)(SINGLES, PAIRS_B, truncation='longest_first', max_length=max_len)
  _assert_same(ours, hf)
  ids, types = ours[0]
  tok = Tokenizer.from_dir(vocab_dir)
  assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id
  assert (ids == tok.sep_id).sum() == 2 and types[0] == 0 and types[-1] == 1
  assert all(len(i) <= max_len for i, _ in ours)


@pytest.mark.parametrize('max_len', [5, 7, 64])
def test_pairs_with_one_empty_side_match_hf(vocab_dir, max_len):
  a = ['what do you think?', '', 'the movie ' * 10, '  ']
  b = ['', 'it was good', '', 'bad.']
  hf = _hf(vocab_dir)(a, b, truncation='longest_first', max_length=max_len)
  tok = Tokenizer.from_dir(vocab_dir)
  _assert_same(tok.encode(a, b, max_len=max_len), hf)
  _assert_same(tokenization.encode_pairs(tok, a, b, max_len), hf)  # the linear-time path
  ids, types = tok.encode(['it was good'], [''], max_len=max_len)[0]
  want = [tok.cls_id] + tok._tok.encode('it was good', add_special_tokens=False).ids
  assert ids.tolist() == (want[:max_len - 2] + [tok.sep_id, tok.sep_id])  # [CLS] a [SEP] [SEP]
  assert types.tolist()[-1] == 1 and types.tolist()[:-1] == [0] * (len(ids) - 1)


@pytest.mark.parametrize('max_len', [6, 64])
def test_encode_rows_mixes_singles_pairs_and_blank_texts_in_input_order(vocab_dir, max_len):
  """The one text -> rows rule: rows as the tokenizer encodes them; a blank single `[CLS] [SEP]`."""
  tok = Tokenizer.from_dir(vocab_dir)
  a = ['it was good', 'what do you think?', '  ', 'the movie ' * 10, '\t']
  b = [None, 'bad.', None, '', 'it was good']
  rows = tokenization.encode_rows(tok, a, b, max_len)
  assert len(rows) == len(a)
  for i, (ids, types) in enumerate(rows):
    if b[i] is None and not a[i].strip():
      want = ([tok.cls_id, tok.sep_id], [0, 0])
    else:
      (w_ids, w_types), = tok.encode([a[i]], None if b[i] is None else [b[i]], max_len=max_len)
      want = (w_ids.tolist(), w_types.tolist())
    assert (ids.tolist(), types.tolist()) == want, i
    assert ids.dtype == types.dtype == np.int32
  assert [r[0].tolist() for r in tokenization.encode_rows(tok, a[:1], None, max_len)] == [
      rows[0][0].tolist()]  # texts_b=None: all singles
  with pytest.raises(ValueError, match='texts_a has 2 items but texts_b has 1'):
    tokenization.encode_rows(tok, a[:2], b[:1], max_len)


def test_lowercase_and_unknown(vocab_dir):
  tok = Tokenizer.from_dir(vocab_dir)
  assert tok.do_lower_case
  assert tok.tokenize('The PLAYING xyzzy') == ['the', 'play', '##ing', '[UNK]']
  assert tok.tokenize('Café') == ['cafe']  # BERT uncased strips accents when lowercasing
  (vocab_dir / 'tokenizer_config.json').write_text(json.dumps({'do_lower_case': False}))
  cased = Tokenizer.from_dir(vocab_dir)
  assert not cased.do_lower_case
  assert cased.tokenize('The Movie') == ['The', 'Movie']
  _assert_same(cased.encode(SINGLES, max_len=32), _hf(vocab_dir)(SINGLES, truncation=True,
                                                                     max_length=32))


def test_special_ids_and_sizes(vocab_dir):
  tok = Tokenizer.from_dir(vocab_dir)
  assert tok.vocab_size == len(VOCAB)
  assert (tok.pad_id, tok.cls_id, tok.sep_id) == (0, 3, 4)
  assert tok.decode(tok.encode(['the movie'], max_len=8)[0][0]) == 'the movie'


def test_save_roundtrip_loads_in_hf_and_here(vocab_dir, tmp_path):
  tok = Tokenizer.from_dir(vocab_dir)
  out = tmp_path / 'saved'
  tok.save(out)
  assert {'tokenizer.json', 'vocab.txt', 'tokenizer_config.json'} <= {p.name for p in
                                                                       out.iterdir()}
  assert (out / 'vocab.txt').read_text(encoding='utf-8').splitlines() == VOCAB
  hf = _hf(out)
  _assert_same(tok.encode(SINGLES, PAIRS_B, max_len=20),
               hf(SINGLES, PAIRS_B, truncation='longest_first', max_length=20))
  again = Tokenizer.from_dir(out)  # loads tokenizer.json this time
  for (a, ta), (b, tb) in zip(again.encode(SINGLES, PAIRS_B, max_len=20),
                              tok.encode(SINGLES, PAIRS_B, max_len=20)):
    assert a.tolist() == b.tolist() and ta.tolist() == tb.tolist()


def test_tokenizer_json_padding_and_truncation_are_ignored(vocab_dir, tmp_path):
  """A checkpoint's tokenizer.json may pin padding/truncation (all-MiniLM: 128); we drop both."""
  out = tmp_path / 'ckpt'
  Tokenizer.from_dir(vocab_dir).save(out)
  spec = json.loads((out / 'tokenizer.json').read_text())
  spec['truncation'] = {'max_length': 6, 'strategy': 'LongestFirst', 'stride': 0,
                        'direction': 'Right'}
  spec['padding'] = {'strategy': {'Fixed': 50}, 'direction': 'Right', 'pad_to_multiple_of': None,
                     'pad_id': 0, 'pad_type_id': 0, 'pad_token': '[PAD]'}
  (out / 'tokenizer.json').write_text(json.dumps(spec))
  ids, _ = Tokenizer.from_dir(out).encode(['the movie is very good'], max_len=30)[0]
  assert len(ids) == 7


def test_errors_name_the_input(vocab_dir):
  tok = Tokenizer.from_dir(vocab_dir)
  with pytest.raises(ValueError, match=r'texts_a\[1\] is empty'):
    tok.encode(['good', '   ', 'bad'], max_len=16)
  with pytest.raises(ValueError, match=r'pair 2: texts_a\[2\] and texts_b\[2\] are both empty'):
    tok.encode(['a', 'b', ' '], ['a', 'b', ''], max_len=16)
  with pytest.raises(ValueError, match=r'pair 1: .* both empty'):
    tokenization.encode_pairs(tok, ['a', '', 'c'], ['a', '\t', 'c'], 16)
  with pytest.raises(TypeError, match=r'texts_b\[0\] is NoneType'):
    tokenization.encode_pairs(tok, ['a'], [None], 16)
  with pytest.raises(ValueError, match='3 items but texts_b has 2'):
    tok.encode(['a', 'b', 'c'], ['a', 'b'], max_len=16)
  with pytest.raises(TypeError):
    tok.encode('just a string', max_len=16)
  with pytest.raises(ValueError, match='max_len'):
    tok.encode(['a'], ['b'], max_len=4)
  with pytest.raises(FileNotFoundError, match='vocab.txt'):
    Tokenizer.from_dir(vocab_dir / 'missing')
  assert tok.encode([], max_len=16) == []

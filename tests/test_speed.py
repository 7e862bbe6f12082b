"""mp_jax.training.speed: both frameworks train on the same batches (speeds not asserted)."""

import numpy as np
import pytest

from mp_jax.data import batching, tokenization
from mp_jax.model import bert, hf
from mp_jax.training import speed
from tests import tiny
from tests.conftest import tiny_config


def test_train_vs_torch_steps_both_frameworks_on_the_same_batches(tmp_path):
  pytest.importorskip('transformers')
  c = tiny.config(tmp_path, 'method=bert,smoke')
  tok = tokenization.Tokenizer.from_dir(c.model.tokenizer)
  cfg = tiny_config(vocab_size=tok.vocab_size, num_labels=2, final_threshold=0.05)
  params = bert.init_params(cfg)
  hf.save(tmp_path / 'hf', cfg, params, tok)
  rng = np.random.default_rng(0)
  ids = [np.concatenate([[2], rng.integers(5, tok.vocab_size, k - 1)]).astype(np.int32)
         for k in (5, 9, 12, 16, 7, 3, 14, 10)]
  enc = batching.Encoded(ids=ids, type_ids=[np.zeros_like(i) for i in ids],
                         labels=np.asarray([0, 1] * 4, np.int32),
                         lengths=np.asarray([len(i) for i in ids], np.int32))
  batches = list(batching.batches(enc, 4, buckets=(8, 16), drop_last=True))
  r = speed.train_vs_torch(c, cfg, params, tmp_path / 'hf', batches, repeats=1)
  assert r['batches'] == 2 and r['batch_size'] == 4
  assert r['ratio'] == pytest.approx(r['jax_examples_per_s'] / r['torch_examples_per_s'])

"""FLOPs accounting (SPEC §5): hand counts, dense baseline, exit heads, the model's counts."""

import numpy as np
import pytest

from mp_jax.model import bert, flops
from mp_jax.model import config as model_config
from tests.conftest import make_batch, peaky_params, tiny_config

# d=4, d_ff=8, L=2, exit width 2, 3 labels.
HAND = model_config.ModelConfig(hidden_size=4, intermediate_size=8, num_layers=2, exit_width=2,
                                num_labels=3)


def test_layer_and_head_hand_counts():
  # 4*4*4*5 + 2*4*5*5 + 2*4*8*3 = 320 + 200 + 192
  assert flops.layer_macs(4, 8, 5, 3) == 712
  # down 4*2*3 + key/value 2*2*2*3 + [CLS] scores/sum 2*2*3 + query/out/dense 3*2*2 + logits 2*3
  assert flops.exit_head_macs(4, 2, 3, 3) == 24 + 24 + 12 + 12 + 6
  np.testing.assert_array_equal(flops.layer_macs(4, 8, np.asarray([5, 2]), np.asarray([3, 2])),
                                [712, 128 + 32 + 128])


def test_example_flops_hand_count():
  n_attn_NxL = np.asarray([[5, 3], [2, 2]])
  n_ffn_NxL = np.asarray([[3, 2], [2, 1]])
  # Example 0: layer 1 = 712, layer 2 = 4*16*3 + 2*4*3*3 + 2*4*8*2 = 192 + 72 + 128 = 392.
  # Example 1: layer 1 = 128 + 32 + 128 = 288, layer 2 = 128 + 32 + 64 = 224.
  # Exit head after layer 1: example 0 reads 3 tokens -> 78 MACs, example 1 reads 2 -> 58.
  np.testing.assert_array_equal(flops.example_flops(HAND, n_attn_NxL, n_ffn_NxL),
                                [2 * (712 + 392), 2 * (288 + 224)])
  # Exits on, nobody left early: the head at layer 1 ran and did not exit (no head at L).
  np.testing.assert_array_equal(
      flops.example_flops(HAND, n_attn_NxL, n_ffn_NxL, exits=True),
      [2 * (712 + 392 + 78), 2 * (288 + 224 + 58)])
  # Example 0 exits at layer 1: layer 1 and its head only; example 1 answers at layer 2.
  np.testing.assert_array_equal(
      flops.example_flops(HAND, n_attn_NxL, n_ffn_NxL, exit_layer_N=np.asarray([1, 2])),
      [2 * (712 + 78), 2 * (288 + 224 + 58)])
  # Dense: 2 layers at full length 5 and 2.
  np.testing.assert_array_equal(flops.dense_flops(HAND, [5, 2]),
                                [2 * 2 * (320 + 200 + 320), 2 * 2 * (128 + 32 + 128)])


def test_bert_base_dense_is_the_usual_22_gflops():
  base = model_config.ModelConfig(hidden_size=768, intermediate_size=3072, num_layers=12)
  # 12 * (4*768^2*128 + 2*768*128^2 + 2*768*3072*128) MACs
  assert flops.dense_flops(base, [128])[0] == 2 * 11_173_625_856
  assert flops.summarize(base, [[128] * 12], [[128] * 12])['gflops_per_example'] == (
      pytest.approx(22.347, abs=1e-3))


def test_no_pruning_equals_dense():
  cfg = tiny_config()
  lengths_N = np.asarray([16, 3, 9, 1])
  full_NxL = np.tile(lengths_N[:, None], (1, cfg.num_layers))
  np.testing.assert_array_equal(flops.example_flops(cfg, full_NxL, full_NxL),
                                flops.dense_flops(cfg, lengths_N))
  s = flops.summarize(cfg, full_NxL, full_NxL)
  assert s['flops_speedup'] == 1.0
  assert s['gflops_per_example'] == s['dense_gflops_per_example'] > 0


def test_exit_heads_are_counted():
  cfg = tiny_config()
  n_NxL = np.asarray([[10, 8, 6], [7, 7, 7]])
  plain = flops.example_flops(cfg, n_NxL, n_NxL, exits=False)
  heads = flops.exit_head_macs(cfg.hidden_size, cfg.exit_width, n_NxL[:, :2], cfg.num_labels)
  assert np.all(heads > 0)
  with_heads = flops.example_flops(cfg, n_NxL, n_NxL, exits=True)
  np.testing.assert_array_equal(with_heads - plain, 2 * heads.sum(-1))
  # Exiting at layer 2 skips layer 3 but pays for the heads at layers 1 and 2.
  early = flops.example_flops(cfg, n_NxL, n_NxL, exit_layer_N=[2, 2])
  layers = flops.layer_macs(cfg.hidden_size, cfg.intermediate_size, n_NxL, n_NxL)
  np.testing.assert_array_equal(early, 2 * (layers[:, :2].sum(-1) + heads.sum(-1)))
  # An exit plan's mask: a skipped head is not counted, and no example can exit there.
  masked = flops.example_flops(cfg, n_NxL, n_NxL, exit_layer_N=[2, 3], exits=[False, True])
  np.testing.assert_array_equal(masked, 2 * (layers[:, :2].sum(-1) + heads[:, 1]
                                             + [0, layers[1, 2]]))
  # Exits at a layer whose head did not run (exits=False: none did) are errors; so are
  # out-of-range layers.
  for mask in (False, [False, True]):
    with pytest.raises(ValueError, match='head did not run'):
      flops.example_flops(cfg, n_NxL, n_NxL, exit_layer_N=[1, 3], exits=mask)
  with pytest.raises(ValueError, match='1..3'):
    flops.example_flops(cfg, n_NxL, n_NxL, exit_layer_N=[0, 3])
  with pytest.raises(ValueError, match='layers'):
    flops.example_flops(cfg, n_NxL[:, :2], n_NxL[:, :2])


def test_summary_and_the_models_counts():
  cfg = tiny_config()
  params = peaky_params(cfg)
  params['thresholds'] = np.full((cfg.num_layers,), 0.9 / cfg.max_seq_length, np.float32)
  lengths = np.asarray([11, 6, 9])
  batch = make_batch(lengths, 11)
  _, aux = bert.MagicPyramid(cfg).apply({'params': params}, *batch, pruning='hard',
                                        exits=True)
  n_attn_NxL, n_ffn_NxL = np.asarray(aux['n_attn']).T, np.asarray(aux['n_ffn']).T
  # The counts the model reports are those its masks imply.
  m_LxBxT = np.asarray(aux['masks'])
  np.testing.assert_array_equal(n_ffn_NxL, m_LxBxT.sum(-1).T)
  np.testing.assert_array_equal(n_attn_NxL[:, 0], lengths)
  np.testing.assert_array_equal(n_attn_NxL[:, 1:], n_ffn_NxL[:, :-1])
  actual = flops.example_flops(cfg, n_attn_NxL, n_ffn_NxL)
  dense = flops.dense_flops(cfg, lengths)
  assert np.all(actual < dense)
  exit_layer_N = np.asarray([1, 3, 2])
  s = flops.summarize(cfg, n_attn_NxL, n_ffn_NxL, exit_layer_N=exit_layer_N)
  want = flops.example_flops(cfg, n_attn_NxL, n_ffn_NxL, exit_layer_N)
  assert s['gflops_per_example'] == pytest.approx(want.mean() / 1e9, rel=1e-12)
  assert s['dense_gflops_per_example'] == pytest.approx(dense.mean() / 1e9, rel=1e-12)
  assert s['flops_speedup'] == pytest.approx(dense.mean() / want.mean(), rel=1e-12)
  assert s['flops_speedup'] > 1
  # Vectorised over examples: one at a time gives the same.
  for i in range(3):
    one = flops.example_flops(cfg, n_attn_NxL[i:i + 1], n_ffn_NxL[i:i + 1], exit_layer_N[i:i + 1])
    assert one[0] == want[i]


# HAND's shapes at d = 8, cut to 2 of 4 heads of size 2 (a = 4), FFN 6 of 10, word table rank 3.
SLIM = model_config.ModelConfig(hidden_size=8, num_heads=2, head_size=2, unpruned_heads=4,
                                intermediate_size=6, unpruned_intermediate_size=10,
                                embedding_rank=3, num_layers=2, exit_width=2, num_labels=3)


def test_slim_model_hand_count_against_the_unpruned_dense_baseline():
  # q, k, v 3*8*4*5 = 480, output 4*8*5 = 160, scores and sum 2*4*5*5 = 200, FFN 2*8*6*3 = 288
  assert flops.layer_macs(8, 6, 5, 3, a=4) == 480 + 160 + 200 + 288
  assert flops.embedding_macs(8, 3, 5) == 3 * 8 * 5
  n_attn_NxL, n_ffn_NxL = [[5, 3]], [[3, 2]]
  # Layer 2: 3*8*4*3 + 4*8*3 + 2*4*3*3 + 2*8*6*2 = 288 + 96 + 72 + 192; embedding 120.
  actual = 2 * (1128 + 648 + 120)
  assert flops.example_flops(SLIM, n_attn_NxL, n_ffn_NxL)[0] == actual
  # Dense: the unpruned model (4 heads of 2 = d, FFN 10, no factorisation), at length 5:
  # 2 layers of 4*8*8*5 + 2*8*5*5 + 2*8*10*5 = 1280 + 400 + 800, never SLIM's own 2*(640+200+480).
  dense = 2 * 2 * (1280 + 400 + 800)
  assert SLIM.unpruned() == model_config.ModelConfig(hidden_size=8, num_heads=4,
                                                     intermediate_size=10, num_layers=2,
                                                     exit_width=2, num_labels=3)
  assert flops.dense_flops(SLIM, [5])[0] == dense
  s = flops.summarize(SLIM, n_attn_NxL, n_ffn_NxL)
  assert s['dense_gflops_per_example'] == dense / 1e9
  assert s['flops_speedup'] == pytest.approx(dense / actual, rel=1e-12)
  # No token pruning: width alone (layer 480 + 160 + 200 + 480, twice, plus the embedding).
  full = flops.summarize(SLIM, [[5, 5]], [[5, 5]])
  assert full['flops_speedup'] == pytest.approx(dense / (2 * (2 * 1320 + 120)), rel=1e-12)

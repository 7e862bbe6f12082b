"""Sentence polarity on the offline Rotten Tomatoes sentences (SPEC §7), MiniLM-L6."""

from configs import base


def get_config(arg=None):
  return base.build(
      arg, data=dict(source='mr'),
      model=dict(max_seq_length=64, final_threshold=0.01),  # from experiments/calibrate.py
      train=dict(lr=5e-5, hard_lr=5e-5, epochs=dict(finetune=3, soft=1, hard=2, exits=2)))

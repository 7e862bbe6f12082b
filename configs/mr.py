"""Sentence polarity on the offline Rotten Tomatoes sentences (SPEC §7), MiniLM-L6."""

from configs import base


def get_config(arg=None):
  return base.build(
      arg, data=dict(source='mr'),
      model=dict(max_seq_length=64),
      train=dict(lr=5e-5, hard_lr=5e-5, width_lr=5e-5))

"""BBC News topics (5 classes, long documents; SPEC §7), MiniLM-L6: room for token pruning."""

from configs import base


def get_config(arg=None):
  return base.build(
      arg, data=dict(source='bbc'),
      model=dict(max_seq_length=256),
      train=dict(lr=5e-5, hard_lr=5e-5, width_lr=5e-5))

"""GLUE RTE (paper Table 2: epochs 10,10,5,5; batch 32; lr 2e-5)."""

from configs import base


def get_config(arg=None):
  return base.build(
      arg, data=dict(source='glue', task='rte', path='data/glue/RTE'),
      model=dict(init='bert-base-uncased', max_seq_length=128),
      train=dict(batch_size=32, epochs=dict(finetune=10, soft=10, hard=5, exits=5)))

"""GLUE QQP (paper Table 2: epochs 5,2,5,5; batch 32; lr 2e-5). --config.data.path=<GLUE/QQP>."""

from configs import base


def get_config(arg=None):
  return base.build(
      arg, data=dict(source='glue', task='qqp', path='data/glue/QQP'),
      model=dict(init='bert-base-uncased', max_seq_length=128),
      train=dict(batch_size=32, epochs=dict(finetune=5, soft=2, hard=5, exits=5)))

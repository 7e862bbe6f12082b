"""AG news CSV (paper Table 2: epochs 3,1,2,2; batch 64; lr 2e-5)."""

from configs import base


def get_config(arg=None):
  return base.build(
      arg, data=dict(source='csv', task='ag_news', path='data/ag_news_csv'),
      model=dict(init='bert-base-uncased', max_seq_length=128),
      train=dict(batch_size=64, epochs=dict(finetune=3, soft=1, hard=2, exits=2)))

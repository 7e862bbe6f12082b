"""Tiny offline task and tokenizer that tests write into a tmp dir (no downloads)."""

import pathlib

import numpy as np

from configs import base
from mp_jax.model import exit_plan

POS = ['good', 'great', 'fine', 'superb', 'lovely', 'warm', 'bright', 'fun']
NEG = ['bad', 'awful', 'poor', 'dull', 'grim', 'cold', 'weak', 'sad']
FILL = ['the', 'a', 'movie', 'film', 'plot', 'was', 'and', 'very', 'of', 'it', 'is', 'this']
SPECIAL = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']


def write_vocab(d):
  d = pathlib.Path(d)
  d.mkdir(parents=True, exist_ok=True)
  (d / 'vocab.txt').write_text('\n'.join(SPECIAL + POS + NEG + FILL) + '\n')
  return d


def sentence(rng, label, n):
  words = list(rng.choice(FILL, size=n))
  for i in rng.choice(n, size=max(1, n // 4), replace=False):
    words[i] = rng.choice(POS if label else NEG)
  return ' '.join(words)


def write_sst2(d, n_train=96, n_dev=32, seed=0, max_words=40):
  """GLUE SST-2 layout (sentence<TAB>label) with a learnable signal and varied lengths."""
  d = pathlib.Path(d)
  d.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for name, n in (('train.tsv', n_train), ('dev.tsv', n_dev)):
    rows = ['sentence\tlabel']
    for _ in range(n):
      label = int(rng.integers(2))
      rows.append(f'{sentence(rng, label, int(rng.integers(3, max_words)))}\t{label}')
    (d / name).write_text('\n'.join(rows) + '\n')
  return d


def config(tmp_path, arg='smoke', **overrides):
  """A smoke config on the tiny task: random 3-layer BERT, tiny vocab."""
  tmp_path = pathlib.Path(tmp_path)
  c = base.build(arg)
  c.model.tokenizer = str(write_vocab(tmp_path / 'tok'))
  c.data.source, c.data.task = 'glue', 'sst2'
  c.data.path = str(write_sst2(tmp_path / 'sst2'))
  c.data.dev_fraction = 0.0
  c.data.max_examples = 0
  for k, v in overrides.items():
    *parents, leaf = k.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def flags_for(c):
  """--config.* flags that turn configs/base.py:smoke into `c` (for subprocess runs)."""
  return [f'--config.model.tokenizer={c.model.tokenizer}', '--config.data.source=glue',
          '--config.data.task=sst2', f'--config.data.path={c.data.path}',
          '--config.data.dev_fraction=0.0', '--config.data.max_examples=0']


class FixedHeads:
  """An exit plan that runs the same heads at every tau > 0 (all that the engine and the
  reference read of a plan: its halt values)."""

  def __init__(self, heads_E):
    self.heads_E = np.asarray(heads_E, bool)
    self.num_layers = len(self.heads_E) + 1

  def halts(self, tau):
    return exit_plan.halts(tau, self.num_layers, self.heads_E)


def save_exit_plan(final, cfg, u=0.0, n=4):
  """A hand-made final/'s exit plan: every held-out example's head uncertainty is u (0: all
  exit at the first head, so the plan runs that head alone)."""
  e = cfg.num_layers - 1
  plan = exit_plan.ExitPlan(np.full((n, e), u), np.ones((n, e + 1)), np.ones((n, e)), 1.0)
  plan.save(pathlib.Path(final) / exit_plan.FILE)

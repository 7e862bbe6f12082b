"""Our jitted fine-tuning step against HF PyTorch's, on the same batches (issue 17)."""

import os

import jax
import numpy as np

from mp_jax.evaluation import timing
from mp_jax.training import stages, trainer


def train_vs_torch(config, cfg, params, hf_dir, batches, *, repeats=3):
  """Our jitted fine-tuning step over HF PyTorch's (AdamW, fp32): examples/s ratio.

  batches: padded numpy batches (batching.batches of the train split); both frameworks run the
  same rows, PyTorch padded to each batch's longest row (its usual collator), ours at the
  batch's length bucket. One timed round = every batch once, then synchronised.
  """
  ours = jax_trainer(config, cfg, params, batches)
  theirs = torch_trainer(config, hf_dir, batches)
  t = timing.interleaved({'jax': ours, 'torch': theirs}, repeats, warmup=True)
  n = sum(len(b['labels']) for b in batches)
  return {'jax_examples_per_s': n / t['jax'], 'torch_examples_per_s': n / t['torch'],
          'ratio': t['torch'] / t['jax'], 'batches': len(batches),
          'batch_size': len(batches[0]['labels'])}


def finetune_step(config, cfg, params):
  """(trainer.make_step jitted with its state donated, the initial state, frozen params on the
  device) of the fine-tuning stage."""
  train_p, frozen = stages.split(params, 'finetune')
  tx, state, _ = trainer.stage_setup('finetune', cfg, train_p, 10_000, config)
  step = jax.jit(trainer.make_step(cfg, 'bert', 'finetune', config.train, tx), donate_argnums=0)
  return step, state, jax.device_put(frozen)  # on the device once, as trainer


def jax_trainer(config, cfg, params, batches):
  """fn() running our fine-tuning step once over `batches` (on the device), then synchronising."""
  step, state, frozen = finetune_step(config, cfg, params)
  rng = jax.random.PRNGKey(0)
  dev = [jax.device_put(b) for b in batches]
  box = {'state': jax.device_put(state)}

  def ours():
    s = box['state']
    for b in dev:
      s, _ = step(s, frozen, b, rng)
    box['state'] = jax.block_until_ready(s)
  return ours


def torch_trainer(config, hf_dir, batches):
  """fn() running HF PyTorch's fine-tuning step (AdamW, fp32, clip) once over `batches`, each
  cut to its longest row (PyTorch's usual collator)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  model = transformers.BertForSequenceClassification.from_pretrained(hf_dir).train()
  opt = torch.optim.AdamW(model.parameters(), lr=float(config.train.lr),
                          weight_decay=float(config.train.weight_decay))
  tbatches = []
  for b in batches:
    n = int(b['attention_mask'].sum(-1).max())
    tbatches.append({k: torch.from_numpy(np.asarray(b[k][:, :n], np.int64)) for k in
                     ('input_ids', 'token_type_ids', 'attention_mask')}
                    | {'labels': torch.from_numpy(np.asarray(b['labels'], np.int64))})

  def theirs():
    for b in tbatches:
      opt.zero_grad(set_to_none=True)
      model(**b).loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), float(config.train.clip_norm))
      opt.step()
  return theirs

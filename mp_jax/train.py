"""Staged training (SPEC §4): fine-tune -> soft pruning -> hard pruning -> exit distillation.

Every stage checkpoints under `<workdir>/<stage>/`; re-running the same command resumes the
unfinished stage at its last saved step (same data order, same dropout keys) and skips the
finished ones.
"""

import functools
import json
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from mp_jax import checkpoint, distributed, evaluate, hf, stages, tokenization
from mp_jax import data as data_lib
from mp_jax import model as model_lib
from mp_jax import pruning as pruning_lib

F1_TASKS = ('mrpc', 'qqp')


class MetricsLog:
  """Append-only JSONL metrics log (one record a line, flushed at once)."""

  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if distributed.is_main() and self.path.exists():  # a kill mid-write leaves a partial line
      text = self.path.read_bytes()
      if text and not text.endswith(b'\n'):
        with self.path.open('r+b') as f:
          f.truncate(text.rfind(b'\n') + 1)

  def write(self, **record):
    if not distributed.is_main():
      return
    record['time'] = time.time()
    with self.path.open('a') as f:
      f.write(json.dumps(record, default=_jsonable) + '\n')


def _jsonable(x):
  return x.tolist() if hasattr(x, 'tolist') else str(x)


def model_overrides(config):
  """ModelConfig fields that the experiment config sets."""
  m = config.model
  return dict(max_seq_length=m.max_seq_length, final_threshold=m.final_threshold,
              temperature=m.temperature, exit_width=m.exit_width, exit_heads=m.exit_heads,
              hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
              dtype=m.dtype)


def build(config):
  """(dataset, ModelConfig, initial params, tokenizer) for an experiment config."""
  m = config.model
  key, value = ('tokenizer', m.tokenizer or hf.MINILM) if m.init == 'random' else ('init', m.init)

  # Files to download (a hub id or minilm-l6) get a local-copy hint; an error about a local path
  # the user gave names that path already.
  hint = ''
  if value == hf.MINILM or (hf.is_hub_id(value) and not pathlib.Path(value).expanduser().exists()):
    where, what = ('vocab', 'vocab.txt or tokenizer.json') if key == 'tokenizer' else (
        'bert-base-uncased', 'config.json, the weights (e.g. model.safetensors) and vocab.txt')
    hint = (f'\n  config.model.{key}={value!r}: to use a local copy, pass '
            f'--config.model.{key}=/path/to/{where} (a folder with {what})')
  try:  # before the data: an unreachable hub id fails in seconds, not after reading QQP
    local = hf.resolve(value)
  except hf.CheckpointError as e:
    raise hf.CheckpointError(f'{e}{hint}') from e
  ds = data_lib.load_task(config.data)
  if m.init == 'random':
    tok = tokenization.Tokenizer.from_dir(local)
    cfg = model_lib.ModelConfig(
        vocab_size=tok.vocab_size, num_labels=ds.num_labels,
        max_position_embeddings=max(512, m.max_seq_length), **dict(m.random_dims),
        **model_overrides(config))
    params = model_lib.init_params(cfg, config.seed)
  else:
    try:
      cfg, params, tok = hf.load(local, num_labels=ds.num_labels, **model_overrides(config))
    except hf.CheckpointError as e:
      raise hf.CheckpointError(f'{e}{hint}') from e
  if cfg.max_seq_length > cfg.max_position_embeddings:
    raise ValueError(f'config.model.max_seq_length={cfg.max_seq_length} exceeds the '
                     f'checkpoint max_position_embeddings={cfg.max_position_embeddings}')
  return ds, cfg, params, tok


def encode_splits(ds, tok, max_len):
  """Tokenized splits; says how many examples were truncated (never silently)."""
  enc = {}
  for split, examples in ds.items():
    enc[split] = data_lib.encode(tok, examples, max_len)
    cut = int(np.sum(enc[split].lengths >= max_len))
    if cut:
      logging.info('%s: %d of %d examples reach max_seq_length=%d (truncated)', split, cut,
                   len(examples), max_len)
  return enc


def evaluate_split(params, cfg, config, encoded, method, stage=None, tau=None):
  """Reference metrics (hard masks where the method prunes) on an encoded split."""
  pruning, exits = stages.eval_modes(method, stage)
  res = evaluate.reference(params, cfg, encoded, pruning=pruning, exits=exits,
                           batch_size=config.train.eval_batch_size,
                           length_buckets=config.data.length_buckets)
  tau = config.eval.tau if tau is None else tau
  out, _, _ = evaluate.metrics(res, cfg, tau=tau if exits else 0.0,
                               with_f1=config.data.task in F1_TASKS)
  return out


def _eval_split(enc):
  return enc['dev'] if 'dev' in enc else enc['test']


def _checked_step(state, frozen, batch, rng, **kw):
  """stages.train_step plus `finite`: loss, gradients and the new parameters are all finite."""
  state, m = stages.train_step(state, frozen, batch, rng, **kw)
  ok = [jnp.isfinite(m['loss']), jnp.isfinite(m['grad_norm'])]
  ok += [jnp.isfinite(x).all() for x in jax.tree.leaves(state['params'])]
  m['finite'] = jnp.stack(ok).all()
  return state, m


def make_step(cfg, method, stage, tc, tx):
  """The pure (unjitted) train step (state, frozen, batch, rng) -> (state, metrics) of a stage."""
  return functools.partial(_checked_step, tx=tx, model=model_lib.MagicPyramid(cfg),
                           method=method, stage=stage, tc=tc)


def _check_finite(pending, stage, last_saved, ck):
  """Raises FloatingPointError at the first pending step whose update was not finite."""
  flags = distributed.to_host([f for _, f, _ in pending])
  for (step, _, loss), ok in zip(pending, flags, strict=True):
    if not ok:
      ck.wait()  # the last good checkpoint is complete on disk before this run stops
      kept = (f'the last good checkpoint (step {last_saved}) is kept in {ck.dir}/ckpt'
              if last_saved else 'no checkpoint of this stage was saved')
      raise FloatingPointError(
          f'stage {stage}, step {step}: non-finite loss or gradients (loss '
          f'{float(distributed.to_host(loss))}); stopped, {kept}. Lower the learning rate or '
          'check the data.')
  pending.clear()


def run_stage(config, workdir, stage, cfg, params, enc, log):
  """Trains one stage (resuming if it was interrupted); returns the full parameter tree."""
  tc, method = config.train, config.method
  ck = checkpoint.Stage(pathlib.Path(workdir) / stage, keep=tc.keep_checkpoints)
  if stage == 'soft':  # thresholds start from this config's schedule, not from stage 1
    params = dict(params, thresholds=pruning_lib.init_thresholds(cfg.num_layers,
                                                                 cfg.final_threshold))
  train_p, frozen = stages.split(params, stage)
  bs = tc.batch_size
  per_epoch = data_lib.num_batches(len(enc['train']), bs, drop_last=True)
  if per_epoch == 0:
    raise ValueError(f'train split has {len(enc["train"])} examples, fewer than '
                     f'train.batch_size={bs}')
  total = int(tc.epochs[stage]) * per_epoch
  if tc.max_steps:
    total = min(total, int(tc.max_steps))
  if total == 0:
    logging.info('stage %s: 0 steps configured; skipped', stage)
    return params
  distributed.check_batch_size(bs)
  mesh = distributed.mesh()
  rep = distributed.replicated(mesh)
  tx = stages.optimizer(stage, train_p, total, tc)
  state = {'params': train_p, 'opt_state': tx.init(train_p), 'step': np.asarray(0, np.int32)}
  step, restored = ck.restore(state, sharding=rep)
  if restored is not None:
    state = restored
    if ck.done and step >= total:
      logging.info('stage %s already finished (step %d); skipped', stage, step)
      ck.close()
      return stages.merge(state['params'], frozen)
    if ck.done:
      logging.warning('stage %s is marked done but its newest readable checkpoint is step %d '
                      'of %d; training the remaining steps again', stage, step, total)
    logging.info('stage %s: resuming from checkpoint at step %d of %d', stage, step, total)
    log.write(event='resume', stage=stage, step=int(step))
  state = distributed.replicate(state, mesh)
  step = int(distributed.to_host(state['step']))
  step_fn = jax.jit(make_step(cfg, method, stage, tc, tx), donate_argnums=0, out_shardings=rep,
                    in_shardings=(rep, rep, distributed.batch_sharded(mesh), rep))
  frozen_d = distributed.replicate(frozen, mesh)
  rng = distributed.replicate(jax.random.PRNGKey(config.seed), mesh)
  buckets = evaluate.buckets_for(cfg.max_seq_length, config.data.length_buckets)
  bar = tqdm.tqdm(total=total, initial=step, desc=f'{method}/{stage}', unit='step',
                  mininterval=5, dynamic_ncols=True, disable=not distributed.is_main())
  t0, seen = time.time(), 0
  last_saved, pending = step, []
  while step < total:
    epoch, start = divmod(step, per_epoch)
    for batch in data_lib.batches(enc['train'], bs, buckets=buckets, shuffle=True,
                                  seed=config.seed, epoch=epoch, start_batch=start,
                                  drop_last=True):
      state, m = step_fn(state, frozen_d, distributed.shard_batch(batch, mesh), rng)
      step, seen = step + 1, seen + bs
      pending.append((step, m.pop('finite'), m['loss']))
      bar.update(1)
      is_log, is_ckpt = step % tc.log_every == 0 or step == total, step % tc.checkpoint_every == 0
      if is_log or is_ckpt or step % per_epoch == 0 or step == total:
        _check_finite(pending, stage, last_saved, ck)  # before anything is logged or saved
      if is_log:
        m = {k: float(v) for k, v in distributed.to_host(m).items()}
        rate = seen / max(time.time() - t0, 1e-9)
        t0, seen = time.time(), 0
        bar.set_postfix(loss=f'{m["loss"]:.4f}', ex_s=f'{rate:.0f}')
        log.write(stage=stage, step=step, epoch=epoch, examples_per_s=rate, **m)
      if is_ckpt and step < total:
        ck.save(step, state)
        last_saved = step
      if step % per_epoch == 0 or step == total:
        # The parameters as they are on the devices: no round trip through the host.
        ev = evaluate_split(stages.merge(state['params'], frozen_d), cfg, config,
                            _eval_split(enc), method, stage)
        log.write(stage=stage, step=step, epoch=epoch, split='dev', **ev)
        logging.info('%s/%s step %d: dev %s', method, stage, step,
                     {k: v for k, v in ev.items() if k in ('accuracy', 'f1', 'flops_speedup')})
      if step >= total:
        break
  bar.close()
  ck.save(total, state)
  ck.mark_done(evaluate_split(stages.merge(state['params'], frozen_d), cfg, config,
                             _eval_split(enc), method, stage))
  full = stages.merge(distributed.to_host(state['params']), frozen)
  ck.close()
  return full


def export(workdir, cfg, params, tok, label_names, summary):
  """Writes `<workdir>/final` (HF directory + summary.json) all at once: built aside, renamed."""
  final, tmp, old = (workdir / n for n in ('final', 'final.tmp', 'final.old'))
  if distributed.is_main():
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save(tmp, cfg, params, tok, label_names)
    (tmp / 'summary.json').write_text(json.dumps(summary, indent=2))
    if final.exists():
      shutil.rmtree(old, ignore_errors=True)
      final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
  distributed.barrier('export')
  return final


def run(config, workdir):
  """Runs (or resumes) every stage of `config.method`; exports `<workdir>/final`."""
  distributed.initialize(config.get('dist'))
  logging.info('data parallel over %d devices (%d processes)', jax.device_count(),
               jax.process_count())
  workdir = pathlib.Path(workdir)
  # Weights and data are checked before anything is written: a refused run leaves no workdir.
  ds, cfg, params, tok = build(config)
  held = 'dev' if 'dev' in ds else 'test'
  if not ds.get(held):
    raise data_lib.DataError(f'data: the {held} split is empty (source {config.data.source!r}, '
                             f'path {config.data.path!r}); training evaluates on it')
  workdir.mkdir(parents=True, exist_ok=True)
  if distributed.is_main():
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  enc = encode_splits(ds, tok, cfg.max_seq_length)
  log = MetricsLog(workdir / 'metrics.jsonl')
  for stage in stages.STAGES[config.method]:
    params = run_stage(config, workdir, stage, cfg, params, enc, log)
  summary = evaluate_split(params, cfg, config, _eval_split(enc), config.method)
  final = export(workdir, cfg, params, tok, ds.label_names, summary)
  log.write(event='done', **summary)
  logging.info('done: %s', json.dumps(summary))
  return final, summary

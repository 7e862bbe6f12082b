"""Staged training (SPEC §4): fine-tune -> width -> calibrate -> soft -> hard -> exits (or static).

Every stage checkpoints under `<workdir>/<stage>/`; re-running the same command resumes the
unfinished stage at its last saved step (same data order, same dropout keys) and skips the
finished ones. A stage is resumed or reused only if its fingerprint (training/runs.py) matches
this run; a run holds the workdir lock throughout.
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
from jax.experimental import multihost_utils

from mp_jax import fsio, heap, methods
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading, sources, tasks, tokenization
from mp_jax.evaluation import reference
from mp_jax.model import bert, exit_plan, hf
from mp_jax.model import config as model_config
from mp_jax.serving import shapes
from mp_jax.training import calibration, checkpoint, distributed, lock, runs, slim, stages


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
  # final_threshold only seeds the thresholds' initial values; calibration sets the real ones.
  final = model_config.ModelConfig.final_threshold if m.final_threshold is None else (
      m.final_threshold)
  return dict(max_seq_length=m.max_seq_length, final_threshold=final,
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
  ds = loading.load_task(config.data)
  if m.init == 'random':
    tok = tokenization.Tokenizer.from_dir(local)
    cfg = model_config.ModelConfig(
        # max_id + 1: a vocabulary with gaps in its ids still gets a row for every id.
        vocab_size=max(tok.vocab_size, tok.max_id + 1), num_labels=ds.num_labels,
        max_position_embeddings=max(512, m.max_seq_length), **dict(m.random_dims),
        **model_overrides(config))
    params = bert.init_params(cfg, config.seed)
  else:
    try:
      cfg, params, tok = hf.load(local, label_names=ds.label_names, **model_overrides(config))
    except hf.CheckpointError as e:
      raise hf.CheckpointError(f'{e}{hint}') from e
  if cfg.max_seq_length > cfg.max_position_embeddings:
    raise ValueError(f'config.model.max_seq_length={cfg.max_seq_length} exceeds the '
                     f'checkpoint max_position_embeddings={cfg.max_position_embeddings}')
  if not m.embedding_rank < cfg.hidden_size:  # here, not after fine-tuning (the width stage's)
    raise ValueError(f'config.model.embedding_rank={m.embedding_rank} must be < the model\'s '
                     f'hidden_size={cfg.hidden_size} (0: no factorisation)')
  return ds, cfg, params, tok


def encode_splits(ds, tok, max_len):
  """Tokenized splits; says how many examples were truncated (never silently)."""
  enc = {}
  for split, examples in ds.items():
    enc[split] = batching.encode(tok, examples, max_len)
    cut = int(np.sum(enc[split].lengths >= max_len))
    if cut:
      logging.info('%s: %d of %d examples reach max_seq_length=%d (truncated)', split, cut,
                   len(examples), max_len)
  return enc


def evaluate_split(params, cfg, config, encoded, method, stage=None, tau=None, count_cfg=None,
                   fit=False):
  """Reference metrics (hard masks where the method prunes) on a split; `fit`: and the exit plan
  fitted on it (None without exits). count_cfg: what FLOPs count (the width stage's slim model)."""
  pruning, exits = methods.eval_modes(method, stage)
  res = reference.run(params, cfg, encoded, pruning=pruning, exits=exits,
                      batch_size=config.train.eval_batch_size,
                      length_buckets=shapes.train_lengths(config.data))
  tau, cfg = (config.eval.tau if tau is None else tau) if exits else 0.0, count_cfg or cfg
  plan = (exit_plan.ExitPlan.from_reference(cfg, res, config.eval.head_weight)
          if fit and exits else None)
  m, _, _ = reference.metrics(res, cfg, tau=tau, with_f1=tasks.has_f1(config.data.task), plan=plan)
  return (m, plan) if fit else m


def _held_name(splits):
  """The split training evaluates on: dev, else test."""
  return 'dev' if 'dev' in splits else 'test'


def _eval_split(enc):
  return enc[_held_name(enc)]


def _checked_step(state, frozen, batch, rng, *, step_fn, **kw):
  """A stage's train step plus `finite`: loss, gradients and the new parameters are all finite."""
  state, m = step_fn(state, frozen, batch, rng, **kw)
  ok = [jnp.isfinite(m['loss']), jnp.isfinite(m['grad_norm'])]
  ok += [jnp.isfinite(x).all() for x in jax.tree.leaves(state['params'])]
  m['finite'] = jnp.stack(ok).all()
  return state, m


def make_step(cfg, method, stage, tc, tx, target=None, teacher_cfg=None, **step_kw):
  """The pure (unjitted) train step (state, frozen, batch, rng) -> (state, metrics) of a stage.

  target: the soft stage's token keep; teacher_cfg: the static (or width) stage's teacher
  architecture; step_kw: stage_setup's extra arguments (the width stage's plan).
  """
  teacher = bert.MagicPyramid(teacher_cfg) if teacher_cfg is not None else None
  step_fn = slim.train_step if stage == 'width' else stages.train_step
  return functools.partial(_checked_step, step_fn=step_fn, tx=tx, model=bert.MagicPyramid(cfg),
                           method=method, stage=stage, tc=tc, target=target, teacher=teacher,
                           **step_kw)


def stage_setup(stage, cfg, train_params, total, config):
  """(optimizer, initial state, make_step's extra arguments) of an optimizer stage."""
  if stage == 'width':
    return slim.setup(cfg, train_params, total, config)
  tx = stages.optimizer(stage, train_params, total, config.train)
  return tx, {'params': train_params, 'opt_state': tx.init(train_params),
              'step': np.asarray(0, np.int32)}, {}


def static_student(cfg, params):
  """(cfg, params) of the static baseline: the first L/2 layers, their thresholds; no exits."""
  k = max(1, cfg.num_layers // 2)
  keep = lambda name: not (name.startswith('layer_') and int(name.split('_')[1]) >= k) and (
      not name.startswith('exit_') or int(name.split('_')[1]) < k - 1)
  out = {n: v for n, v in params.items() if keep(n)}
  out['thresholds'] = params['thresholds'][:k]
  # unpruned_layers: FLOPs and dense timings count against the model it was cut from.
  return cfg.replace(num_layers=k, unpruned_layers=cfg.num_layers if k < cfg.num_layers else 0), out


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


def run_stage(config, workdir, stage, cfg, params, enc, log, fp=None, teacher=None, target=None):
  """Trains one stage (resuming if it was interrupted); returns the full parameter tree.

  `fp`: the stage's fingerprint (runs.check has compared it), recorded before any checkpoint.
  teacher: (cfg, params) of the static (or width) stage's teacher; target: the soft stage's keep.
  """
  tc, method = config.train, config.method
  if fp is not None and distributed.is_main():
    runs.record(pathlib.Path(workdir) / stage, fp)
  ck = checkpoint.Stage(pathlib.Path(workdir) / stage, keep=tc.keep_checkpoints)
  train_p, frozen = stages.split(params, stage)
  if stage == 'soft' and target is None:
    raise ValueError('the soft stage needs the token keep calibration reached (target=)')
  bs = tc.batch_size
  per_epoch = batching.num_batches(len(enc['train']), bs, drop_last=True)
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
  tx, state, step_kw = stage_setup(stage, cfg, train_p, total, config)
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
  step_fn = jax.jit(make_step(cfg, method, stage, tc, tx, target,
                              teacher[0] if teacher is not None else None, **step_kw),
                    donate_argnums=0, out_shardings=rep,
                    in_shardings=(rep, rep, distributed.batch_sharded(mesh), rep))
  frozen_d = distributed.replicate(frozen, mesh)
  step_frozen = frozen_d if teacher is None else dict(  # the teacher rides with the frozen part
      frozen_d, **{stages.TEACHER: distributed.replicate(teacher[1], mesh)})
  rng = distributed.replicate(jax.random.PRNGKey(config.seed), mesh)
  buckets = batching.upto(shapes.train_lengths(config.data), cfg.max_seq_length)
  bar = tqdm.tqdm(total=total, initial=step, desc=f'{method}/{stage}', unit='step',
                  mininterval=5, dynamic_ncols=True, disable=not distributed.is_main())
  t0, seen = time.time(), 0
  last_saved, pending, ev_final = step, [], None
  dev_eval = lambda st: evaluate_split(  # params as they are on the devices: no host round trip
      stages.merge(st['params'], frozen_d), cfg, config, _eval_split(enc), method, stage,
      count_cfg=slim.counted(cfg, st['units']) if stage == 'width' else None)
  while step < total:
    epoch, start = divmod(step, per_epoch)
    for batch in batching.batches(enc['train'], bs, buckets=buckets, shuffle=True,
                                  seed=config.seed, epoch=epoch, start_batch=start,
                                  drop_last=True):
      state, m = step_fn(state, step_frozen, distributed.shard_batch(batch, mesh), rng)
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
        ev = dev_eval(state)
        log.write(stage=stage, step=step, epoch=epoch, split='dev', **ev)
        ev_final = ev if step == total else None
        logging.info('%s/%s step %d: dev %s', method, stage, step,
                     {k: v for k, v in ev.items() if k in ('accuracy', 'f1', 'flops_speedup')})
      if step >= total:
        break
  bar.close()
  ck.save(total, state)
  if ev_final is None:  # the loop did not reach `total` here (nothing was trained this run)
    ev_final = dev_eval(state)
  if stage == 'width':  # the units kept: what `slim.apply` slices, also after a resume
    ev_final = dict(ev_final, **slim.record(distributed.to_host(state['units'])))
  ck.mark_done(ev_final)
  full = stages.merge(distributed.to_host(state['params']), frozen)
  ck.close()
  return full


def _on_main(fn):
  """fn() on process 0 only; every process raises if it failed there."""
  err = None
  if distributed.is_main():
    try:
      fn()
    except Exception as e:  # re-raised below, after the other processes have been told
      err = e
  if jax.process_count() > 1:
    ok = multihost_utils.broadcast_one_to_all(np.int32(err is None))
    if not ok and err is None:
      raise RuntimeError('process 0 refused this run (its log says why)')
  if err is not None:
    raise err


def run(config, workdir, restart_from=''):
  """Runs (or resumes) every stage of `config.method`; exports `<workdir>/final`.

  restart_from: a stage; it, the stages after it, final/, eval/ and config.json are moved to
  `<workdir>/replaced-<time>/` (runs.restart_from) once the stages before it are checked. A stage
  kept that was trained with a different setup, or a workdir of another method, stops the run
  with runs.Mismatch before anything is written or moved.
  """
  distributed.initialize(config.get('dist'))
  logging.info('data parallel over %d devices (%d processes)', jax.device_count(),
               jax.process_count())
  workdir = pathlib.Path(workdir)
  if restart_from and restart_from not in methods.ORDER:
    raise ValueError(f'--restart_from={restart_from!r}: expected one of {methods.ORDER}')
  # Weights and data are checked before anything is written: a refused run leaves no workdir.
  ds, cfg, params, tok = build(config)
  held = _held_name(ds)
  if not ds.get(held):
    raise sources.DataError(f'data: the {held} split is empty (source {config.data.source!r}, '
                            f'path {config.data.path!r}); training evaluates on it')
  enc = encode_splits({s: ds[s] for s in ('train', held)}, tok, cfg.max_seq_length)  # no test
  fps = runs.chain(config, config.method, runs.data_digest(enc['train']), params)
  held_lock = lock.Lock(workdir)

  def claim():
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    held_lock.acquire()
    try:
      runs.check(workdir, config, fps, restart_from)
      if restart_from:
        runs.restart_from(workdir, restart_from)
      fsio.write_text(workdir / 'config.json', config.to_json_best_effort(indent=2))
    except BaseException:
      held_lock.release()
      if created:  # a refused run leaves no workdir behind
        shutil.rmtree(workdir, ignore_errors=True)
      raise

  _on_main(claim)
  try:
    return _train_all(config, workdir, cfg, params, tok, ds.label_names, enc, fps, restart_from)
  finally:
    if distributed.is_main():
      held_lock.release()


def _train_all(config, workdir, cfg, params, tok, label_names, enc, fps, restart_from):
  log = MetricsLog(workdir / 'metrics.jsonl')
  if restart_from:
    log.write(event='restart', stage=restart_from)
  target = None
  for stage in methods.STAGES[config.method]:
    if stage == 'calibrate':
      rec = calibration.run(config, workdir, cfg, params, _eval_split(enc), fps[stage], log)
      (cfg, params), target = calibration.apply(cfg, params, rec), rec['token_keep']
      distributed.barrier('calibrate')  # process 0's record is on disk before anyone goes on
      continue
    teacher = None
    if stage == 'static':
      teacher = (cfg, params)
      cfg, params = static_student(cfg, params)
    elif stage == 'width':
      teacher = (cfg, params) if config.train.width_kd > 0 else None
      cfg, params = slim.prepare(cfg, params, config.model.embedding_rank)
    params = run_stage(config, workdir, stage, cfg, params, enc, log, fps[stage], teacher,
                       target)
    if stage == 'width':  # the stages after it (and final/) get the physically smaller model
      cfg, params = slim.apply(cfg, params, workdir / stage)
    heap.release_after(f'{config.method}/{stage}')  # the stage's buffers are all gone now
  final = workdir_lib.final_dir(workdir)
  distributed.barrier('trained')  # all look at final/ before process 0 may write it anew
  if runs.final_is_current(workdir, config, fps):  # the same command again: nothing to redo
    summary = fsio.read_json(final / workdir_lib.FINAL_META)['summary']
    logging.info('%s is up to date (same method, tau, dtype, head weight, stages): kept', final)
    return final, summary
  summary, plan = evaluate_split(params, cfg, config, _eval_split(enc), config.method, fit=True)
  if distributed.is_main():
    workdir_lib.write_final(workdir, cfg, params, tok, label_names, summary,
                            runs.final_meta(config, fps, summary), plan)
  distributed.barrier('final')
  log.write(event='done', **summary)
  logging.info('done: %s', json.dumps(summary))
  return final, summary

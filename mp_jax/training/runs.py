"""A workdir bound to its config: per-stage fingerprints, the refusal naming keys, --restart_from.

Each stage directory holds `fingerprint.json`: the config keys that determine that stage's result
(never `method` itself, so a stage that `experiments/run.py` links between methods keeps
matching; the pruning mode it trains in instead), a sha256 of the encoded train split, a sha256
of the initial values of the parameters it trains, the code's stage semantics version and the
previous stage's fingerprint. Resuming or reusing a stage requires an equal fingerprint.
"""

import datetime
import hashlib
import json
import os
import pathlib

import numpy as np
from absl import logging

from mp_jax import fsio, methods
from mp_jax import workdir as workdir_lib
from mp_jax.model import exit_plan
from mp_jax.serving import shapes
from mp_jax.training import stages

# Per stage; bump when a stage's training changes meaning (loss, schedule, data order,
# initialisation): stages trained by older code then refuse to resume instead of mixing two
# semantics. soft 2: starts from calibrate's thresholds, holds its keep, relative threshold steps.
SEMANTICS = {'finetune': 1, 'width': 1, 'calibrate': 1, 'soft': 2, 'hard': 1, 'exits': 1,
             'static': 1}
FINGERPRINT = 'fingerprint.json'
# final/'s format. 2: a cut model (static, width) records the model it was cut from
# (ModelConfig.unpruned_*), which its FLOPs and timings count against (SPEC §5); such a final/
# (and its evaluation) from before is exported (evaluated) again, never reused.
FINAL_FORMAT = 3
# What --restart_from moves aside with the stages.
_MOVED = (workdir_lib.FINAL, 'eval', 'config.json')

_COMMON = ('seed', 'train.batch_size', 'train.warmup_frac', 'train.weight_decay',
           'train.clip_norm', 'train.max_steps', 'data.source', 'data.task', 'data.seed',
           'data.dev_fraction', 'data.test_fraction', 'data.max_examples', 'data.length_buckets',
           'model.max_seq_length', 'model.dtype')
_DROPOUT = ('model.hidden_dropout', 'model.attention_dropout')
# Keys each stage's training reads (training/stages.py, model/bert.py); the exits stage runs
# without dropout and temperature only shapes the soft masks.
_STAGE = {
    'finetune': ('train.lr', *_DROPOUT),
    'width': ('train.width_lr', 'train.exit_lr', 'train.width_cycles', 'train.width_kd',
              'model.head_keep', 'model.ffn_keep', 'model.embedding_rank', 'model.exit_width',
              'model.exit_heads', *_DROPOUT),
    'calibrate': ('model.target_token_keep', 'model.final_threshold'),
    'soft': ('train.lr', 'train.threshold_lr', 'train.mask_lambda', 'model.temperature',
             *_DROPOUT),
    'hard': ('train.hard_lr', *_DROPOUT),
    'exits': ('train.exit_lr', 'train.distill_direction', 'model.exit_width',
              'model.exit_heads'),
    'static': ('train.lr', *_DROPOUT),
}
_LABELS = {'semantics': 'stage semantics version of the code',
           'pruning': 'pruning mode the stage trains in',
           'train_data_sha256': 'sha256 of the encoded train split (data.*, model.tokenizer)',
           'init_sha256': 'sha256 of the initial weights it trains (model.init, random_dims, seed)',
           'previous': 'fingerprint of the previous stage'}


class Mismatch(ValueError):
  """A workdir's stages or method differ from this run's config (the message says how)."""


def _get(config, dotted):
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def _plain(value):
  """JSON-equal form (tuples as lists, ConfigDicts as dicts) so a stored value compares equal."""
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str))


def _with_defaults(old, default):
  """`old` (a config.json dict) over `default`: keys an older version did not write yet."""
  if not isinstance(old, dict) or not isinstance(default, dict):
    return old
  return {**default, **{k: _with_defaults(v, default.get(k)) for k, v in old.items()}}


def legacy_keys(config_json, stage):
  """stage_keys of an older workdir's config.json; a key it lacks counts as base.defaults()'s.

  (E.g. a workdir trained before model.dtype existed ran in float32, the default.)
  """
  from configs import base  # pylint: disable=g-import-not-at-top  (repo-only; configs need no JAX)
  return stage_keys(_with_defaults(config_json, base.defaults().to_dict()), stage)


def _value(config, dotted):
  """A key's fingerprinted value: as configured, the training length grid as resolved."""
  if dotted == 'data.length_buckets':  # the padded shape (the dropout stream follows it): a
    # stage is not resumed on a platform whose default grid differs
    return list(shapes.train_lengths(_get(config, 'data')))
  return _plain(_get(config, dotted))


def stage_keys(config, stage):
  """{dotted key: value} of the config keys that determine `stage`'s result."""
  epochs = [f'train.epochs.{stage}'] if stage != 'calibrate' else []  # it trains nothing
  names = [*_COMMON, *epochs, *_STAGE[stage]]
  out = {k: _value(config, k) for k in names}
  if _get(config, 'model.init') == 'random':  # else the checkpoint fixes the dimensions
    dims = _plain(_get(config, 'model.random_dims'))
    out.update({f'model.random_dims.{k}': v for k, v in sorted(dims.items())})
  return out


def data_digest(encoded):
  """sha256 of an encoded split (ids, type ids, lengths, labels)."""
  h = hashlib.sha256()
  for part in (encoded.lengths, encoded.labels, *(np.concatenate(x) if len(x) else np.zeros(0)
                                                  for x in (encoded.ids, encoded.type_ids))):
    h.update(np.ascontiguousarray(part).tobytes())
    h.update(b'|')
  return h.hexdigest()


def init_digest(params, stage):
  """sha256 of the initial values of the parameters `stage` trains."""
  from mp_jax.training import checkpoint  # pylint: disable=g-import-not-at-top  (orbax)
  return checkpoint.digest(stages.split(params, stage)[0])


def fingerprint(config, method, stage, data_sha, init_sha, previous):
  fp = {'semantics': SEMANTICS[stage], 'stage': stage,
        'pruning': methods.pruning_mode(method, stage),
        'keys': stage_keys(config, stage), 'train_data_sha256': data_sha,
        'init_sha256': init_sha, 'previous': previous}
  fp['sha256'] = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
  return fp


def chain(config, method, data_sha, params):
  """{stage: fingerprint} for every stage of `method`, each chained to the previous one."""
  out, prev = {}, None
  for stage in methods.STAGES[method]:
    # calibrate trains nothing: the thresholds' initial values never reach its result.
    init = '' if stage == 'calibrate' else init_digest(params, stage)
    out[stage] = fingerprint(config, method, stage, data_sha, init, prev)
    prev = out[stage]['sha256']
  return out


def _diff(old, new):
  rows = []
  for k in sorted(set(old.get('keys', {})) | set(new['keys'])):
    a, b = old.get('keys', {}).get(k, '(absent)'), new['keys'].get(k, '(absent)')
    if a != b:
      rows.append(f'{k}: {a!r} -> {b!r}')
  for k, label in _LABELS.items():
    if k in old and old[k] != new[k]:
      short = lambda v: v[:12] + '...' if isinstance(v, str) and len(v) > 12 else v
      rows.append(f'{label}: {short(old[k])!r} -> {short(new[k])!r}')
  return rows


def _way_out(workdir, stage):
  later = methods.ORDER[methods.ORDER.index(stage):]
  moved = ', '.join([*later, *(f'{n}/' for n in _MOVED[:-1])])
  return (f'Nothing was changed. Use a new --workdir, or pass --restart_from={stage} to move '
          f'{moved} and {_MOVED[-1]} aside to {workdir}/replaced-<time>/ (nothing is '
          'deleted) and train again from there.')


def _read_record(path):
  """The JSON object in `path`; None if absent or unreadable (then with a warning)."""
  if not path.exists():
    return None
  try:
    obj = fsio.read_json(path)
  except fsio.UnreadableFile as e:
    logging.warning('%s; treated as absent', e)
    return None
  if not isinstance(obj, dict):
    logging.warning('%s: not a JSON object; treated as absent', path)
    return None
  return obj


def _has_content(d):
  return d.is_dir() and any(d.iterdir())


def check(workdir, config, fps, restart_from=''):
  """Raises Mismatch unless the workdir's method and every existing stage of this run match.

  restart_from: the stage runs.restart_from is about to move aside with the later ones, final/,
  eval/ and config.json; only what stays is checked, and before anything moves.
  """
  workdir = pathlib.Path(workdir)
  method = config.method
  cut = methods.ORDER.index(restart_from) if restart_from else len(methods.ORDER)
  final_meta_file = workdir_lib.final_dir(workdir) / workdir_lib.FINAL_META
  records = {p: _read_record(p) for p in (workdir / 'config.json', final_meta_file)}
  for path, rec in records.items():
    old = (rec or {}).get('method')
    if old is not None and old != method:
      a, b = methods.STAGES[old], methods.STAGES[method]
      common = len(methods.shared_stages(old, base=method))
      first = min((*a[common:], *b[common:]), key=methods.ORDER.index)  # the first not shared
      if methods.ORDER.index(first) < cut:  # else every stage of `old` that differs moves aside
        raise Mismatch(f'workdir {workdir} holds a {old!r} run ({path} says method={old!r}); '
                       f'this run asks for method={method!r}.\n' + _way_out(workdir, first))
  legacy = records[workdir / 'config.json']
  for stage, fp in fps.items():
    if methods.ORDER.index(stage) >= cut:
      continue
    d = workdir / stage
    if (d / FINGERPRINT).exists():
      old = fsio.read_json(d / FINGERPRINT)
      if old.get('sha256') != fp['sha256']:
        rows = _diff(old, fp) or ['(the fingerprints differ in a way the keys do not show)']
        raise Mismatch(f'{d} was trained with a different setup; it cannot be resumed or '
                       'reused for this run:\n  ' + '\n  '.join(rows) + '\n'
                       + _way_out(workdir, stage))
    elif _has_content(d):
      # Trained before fingerprints existed: the config keys the workdir's config.json still
      # records are compared; the data and weights cannot be, so it is trusted with a warning
      # (refusing would strand every older workdir, and the same command is the common case).
      rows = _diff({'keys': legacy_keys(legacy, stage)}, fp) if legacy else []
      if rows:
        raise Mismatch(f'{d} was trained with a different config ({workdir}/config.json):\n  '
                       + '\n  '.join(rows) + '\n' + _way_out(workdir, stage))
      logging.warning('%s has no %s (trained by an older version): its config keys %s; reused '
                      'without a data/weights check', d, FINGERPRINT,
                      'match config.json' if legacy else 'cannot be checked (no config.json)')


def record(stage_dir, fp):
  """Writes the stage's fingerprint (before its first checkpoint) unless it is there."""
  path = pathlib.Path(stage_dir) / FINGERPRINT
  if not path.exists():
    fsio.write_json(path, fp, indent=2)


def restart_from(workdir, stage):
  """Moves `stage`, the stages after it, final/, eval/ and config.json to replaced-<time>/."""
  if stage not in methods.ORDER:
    raise ValueError(f'--restart_from={stage!r}: expected one of {methods.ORDER}')
  workdir = pathlib.Path(workdir)
  names = [*methods.ORDER[methods.ORDER.index(stage):], *_MOVED]
  present = [n for n in names if os.path.lexists(workdir / n)]
  if not present:
    return None
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  for i in range(1000):
    dest = workdir / (f'replaced-{stamp}' + (f'-{i}' if i else ''))
    try:
      dest.mkdir()
      break
    except FileExistsError:
      continue
  for n in present:  # a symlinked (shared) stage moves as the link; its target stays
    os.rename(workdir / n, dest / n)
  logging.warning('--restart_from=%s: moved %s to %s', stage, ', '.join(present), dest)
  return dest


def final_meta(config, fps, summary):
  """What final/ records about the run that exported it."""
  return {'method': config.method, 'tau': float(config.eval.tau), 'dtype': config.model.dtype,
          'head_weight': exit_plan.head_weight(config.eval.head_weight),
          'stages': {s: fp['sha256'] for s, fp in fps.items()}, 'summary': summary,
          'format': FINAL_FORMAT}


def final_is_current(workdir, config, fps):
  """final/ was exported by this method, tau and dtype from exactly these stages."""
  meta = _read_record(workdir_lib.final_dir(workdir) / workdir_lib.FINAL_META)
  if meta is None:
    return False
  stages_now = final_meta(config, fps, None)['stages']
  return (_same_export(meta, config) and meta.get('stages') == stages_now
          and _has_plan(workdir, config))


def _has_plan(workdir, config):
  """final/ holds the exit plan its method needs (a lost file is exported again, not kept)."""
  plan = workdir_lib.final_dir(workdir) / exit_plan.FILE
  return not methods.has_exits(config.method) or plan.exists()


def _same_export(meta, config):
  """final/'s record says the method, tau, dtype (and head weight) `config` asks for."""
  want = final_meta(config, {}, None)
  keys = ('method', 'tau', 'dtype', *(('head_weight',) if methods.has_exits(config.method) else ()))
  return all(meta.get(k) == want[k] for k in keys) and current_format(config.method, meta)


def current_format(method, record):
  """A final/ record (or a report of one) in the format its method needs: 2 for a cut model
  (timed against the unpruned model), 3 for exits (the exit plan)."""
  need = max(2 if methods.cuts_model(method) else 1, 3 if methods.has_exits(method) else 1)
  return record.get('format', 1) >= need


def up_to_date(workdir, config):
  """Cheap (no data, no weights): final/ and every stage match `config` by their records."""
  workdir = pathlib.Path(workdir)
  meta = _read_record(workdir_lib.final_dir(workdir) / workdir_lib.FINAL_META)
  try:
    if meta is None or not _same_export(meta, config) or not _has_plan(workdir, config):
      return False
    for stage in methods.STAGES[config.method]:
      d = workdir / stage
      if not (d / 'done.json').exists() or not (d / FINGERPRINT).exists():
        return False
      fp = fsio.read_json(d / FINGERPRINT)
      if (fp.get('sha256') != meta['stages'].get(stage)
          or fp.get('semantics') != SEMANTICS[stage]
          or fp.get('keys') != stage_keys(config, stage)):
        return False
  except fsio.UnreadableFile:
    return False
  return True

"""bfloat16 vs float32 inference on a trained workdir: accuracy and engine/reference agreement.

  python experiments/bf16_agreement.py --config=configs/mr.py:method=mp --workdir=runs/mr_mp

Runs the reference (masked) model and the compiled engine over `eval.split` with the trained
parameters in each compute dtype (`--dtypes`, whatever dtype the workdir was trained in), and
for each tau of `eval.tau_sweep` prints the accuracy of both, how many predicted labels and exit
layers the engine and the reference disagree on (SPEC §6: none in float32), the largest logit
difference, and how many labels / exit layers each dtype's reference changes against the first
dtype's. Writes the same as JSON to --out (default WORKDIR/eval/bf16_agreement.json).
"""

import pathlib
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, __file__.rsplit('/', 2)[0])

from mp_jax import cli, fsio, methods
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading
from mp_jax.evaluation import reference, report
from mp_jax.model import exit_plan
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import shapes

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config (as for eval.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A trained workdir (its final/ weights).')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes to compare.')
_OUT = flags.DEFINE_string('out', None, 'JSON output (default WORKDIR/eval/bf16_agreement.json).')
flags.mark_flags_as_required(['config', 'workdir'])


def agreement(config, workdir, dtypes=('float32', 'bfloat16')):
  """One record per (dtype, tau): accuracies, engine/reference and cross-dtype disagreements."""
  _, cfg, params, tok, names, plan = workdir_lib.load(workdir)
  plan = exit_plan.for_eval(plan, config.eval)
  ds = loading.load_task(config.data)
  report.check_labels(names, ds, config, workdir)
  params = engine_lib.on_device(params)
  split = report.eval_split(config, ds)
  enc = batching.encode(tok, ds[split], cfg.max_seq_length)
  pruning, exits = methods.eval_modes(config.method)
  # As eval.py: None keys take the platform's defaults; lengths up to the model's.
  grid = shapes.for_model(shapes.resolve(config.eval), cfg.max_seq_length)
  taus = sorted(set(config.eval.tau_sweep)) if exits else [0.0]
  rows = list(zip(enc.ids, enc.type_ids))
  records, first = [], {}
  for dtype in dtypes:
    c = cfg.replace(dtype=dtype)
    res = reference.run(params, c, enc, pruning=pruning, exits=exits,
                        batch_size=config.eval.batch_size, length_buckets=grid.length_buckets)
    eng = engine_lib.Engine(c, params, prune=pruning == 'hard', exits=exits, plan=plan,
                            **grid.engine_kw())
    for tau in taus:
      m, exit_layer, pred = reference.metrics(res, c, tau, plan=plan)
      out = eng.predict(rows, tau=tau)
      _, ref_logits = reference.decide(res, tau, c.num_layers, plan)
      base_pred, base_exit = first.setdefault(tau, (pred, exit_layer))
      records.append({
          'dtype': dtype, 'tau': float(tau), 'num_examples': len(rows),
          'reference_accuracy': m['accuracy'],
          'engine_accuracy': float(np.mean(out['labels'] == res['labels'])),
          'label_disagreements': int(np.sum(out['labels'] != pred)),
          'exit_layer_disagreements': int(np.sum(out['exit_layer'] != exit_layer)),
          'max_logit_diff': float(np.abs(out['logits'] - ref_logits).max()) if rows else 0.0,
          f'labels_changed_vs_{dtypes[0]}': int(np.sum(pred != base_pred)),
          f'exit_layers_changed_vs_{dtypes[0]}': int(np.sum(exit_layer != base_exit)),
          'mean_exit_layer': m['mean_exit_layer']})
  return records


def table(records):
  """Markdown table of `agreement` records."""
  keys = list(records[0])
  lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  for r in records:
    lines.append('| ' + ' | '.join(f'{r[k]:.4g}' if isinstance(r[k], float) else str(r[k])
                                   for k in keys) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  records = agreement(_CONFIG.value, _WORKDIR.value, tuple(_DTYPES.value))
  out = pathlib.Path(_OUT.value or f'{_WORKDIR.value}/eval/bf16_agreement.json')
  fsio.write_json(out, records, indent=2)
  print(table(records))


if __name__ == '__main__':
  cli.run(main)

"""A trained workdir's `final/` folder: the one writer and the one loader of what training hands on.

`final/` is a Hugging Face directory (mp_jax.model.hf) plus `summary.json` (dev metrics),
FINAL_META (method, tau, dtype and the stage fingerprints it was exported from) and, for a
method with exits, the exit plan's profile (mp_jax.model.exit_plan.FILE). Beside it,
`<workdir>/config.json` is the config of the run that trained it.
"""

import pathlib
import shutil
from typing import NamedTuple

from mp_jax import fsio, methods
from mp_jax.model import exit_plan, hf

FINAL = 'final'  # the trained model, a Hugging Face directory
FINAL_META = 'mp_jax_run.json'  # in final/: method, tau, dtype and the stages it was exported from
SUMMARY = 'summary.json'


def final_dir(workdir) -> pathlib.Path:
  """`<workdir>/final`: the trained model as a Hugging Face directory."""
  return pathlib.Path(workdir) / FINAL


class Trained(NamedTuple):
  """What a workdir holds for evaluation and serving."""

  config: dict  # the training config (config.json); method and tau as final/ was exported
  cfg: object  # mp_jax.model.config.ModelConfig
  params: dict
  tokenizer: object  # mp_jax.data.tokenization.Tokenizer
  label_names: list
  plan: exit_plan.ExitPlan | None = None  # the heads that run at each tau (methods with exits)


def load(workdir) -> Trained:
  """The trained model of `workdir`; hf.CheckpointError (naming the folder) if there is none."""
  workdir, final = pathlib.Path(workdir), final_dir(workdir)
  if not (final / 'config.json').exists():
    raise hf.CheckpointError(f'{workdir}: no trained model in {final} (run train.py first)')
  config = fsio.read_json(workdir / 'config.json')  # an error names the file
  if (final / FINAL_META).exists():  # what final/ was exported as, not a later config.json
    run = fsio.read_json(final / FINAL_META)
    as_run = {k: run[k] for k in ('tau', 'head_weight') if k in run}
    config = dict(config, method=run['method'], eval=dict(config['eval'], **as_run))
  cfg, params, tok = hf.load(final)  # checks the tokenizer against the model's vocabulary
  meta = fsio.read_json(final / hf.META_FILE)
  names = meta.get('label_names') or [str(i) for i in range(cfg.num_labels)]
  plan = None
  if (final / exit_plan.FILE).exists():
    try:
      plan = exit_plan.ExitPlan.load(final / exit_plan.FILE, config['eval'].get('head_weight'))
    except ValueError as e:  # as every other unreadable file of final/
      raise hf.CheckpointError(str(e)) from e
  elif methods.has_exits(config['method']):  # else its heads would all run: another model
    raise hf.CheckpointError(f'{final}: a {config["method"]} model exported without its exit '
                             f'plan ({exit_plan.FILE}); run train.py with the same config again '
                             f'to re-export it (nothing is retrained)')
  return Trained(config, cfg, params, tok, names, plan)


def write_final(workdir, cfg, params, tok, label_names, summary, meta=None, plan=None):
  """Writes `<workdir>/final` (HF directory, summary.json, FINAL_META, exit plan) as one rename.

  Built in `final.tmp/`, then swapped in: a kill leaves the old final/ or the new one, never a mix.
  """
  final = final_dir(workdir)
  tmp, old = final.with_name(f'{FINAL}.tmp'), final.with_name(f'{FINAL}.old')
  shutil.rmtree(tmp, ignore_errors=True)
  hf.save(tmp, cfg, params, tok, label_names)
  fsio.write_json(tmp / SUMMARY, summary, indent=2)
  if meta is not None:  # the method, tau and dtype it was exported with, and its stages
    fsio.write_json(tmp / FINAL_META, meta, indent=2)
  if plan is not None:
    plan.save(tmp / exit_plan.FILE)
  if final.exists():
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
  tmp.rename(final)
  shutil.rmtree(old, ignore_errors=True)
  return final

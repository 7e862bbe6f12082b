"""A trained workdir's `final/` folder: the one writer and the one loader of what training hands on.

`final/` is a Hugging Face directory (mp_jax.model.hf) plus `summary.json` (dev metrics) and
FINAL_META (method, tau, dtype and the stage fingerprints it was exported from). Beside it,
`<workdir>/config.json` is the config of the run that trained it.
"""

import pathlib
import shutil
from typing import NamedTuple

from mp_jax import fsio
from mp_jax.model import hf

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


def load(workdir) -> Trained:
  """The trained model of `workdir`; hf.CheckpointError (naming the folder) if there is none."""
  workdir, final = pathlib.Path(workdir), final_dir(workdir)
  if not (final / 'config.json').exists():
    raise hf.CheckpointError(f'{workdir}: no trained model in {final} (run train.py first)')
  config = fsio.read_json(workdir / 'config.json')  # an error names the file
  if (final / FINAL_META).exists():  # what final/ was exported as, not a later config.json
    run = fsio.read_json(final / FINAL_META)
    config = dict(config, method=run['method'], eval=dict(config['eval'], tau=run['tau']))
  cfg, params, tok = hf.load(final)  # checks the tokenizer against the model's vocabulary
  meta = fsio.read_json(final / hf.META_FILE)
  names = meta.get('label_names') or [str(i) for i in range(cfg.num_labels)]
  return Trained(config, cfg, params, tok, names)


def write_final(workdir, cfg, params, tok, label_names, summary, meta=None):
  """Writes `<workdir>/final` (HF directory, summary.json, FINAL_META) as one rename.

  Built in `final.tmp/`, then swapped in: a kill leaves the old final/ or the new one, never a mix.
  """
  final = final_dir(workdir)
  tmp, old = final.with_name(f'{FINAL}.tmp'), final.with_name(f'{FINAL}.old')
  shutil.rmtree(tmp, ignore_errors=True)
  hf.save(tmp, cfg, params, tok, label_names)
  fsio.write_json(tmp / SUMMARY, summary, indent=2)
  if meta is not None:  # the method, tau and dtype it was exported with, and its stages
    fsio.write_json(tmp / FINAL_META, meta, indent=2)
  if final.exists():
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
  tmp.rename(final)
  shutil.rmtree(old, ignore_errors=True)
  return final

"""README stays true: its scripts, config files, --config keys, JAX extras and imports exist."""

import importlib.metadata
import importlib.util
import pathlib
import re

import pytest

from configs import base

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text()
# Code blocks and inline code, with shell line continuations joined.
CODE = re.sub(r'\\\n\s*', ' ', '\n'.join(re.findall(r'```\w*\n(.*?)```', README, re.S)
                                          + re.findall(r'`([^`\n]+)`', README)))
# Values that stand for the reader's own: `N`, `i`, `$i` (process counts and ids).
PLACEHOLDER = r'\$?[A-Za-z]'
COMMANDS = [line for line in CODE.splitlines() if re.search(r'python \S+\.py', line)]


def _get_config(arg):
  path, _, variant = arg.partition(':')
  spec = importlib.util.spec_from_file_location('readme_config', ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def test_readme_has_the_runbook_commands():
  assert any('train.py --config=configs/qqp.py' in c for c in COMMANDS)
  assert len(COMMANDS) > 10


@pytest.mark.parametrize('script', sorted({m for c in COMMANDS
                                           for m in re.findall(r'python (\S+\.py)', c)}))
def test_scripts_exist(script):
  assert (ROOT / script).is_file(), script


@pytest.mark.parametrize('command', COMMANDS)
def test_config_files_and_keys(command):
  """The --config file (and variant) loads; every --config.<key>=<value> exists and type-checks."""
  args = re.findall(r'--config=([^\s\'"]+)', command)
  if not args:
    assert '--config.' not in command, command
    return
  c = _get_config(args[0])
  for key, value in re.findall(r'--config\.([\w.]+)=([^\s\'"]+)', command):
    section = c
    for part in key.split('.'):
      assert part in section, f'README: --config.{key} is not a config key ({command})'
      section = section[part]
    if not re.fullmatch(PLACEHOLDER, value):  # a wrong type or a value the config rejects fails
      base.build(f'{key}={value}')


def test_jax_extras_exist():
  """Every `jax[extra]==version` is an extra of the installed jax, pinned to its version."""
  meta = importlib.metadata.metadata('jax')
  pins = re.findall(r'jax\[([\w-]+)\]==([\d.]+)', README)
  assert {e for e, _ in pins} >= {'cuda12', 'cuda13', 'tpu'}
  for extra, version in pins:
    assert extra in meta.get_all('Provides-Extra'), extra
    assert version == meta['Version'], (extra, version)
  assert f'jax=={meta["Version"]}' in (ROOT / 'requirements.txt').read_text()


def test_python_imports_shown_are_the_public_ones_and_work():
  """Every `from mp_jax... import` in the README's Python blocks resolves (no moved paths)."""
  blocks = '\n'.join(re.findall(r'```python\n(.*?)```', README, re.S))
  imports = [line for line in blocks.splitlines() if re.match(r'(from|import) mp_jax\b', line)]
  assert {'from mp_jax import Predictor', 'from mp_jax.model import hf'} <= set(imports)
  for line in imports:
    namespace = {}
    exec(line, namespace)  # pylint: disable=exec-used  (an import line from our own README)

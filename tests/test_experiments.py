"""The one-command reproduction, in its smoke form on the tiny offline task."""

import json
import types

import pytest

from experiments import run, tables
from mp_jax import methods
from tests import tiny

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
LTP_RUN = '0.03+model.temperature=0.002'  # a threshold and a config item for that run only


def test_smoke_reproduction_trains_all_methods_and_writes_tables(tmp_path, monkeypatch):
  monkeypatch.setitem(run.CONFIGS, 'tiny', types.SimpleNamespace(
      get_config=lambda arg: tiny.config(tmp_path / 'data', arg)))
  out = tmp_path / 'runs'
  timings = run.Timings(out / 'timings.json')
  results = {'tiny': run.run_task('tiny', out, True, timings, ltp_runs=(LTP_RUN,))}
  assert json.loads((out / 'timings.json').read_text()) == timings
  assert set(timings) == {f'tiny/{m} {step}' for m in (*run.ORDER, f'ltp@{LTP_RUN}')
                          for step in ('train', 'eval')}
  # The same command again trains and evaluates nothing, and keeps the first run's times.
  finals = {p: p.stat().st_mtime for p in out.glob('tiny/*/final/summary.json')}
  logs = {p: p.read_bytes() for p in out.glob('tiny/*/metrics.jsonl')}
  monkeypatch.setattr(run.trainer, 'run', lambda *a, **k: pytest.fail('trained again'))
  again = run.run_task('tiny', out, True, run.Timings(out / 'timings.json'), (LTP_RUN,))
  assert again == json.loads(json.dumps(results['tiny']))
  assert {p: p.stat().st_mtime for p in finals} == finals
  assert {p: p.read_bytes() for p in logs} == logs and len(logs) == 5
  assert json.loads((out / 'timings.json').read_text()) == timings
  assert set(results['tiny']) == {'bert', 'ltp', 'fastbert', 'mp', f'ltp@{LTP_RUN}'}
  # Shared stages are links to mp's, not retrained copies.
  for method in run.ORDER[1:]:
    for stage in methods.shared_stages(method):
      link = out / 'tiny' / method / stage
      assert link.is_symlink() and link.resolve() == (out / 'tiny' / 'mp' / stage).resolve()
  assert not (out / 'tiny' / 'fastbert' / 'exits').is_symlink()
  extra = json.loads((out / 'tiny' / f'ltp_t{LTP_RUN}' / 'config.json').read_text())
  assert (extra['model']['final_threshold'], extra['model']['temperature']) == (0.03, 0.002)
  assert json.loads((out / 'tiny' / 'ltp' / 'config.json').read_text())['model'][
      'temperature'] != 0.002
  for method in ('bert', 'ltp', 'fastbert', 'mp'):
    rep = json.loads((out / 'tiny' / method / 'eval' / 'report.json').read_text())
    assert rep == json.loads(json.dumps(results['tiny'][method]))
    assert rep['engine_agreement'] == {'labels': 1.0, 'exit_layers': 1.0}

  results_md = tmp_path / 'docs' / 'RESULTS.md'
  results_md.parent.mkdir()
  results_md.write_text('# Results\n\nHand-written reading.\n\n' + tables.START + '\nold\n'
                        + tables.END + '\n\nMore prose.\n')
  md = run.write_results(results, out, timings, 12.0, True, 'experiments/run.py --smoke',
                         results_md)
  text = results_md.read_text()
  assert 'Hand-written reading.' in text and 'More prose.' in text and '\nold\n' not in text
  for name in ('| bert |', '| ltp |', '| fastbert |', '| mp |', 'Table 4', f'ltp@{LTP_RUN}'):
    assert name in md, name
  fig = results_md.parent / 'figures' / 'tiny_figure1.png'
  assert fig.read_bytes()[:8] == PNG_MAGIC

"""The one-command reproduction: its flags, tables and goal check, and the smoke run end to end."""

import json
import pathlib
import re
import subprocess
import sys
import types

import pytest
from absl import app

from configs import base
from experiments import run, search, selection, tables
from mp_jax import methods
from mp_jax.evaluation import compare
from mp_jax.model import hf
from tests import tiny

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
LTP_RUN = '0.03+model.temperature=0.002'  # a threshold and a config item for that run only
WIDTH_RUN = '0.25'  # a more aggressive costeff: a quarter of the heads and of the FFN
CI = re.compile(r'[+-]\d+\.\d \[[+-]\d+\.\d, [+-]\d+\.\d\]')  # Δ [95% CI] in points


def test_every_task_config_is_a_task():
  assert {'mr', 'bbc', 'qqp', 'mrpc', 'rte', 'ag_news', 'yelp'} <= set(run.available_tasks())
  assert 'base' not in run.available_tasks()
  for task in run.available_tasks():
    for method in methods.METHODS:
      assert run.config_for(task, method, False).method == method


def test_unknown_task_names_the_available_ones():
  with pytest.raises(app.UsageError, match=r"unknown task 'qqq'.*ag_news, bbc, mr, mrpc"):
    run.task_config('qqq')


def test_set_items_go_to_their_task_only():
  sets = run.parse_sets(['qqp:data.path=/data/QQP', 'qqp:model.init=/models/bert-base',
                         'mr:train.lr=1e-4,model.temperature=0.002'], ['mr', 'qqp', 'bbc'])
  assert sets == {'qqp': ['data.path=/data/QQP', 'model.init=/models/bert-base'],
                  'mr': ['train.lr=1e-4', 'model.temperature=0.002'], 'bbc': []}
  qqp, mr, bbc = (run.config_for(t, 'mp', False, *sets[t]) for t in ('qqp', 'mr', 'bbc'))
  assert (qqp.data.path, qqp.model.init) == ('/data/QQP', '/models/bert-base')
  assert (mr.train.lr, mr.model.temperature, mr.data.path) == (1e-4, 0.002, '')
  default = run.config_for('bbc', 'mp', False)
  assert (bbc.train.lr, bbc.model.temperature) == (default.train.lr, default.model.temperature)
  # A tuple value keeps its commas (an older workdir's training grid, README).
  old = run.parse_sets(['mr:data.length_buckets=(32, 64),train.lr=1e-4'], ['mr'])['mr']
  assert old == ['data.length_buckets=(32, 64)', 'train.lr=1e-4']
  assert run.config_for('mr', 'mp', False, *old).data.length_buckets == (32, 64)
  c = base.build('smoke,data.length_buckets=(16,),eval.tau_sweep=(0.1, 0.2),seed=3')
  assert (c.data.length_buckets, c.eval.tau_sweep, c.seed) == ((16,), (0.1, 0.2), 3)
  # Later items win: a search trial's settings over --set.
  assert run.config_for('mr', 'ltp', True, *sets['mr'], 'model.temperature=0.005').model[
      'temperature'] == 0.005


@pytest.mark.parametrize('value, match', [
    ('qqp=data.path=/x', 'expected TASK:key=value'),
    ('qqp:', 'expected TASK:key=value'),
    ('yelp:data.path=/x', "task 'yelp' is not in --tasks"),
    ('qqp:data.path', "'data.path' is not key=value"),
    ('qqp:a=1,', "'' is not key=value"),
    ('qqp:method=ltp', 'the method is set per run'),
])
def test_malformed_set_is_a_usage_error(value, match):
  with pytest.raises(app.UsageError, match=match):
    run.parse_sets([value], ['mr', 'qqp'])


@pytest.mark.parametrize('flag, what, value, match', [
    ('width_keeps', 'keep', 'yelp:0.25', "--width_keeps item 'yelp:0.25': expected task:keep"),
    ('width_keeps', 'keep', 'mr', 'expected task:keep'),
    ('ltp_thresholds', 'final_threshold', 'mr:', 'expected task:final_threshold'),
])
def test_malformed_extra_runs_are_usage_errors(flag, what, value, match):
  with pytest.raises(app.UsageError, match=match):
    run.parse_runs(flag, [value], ['mr', 'qqp'], what)
  assert run.parse_runs(flag, ['mr:0.25', 'mr:0.1', 'qqp:0.3'], ['mr', 'qqp'], 'x') == {
      'mr': ['0.25', '0.1'], 'qqp': ['0.3']}


def test_width_run_items_set_both_keeps_and_extra_items():
  c = run.config_for('mr', 'costeff', True, *run.width_run_items('0.25+train.epochs.width=1'))
  assert (c.model.head_keep, c.model.ffn_keep, c.train.epochs.width) == (0.25, 0.25, 1)


def test_a_typo_in_a_set_key_fails_when_the_config_is_built():
  with pytest.raises(ValueError, match="unknown key 'train.lrr'"):
    run.config_for('mr', 'mp', False, *run.parse_sets(['mr:train.lrr=1'], ['mr'])['mr'])


@pytest.mark.parametrize('args, message', [
    (['--tasks=mr,qqq'], "unknown task 'qqq': --tasks takes task configs in configs/: ag_news"),
    (['--tasks=mr', '--set=mr:train.lrr=1'], "error: config variant: unknown key 'train.lrr'"),
])
def test_command_line_errors_stop_before_anything_is_written(tmp_path, args, message):
  root = pathlib.Path(run.__file__).resolve().parents[1]
  p = subprocess.run([sys.executable, 'experiments/run.py', f'--out={tmp_path / "out"}', *args],
                     cwd=root, capture_output=True, text=True, timeout=300, check=False)
  assert p.returncode != 0 and message in p.stderr, p.stderr
  assert not (tmp_path / 'out').exists()


def _sel(acc, gflops, qualified=True):
  d = {'diff': acc - 0.85, 'lo': acc - 0.87, 'hi': acc - 0.83, 'n': 200}
  rule = {'tau': 0.1, 'qualified': qualified, 'dev': d,
          'test': {'accuracy': acc, 'gflops_per_example': gflops, 'flops_speedup': 1.0 / gflops,
                   'wallclock_speedup': 0.8 / gflops, **d}}
  return {r: rule for r in compare.RULES}


def test_goal_check_compares_mp_with_the_best_qualified_single_axis_method():
  assert set(tables.SINGLE_AXIS) == {'ltp', 'fastbert'}
  reps = {m: {'method': m} for m in methods.METHODS}
  sel = {'bert': _sel(0.85, 1.0), 'ltp': _sel(0.85, 0.5), 'fastbert': _sel(0.845, 0.4),
         'mp': _sel(0.845, 0.3)}
  line = tables.goal_check('t', sel, reps)
  assert line.startswith('**Goal check**') and '**0.75x**' in line and 'fastbert' in line
  assert '**met**' in line
  sel['fastbert'] = _sel(0.80, 0.2, qualified=False)  # not within 1 point: not a comparator
  line = tables.goal_check('t', sel, reps)
  assert '**0.60x**' in line and 'ltp' in line and '**met**' in line
  sel['mp'] = _sel(0.80, 0.3, qualified=False)
  assert '**missed**' in tables.goal_check('t', sel, reps)
  # pyramid against every other qualified method, mp and costeff included (strictly fewer FLOPs).
  sel.update(mp=_sel(0.845, 0.3), costeff=_sel(0.85, 0.25), pyramid=_sel(0.85, 0.2))
  line = tables.goal_check('t', sel, reps).split('\n\n')[-1]
  assert 'pyramid' in line and '**0.80x**' in line and 'costeff' in line and '**met**' in line
  sel['pyramid'] = _sel(0.85, 0.25)
  assert '**missed**' in tables.goal_check('t', sel, reps).split('\n\n')[-1]



def test_smoke_reproduction_trains_all_methods_and_writes_tables(tmp_path, monkeypatch):
  monkeypatch.setitem(run.CONFIGS, 'tiny', types.SimpleNamespace(
      get_config=lambda arg: tiny.config(tmp_path / 'data', arg)))
  out = tmp_path / 'runs'
  timings = run.Timings(out / 'timings.json')
  results = {'tiny': run.run_task('tiny', out, True, timings, ltp_runs=(LTP_RUN,),
                                  width_runs=(WIDTH_RUN,))}
  res = results['tiny']
  assert json.loads((out / 'timings.json').read_text()) == timings
  steps = ('train', 'dev', 'eval')
  assert set(timings) == ({f'tiny/{m} {step}' for m in run.ORDER for step in steps}
                          | {f'tiny/ltp@{LTP_RUN} {step}' for step in ('train', 'eval')}
                          | {f'tiny/costeff@{WIDTH_RUN} {step}' for step in steps})
  # The same command again trains and evaluates nothing, and keeps the first run's times.
  finals = {p: p.stat().st_mtime for p in out.glob('tiny/*/final/summary.json')}
  evals = {p: p.stat().st_mtime for p in out.glob('tiny/*/eval/*.json')}
  logs = {p: p.read_bytes() for p in out.glob('tiny/*/metrics.jsonl')}
  monkeypatch.setattr(run.trainer, 'run', lambda *a, **k: pytest.fail('trained again'))
  monkeypatch.setattr(selection.report, 'build', lambda *a, **k: pytest.fail('evaluated again'))
  again = run.run_task('tiny', out, True, run.Timings(out / 'timings.json'), (LTP_RUN,),
                       width_runs=(WIDTH_RUN,))
  assert again == json.loads(json.dumps(res))
  assert {p: p.stat().st_mtime for p in finals} == finals
  assert {p: p.stat().st_mtime for p in evals} == evals
  assert {p: p.read_bytes() for p in logs} == logs and len(logs) == len(run.ORDER) + 2
  assert json.loads((out / 'timings.json').read_text()) == timings
  wide = f'costeff@{WIDTH_RUN}'
  assert set(res['reports']) == {*methods.METHODS, f'ltp@{LTP_RUN}', wide}
  assert list(res['selection']) == [*methods.METHODS, wide] and res['search'] is None
  # Shared stages are links to the earlier method's, not retrained copies.
  for i, method in enumerate(run.ORDER[1:], 1):
    src, shared = run.stage_source(method, run.ORDER[:i])
    assert 'finetune' in shared  # every method starts from the one fine-tune
    for stage in shared:
      link = out / 'tiny' / method / stage
      assert link.is_symlink() and link.resolve() == (out / 'tiny' / src / stage).resolve()
  assert run.stage_source('ltp', run.ORDER[:1]) == ('mp', ('finetune', 'calibrate', 'soft',
                                                            'hard'))
  assert not (out / 'tiny' / 'fastbert' / 'exits').is_symlink()
  # The width methods: pyramid's width stage is costeff's; both final models are slim (half the
  # heads and FFN), counted against the unpruned model: at tau 0 costeff's FLOPs halve exactly.
  assert run.stage_source('pyramid', run.ORDER[:run.ORDER.index('pyramid')]) == (
      'costeff', ('finetune', 'width'))
  for m in ('costeff', 'pyramid'):
    cfg = hf.load(out / 'tiny' / m / 'final')[0]
    assert 2 * cfg.num_heads == cfg.unpruned().num_heads
    assert 2 * cfg.intermediate_size == cfg.unpruned().intermediate_size
  at0 = next(e for e in res['reports']['costeff']['tau_sweep'] if e['tau'] == 0.0)
  assert at0['flops_speedup'] == pytest.approx(2.0, rel=1e-6)  # 1.0 against its own dense
  # The --width_keeps run: its own keep, its fine-tune linked, fewer parameters than costeff's.
  assert (out / 'tiny' / f'costeff_k{WIDTH_RUN}' / 'finetune').is_symlink()
  wcfg = hf.load(out / 'tiny' / f'costeff_k{WIDTH_RUN}' / 'final')[0]
  assert 4 * wcfg.num_heads == wcfg.unpruned().num_heads
  r, rw = res['reports']['costeff'], res['reports'][wide]
  assert rw['dense_params'] == r['dense_params'] == res['reports']['bert']['params']
  assert rw['params'] < r['params'] < r['dense_params']
  assert res['reports']['pyramid']['tau_sweep'][0]['flops_speedup'] >= 2.0 * (1 - 1e-6)
  extra = json.loads((out / 'tiny' / f'ltp_t{LTP_RUN}' / 'config.json').read_text())
  assert (extra['model']['final_threshold'], extra['model']['temperature']) == (0.03, 0.002)
  assert json.loads((out / 'tiny' / 'ltp' / 'config.json').read_text())['model'][
      'temperature'] != 0.002
  for method in methods.METHODS:
    rep = json.loads((out / 'tiny' / method / 'eval' / 'report.json').read_text())
    assert rep == json.loads(json.dumps(res['reports'][method]))
    assert rep['engine_agreement'] == {'labels': 1.0, 'exit_layers': 1.0}
    dev = json.loads((out / 'tiny' / method / 'eval' / selection.DEV_SWEEP).read_text())
    assert dev['taus'] == selection.dev_taus(method, run.config_for('tiny', method, True))
    for rule, s in res['selection'][method].items():
      # Both rules' taus are in the one test evaluation; bert against itself differs by 0.
      assert s['tau'] in {e['tau'] for e in rep['tau_sweep']}, (method, rule)
      assert s['test']['lo'] <= s['test']['diff'] <= s['test']['hi']
      assert s['dev']['n'] == dev['num_examples'] and s['test']['n'] == rep['num_examples']
      if not methods.has_exits(method):
        assert s['tau'] == 0.0
  bert = res['selection']['bert']['bert-1']['test']
  assert (bert['diff'], bert['lo'], bert['hi']) == (0.0, 0.0, 0.0)

  results_md = tmp_path / 'docs' / 'RESULTS.md'
  results_md.parent.mkdir()
  results_md.write_text('# Results\n\nHand-written reading.\n\n' + tables.START + '\nold\n'
                        + tables.END + '\n\nMore prose.\n')
  md = run.write_results(results, out, timings, 12.0, True, 'experiments/run.py --smoke',
                         results_md)
  text = results_md.read_text()
  assert 'Hand-written reading.' in text and 'More prose.' in text and '\nold\n' not in text
  for rule, words in compare.RULES.items():
    assert f'rule `{rule}`: τ {words}' in md, rule
  for name in ('| bert |', '| ltp |', '| fastbert |', '| mp |', '| static |', '| costeff |',
               '| pyramid |', 'Table 4',
               f'ltp@{LTP_RUN}', '**Goal check** (tiny, mp', 'Wall time per step',
               f'| {wide} |', '**Clock goal** (tiny, costeff, τ 0', '## Width: costeff'):
    assert name in md, name
  assert len(CI.findall(md)) >= 2 * 2 * (len(methods.METHODS) - 1)  # test and dev, both rules
  for png in ('tiny_figure1.png', 'tiny_pareto.png'):
    assert (results_md.parent / 'figures' / png).read_bytes()[:8] == PNG_MAGIC
    assert f'](figures/{png})' in md


@pytest.mark.parametrize('acc_035', [0.70, 0.85])
def test_searched_row_is_mp_on_the_chosen_trials_backbone(tmp_path, monkeypatch, acc_035):
  """run_task with a search: the default trial is the ltp run; mp (searched) on the chosen one.

  acc_035 0.70: keep 0.35 is out of bert-1 and the defaults (keep 0.5) win, so the searched rows
  are the default runs and nothing is trained twice; 0.85: keep 0.35 wins and `mp (searched)`
  trains its exits on that trial's backbone.
  """
  trained, evaluated = [], []

  def fake_train(c, wd):
    trained.append((c.method, wd.name, c.model.target_token_keep))
    return True

  def fake_dev(c, wd):
    keep = c.model.target_token_keep
    acc = {0.35: acc_035, 0.5: 0.84, 0.7: 0.85}.get(keep, 0.85) if c.method != 'bert' else 0.85
    taus = selection.dev_taus(c.method, c)
    e = lambda t: {'tau': t, 'accuracy': acc, 'gflops_per_example': keep,
                   'dense_gflops_per_example': 1.0, 'flops_speedup': 1 / keep}
    return {'taus': taus, 'sweep': [e(t) for t in taus], 'correct': ['1101'] * len(taus),
            'num_examples': 4}, True

  def fake_eval(c, wd, tau, extra=()):
    evaluated.append((wd.name, tau, tuple(extra)))
    taus = sorted({tau, *extra})
    return {'method': c.method, 'tau_sweep': [{'tau': t, 'accuracy': 0.5, 'gflops_per_example': 1}
                                              for t in taus]}, True

  monkeypatch.setitem(run.CONFIGS, 'tiny', types.SimpleNamespace(
      get_config=lambda arg: tiny.config(tmp_path / 'data', arg)))
  monkeypatch.setattr(run, 'train_once', fake_train)
  monkeypatch.setattr(selection, 'dev_eval', fake_dev)
  monkeypatch.setattr(selection, 'evaluate_once', fake_eval)
  monkeypatch.setattr(selection, 'judge', lambda *a: None)
  out = tmp_path / 'runs'
  res = run.run_task('tiny', out, True, run.Timings(out / 'timings.json'), search_trials=2)
  rec = res['search']
  base, other = 'keep0.5_temp0.001_lam10', 'keep0.35_temp0.001_lam10'
  assert [t['name'] for t in rec['trials']] == [base, other] and rec['qualified']
  root = out / 'tiny'
  assert json.loads((root / 'search' / search.RECORD).read_text()) == rec
  assert (root / 'search' / base).resolve() == (root / 'ltp').resolve()  # reused, not retrained
  assert (root / 'search' / other / 'finetune').resolve() == (root / 'mp' / 'finetune').resolve()
  trial_runs = [t for t in trained if t[1] in (base, other)]
  assert trial_runs == [('ltp', base, 0.5), ('ltp', other, 0.35)]  # train_once finds ltp's done
  assert list(res['selection'])[-2:] == [run.SEARCHED_LTP, run.SEARCHED]
  if acc_035 < 0.84:
    assert rec['chosen'] == base
    assert not (root / run.SEARCHED_DIR).exists() and trained[-1][1] == other  # the last trial
    assert [e[0] for e in evaluated[-2:]] == ['ltp', 'mp']  # the default runs' reports
  else:
    assert rec['chosen'] == other
    chosen = root / 'search' / other
    for stage in methods.shared_stages('mp', base='ltp'):
      assert (root / run.SEARCHED_DIR / stage).resolve() == (chosen / stage).resolve()
    assert trained[-1] == ('mp', run.SEARCHED_DIR, 0.35)
    assert [e[0] for e in evaluated[-2:]] == [other, run.SEARCHED_DIR]

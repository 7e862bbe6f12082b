"""eval.py's report and the Predictor on a trained smoke workdir."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mp_jax import fsio, methods
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading, sources, tokenization
from mp_jax.evaluation import reference, report, served
from mp_jax.model import bert, exit_plan, flops, hf
from mp_jax.model import config as model_config
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import predictor, workers
from mp_jax.training import trainer
from tests import tiny
from tests.conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
REPORT_KEYS = ('accuracy', 'gflops_per_example', 'dense_gflops_per_example', 'flops_speedup',
               'wallclock_speedup', 'examples_per_s', 'dense_examples_per_s', 'tau',
               'exit_layer_histogram', 'tokens_kept_per_layer', 'by_length_bucket', 'tau_sweep')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A smoke `mp` workdir whose thresholds really prune and whose exits really exit."""
  tmp = tmp_path_factory.mktemp('report')
  # Head weight 0: a head costs nothing, so the exit plan keeps every head some row exits at
  # (on dev, where this model is unsure: tau 0.97).
  c = tiny.config(tmp, 'method=mp,smoke', **{'eval.tau': 0.97, 'train.max_steps': 10,
                                             'model.final_threshold': 0.02,
                                             'eval.head_weight': 0.0})
  trainer.run(c, tmp / 'w')
  return c, tmp / 'w'


@pytest.fixture(scope='module')
def pred(trained):
  return predictor.Predictor.from_workdir(trained[1])


def test_eval_cli_writes_every_key_and_valid_pngs(trained):
  c, workdir = trained
  args = ['--config=configs/base.py:method=mp,smoke', f'--workdir={workdir}',
          '--config.eval.tau=0.97', '--config.model.final_threshold=0.02',
          '--config.eval.head_weight=0.0', *tiny.flags_for(c)]
  out = subprocess.run([sys.executable, str(ROOT / 'eval.py'), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.returncode == 0, out.stderr[-3000:]
  assert '| accuracy |' in out.stdout  # the table is printed
  rep = json.loads((workdir / 'eval' / 'report.json').read_text())
  for key in REPORT_KEYS:
    assert key in rep, key
  assert '_predictions' not in rep
  _check_predictions(rep, report.load_predictions(workdir / 'eval'))
  assert rep['engine_agreement'] == {'labels': 1.0, 'exit_layers': 1.0}
  assert rep['wallclock_speedup'] > 0 and rep['examples_per_s'] > 0
  assert sum(rep['exit_layer_histogram']) == rep['num_examples']
  assert {e['tau'] for e in rep['tau_sweep']} >= {0.0, 0.97, 1.0}
  assert sum(e['num_examples'] for e in rep['by_length_bucket'].values()) == rep['num_examples']
  pngs = sorted((workdir / 'eval').glob('*.png'))
  assert len(pngs) == 4
  for p in pngs:
    assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 2000, p
  md = (workdir / 'eval' / 'report.md').read_text()
  assert md.count('.png') == 4
  labels = reference.group_labels(rep['length_group_edges'])  # the config's edges, not literals
  assert all(f'| {labels[g]} |' in md for g in rep['by_length_bucket'])

  # The report's numbers are the reference path's, under final/'s exit plan.
  _, cfg, params, tok, _, plan = workdir_lib.load(workdir)
  ds = loading.load_task(c.data)
  enc = batching.encode(tok, ds[rep['split']], cfg.max_seq_length)
  res = reference.run(params, cfg, enc, pruning='hard', exits=True, batch_size=8,
                      length_buckets=(16, 64))
  m, _, _ = reference.metrics(res, cfg, tau=0.97, plan=plan)
  for k in ('accuracy', 'gflops_per_example', 'flops_speedup', 'exit_layer_histogram', 'heads'):
    assert rep[k] == pytest.approx(m[k]), k
  assert rep['heads'] == plan.heads(0.97).astype(int).tolist()
  assert [e['heads'] for e in rep['tau_sweep'] if e['tau'] == 0.0] == [[0] * (cfg.num_layers - 1)]
  np.testing.assert_allclose(rep['tokens_kept_per_layer'], res['n_ffn'].mean(0), rtol=1e-6)
  assert rep['tokens_kept_per_layer'][-1] < rep['tokens_in_mean']  # it does prune
  # At tau 0 no head can fire and none runs: the cost is the pruned backbone's alone.
  m0, exit0, _ = reference.metrics(res, cfg, tau=0.0)
  assert (exit0 == cfg.num_layers).all()
  backbone = flops.example_flops(cfg, res['n_attn'], res['n_ffn']).mean() / 1e9
  assert m0['gflops_per_example'] == pytest.approx(backbone)
  assert m['gflops_per_example'] > backbone and 1 in m['heads']  # the heads that run cost


def _check_predictions(rep, p):
  """predictions.npz: one row per sweep tau, each agreeing with that entry's accuracy."""
  sweep, n = rep['tau_sweep'], rep['num_examples']
  assert sorted(p) == ['exit_layer', 'labels', 'lengths', 'pred', 'tau']
  assert p['tau'].tolist() == [e['tau'] for e in sweep]
  assert p['pred'].shape == p['exit_layer'].shape == (len(sweep), n)
  assert p['labels'].shape == p['lengths'].shape == (n,)
  for t, e in enumerate(sweep):
    assert np.mean(p['pred'][t] == p['labels']) == e['accuracy'], e['tau']
    assert p['exit_layer'][t].mean() == pytest.approx(e['mean_exit_layer']), e['tau']
  t = p['tau'].tolist().index(rep['tau'])
  assert np.mean(p['pred'][t] == p['labels']) == rep['accuracy']
  hist = np.bincount(p['exit_layer'][t], minlength=len(rep['exit_layer_histogram']) + 1)[1:]
  assert hist.tolist() == rep['exit_layer_histogram']
  assert p['lengths'].mean() == pytest.approx(rep['tokens_in_mean'])


def test_extra_taus_join_the_sweep_and_predictions_precede_report_json(trained, tmp_path,
                                                                       monkeypatch):
  c, workdir = trained
  rep = report.build(c, workdir, measure=False, extra_taus=(0.37, 0.97))
  taus = [e['tau'] for e in rep['tau_sweep']]
  assert taus == sorted({*c.eval.tau_sweep, 0.97, 0.37})  # 0.97 (the report's tau) once
  written = []
  real = fsio.write_json
  monkeypatch.setattr(fsio, 'write_json', lambda path, *a, **kw: (
      written.append(sorted(os.listdir(path.parent))), real(path, *a, **kw))[1])
  out = tmp_path / 'eval'
  out.mkdir()
  (out / 'report.json').write_text('{"accuracy": 0.1}')  # an earlier evaluation's
  report.write(rep, out)
  assert '_predictions' not in rep  # popped: what remains is report.json
  assert 'predictions.npz' in written[-1] and 'report.json' not in written[-1]
  saved = json.loads((out / 'report.json').read_text())
  assert '_predictions' not in saved and saved['accuracy'] == rep['accuracy']
  _check_predictions(saved, report.load_predictions(out))
  # A report without predictions leaves none of an earlier one behind.
  report.write(saved, out)
  assert report.load_predictions(out) is None and (out / 'report.json').exists()
  (out / 'predictions.npz').write_bytes(b'PK\x03\x04 cut short')
  with pytest.raises(fsio.UnreadableFile, match=r'predictions\.npz: not a readable'):
    report.load_predictions(out)


def test_predictor_matches_reference_in_caller_order(trained, pred):
  c, workdir = trained
  ds = loading.load_task(c.data)
  examples = ds['dev'][:20][::-1]
  got = pred.predict([e.text_a for e in examples], batch_size=8)
  assert len(got) == 20
  _, cfg, params, tok, names, plan = workdir_lib.load(workdir)
  enc = batching.encode(tok, examples, cfg.max_seq_length)
  pruning, exits = methods.eval_modes('mp')
  res = reference.run(params, cfg, enc, pruning=pruning, exits=exits, batch_size=8,
                      length_buckets=(64,))
  exit_layer, logits = reference.decide(res, 0.97, cfg.num_layers, plan)
  for i, g in enumerate(got):
    assert g['label'] == names[int(logits[i].argmax())]
    assert g['exit_layer'] == int(exit_layer[i])
    assert sum(g['probs'].values()) == pytest.approx(1.0, abs=1e-5)
    assert 1 <= g['tokens_kept'] <= g['tokens_in']
  # tau=0 never exits early; each prediction is then the teacher's.
  assert all(g['exit_layer'] == cfg.num_layers for g in pred.predict(
      [e.text_a for e in examples[:5]], tau=0.0))


def test_served_is_the_workdir_as_its_eval_config_serves_it(trained):
  """The experiments' setup: final/'s method, tau and plan, the eval split, the serving shapes."""
  c, workdir = trained
  sv = served.load(workdir)
  ds = loading.load_task(c.data)
  assert (sv.pruning, sv.exits, sv.tau) == ('hard', True, 0.97)
  assert len(sv.rows) == len(ds[report.eval_split(c, ds)]) == len(sv.enc.lengths)
  _, cfg, params, _, _, plan = workdir_lib.load(workdir)
  res = reference.run(params, cfg, sv.enc, pruning='hard', exits=True, batch_size=8,
                      length_buckets=(16, 64))
  exit_N, logits_NxC = reference.decide(res, 0.97, cfg.num_layers, plan)
  out = sv.engine().predict(sv.rows)
  np.testing.assert_array_equal(out['exit_layer'], exit_N)
  np.testing.assert_array_equal(out['labels'], logits_NxC.argmax(-1))
  assert (out['exit_layer'] < cfg.num_layers).any()  # its plan's heads run: some rows exit
  dense = sv.dense().predict(sv.rows)  # every token through every layer
  assert (dense['exit_layer'] == cfg.num_layers).all()
  np.testing.assert_array_equal(dense['n_ffn'][:, -1], sv.enc.lengths)
  assert sv.engine(schedule='fused').predict(sv.rows)['exit_layer'].tolist() == exit_N.tolist()


def test_the_exit_plan_travels_with_final(trained, tmp_path):
  """final/ holds the dev split's profile; the head weight is the evaluating config's; a final/
  without its plan is refused by name."""
  c, workdir = trained
  _, cfg, _, tok, _, plan = workdir_lib.load(workdir)
  dev = batching.encode(tok, loading.load_task(c.data)['dev'], cfg.max_seq_length)
  assert plan.u_NxE.shape == (len(dev.lengths), cfg.num_layers - 1)
  heavy = c.copy_and_resolve_references()
  with heavy.unlocked():
    heavy.eval.head_weight = 1e6  # no head can pay for itself
  rep = report.build(heavy, workdir, measure=False)
  assert rep['heads'] == [0] * (cfg.num_layers - 1) and rep['mean_exit_layer'] == cfg.num_layers
  assert rep['engine_agreement'] == {'labels': 1.0, 'exit_layers': 1.0}
  assert all(e['mean_exit_layer'] == cfg.num_layers for e in rep['tau_sweep'])
  bare = tmp_path / 'w'
  (bare / 'final').mkdir(parents=True)
  os.symlink(workdir / 'config.json', bare / 'config.json')
  for f in (workdir / 'final').iterdir():
    if f.name != exit_plan.FILE:
      os.symlink(f, bare / 'final' / f.name)
  with pytest.raises(hf.CheckpointError, match=exit_plan.FILE):
    workdir_lib.load(bare)


# Blank texts are answered and flagged, not refused (tests/test_predictor.py).
@pytest.mark.parametrize('bad, err, where', [
    (['ok', ('good', 'bad')], TypeError, r'texts\[1\] .* use predict_pairs'),
    ([None], TypeError, r'texts\[0\]'),
    ([('a', 'b', 'c')], TypeError, r'texts\[0\]'),
    ([3.5], TypeError, r'texts\[0\]'),
])
def test_predictor_rejects_bad_input_by_index(pred, bad, err, where):
  with pytest.raises(err, match=where):
    pred.predict(bad)


def test_predictor_answers_hostile_but_valid_text(pred):
  texts = ['good ' * 20000, 'bad\x00\x07 film \u202e', 'ok']
  out = pred.predict(texts, batch_size=8) + pred.predict_pairs(['good movie'], ['bad plot'])
  assert len(out) == 4
  assert out[0]['tokens_in'] == pred.cfg.max_seq_length and out[0]['truncated']  # not an error
  assert all(sum(o['probs'].values()) == pytest.approx(1.0, abs=1e-5) for o in out)
  assert pred.predict([]) == []


def test_predictor_runs_in_the_trained_dtype_unless_told(tmp_path):
  tok = tokenization.Tokenizer.from_dir(tiny.write_vocab(tmp_path / 'vocab'))
  cfg = model_config.ModelConfig(vocab_size=tok.vocab_size, hidden_size=16, num_layers=2,
                                 num_heads=2, intermediate_size=32, max_position_embeddings=64,
                                 num_labels=2, max_seq_length=32, exit_width=8, dtype='bfloat16')
  hf.save(tmp_path / 'w' / 'final', cfg, bert.init_params(cfg, 0), tok, ['neg', 'pos'])
  tiny.save_exit_plan(tmp_path / 'w' / 'final', cfg)
  (tmp_path / 'w' / 'config.json').write_text(json.dumps(
      {'method': 'mp', 'eval': {'tau': 0.5, 'length_buckets': [8, 16, 32]}}))
  assert predictor.Predictor.from_workdir(tmp_path / 'w').cfg.dtype == 'bfloat16'
  pred = predictor.Predictor.from_workdir(tmp_path / 'w', dtype='float32')
  assert pred.engine(2).cfg.dtype == 'float32'
  assert [o['label'] in ('neg', 'pos') for o in pred.predict(['good film', 'bad'])] == [True] * 2
  with pytest.raises(ValueError, match=r"dtype must be None \(as trained\) or one of .*'float16'"):
    predictor.Predictor.from_workdir(tmp_path / 'w', dtype='float16')


def test_empty_eval_split_is_a_clear_error(tmp_path):
  c = tiny.config(tmp_path, 'method=bert,smoke')
  ds = loading.load_task(c.data)
  assert report.eval_split(c, ds) in ds
  empty = sources.Dataset({'train': ds['train'], 'test': []}, ds.label_names)
  with pytest.raises(sources.DataError, match=r"eval.split='test': no examples .* test 0"):
    report.eval_split(c, empty)


def test_length_groups_and_their_labels_follow_the_edges():
  lengths = np.array([1, 35, 36, 70, 71, 512])
  assert reference.length_groups(lengths, (35, 70)).tolist() == [0, 0, 1, 1, 2, 2]
  assert reference.group_labels((35, 70)) == {
      'short': 'short (1-35)', 'middle': 'middle (36-70)', 'long': 'long (>70)'}
  assert reference.group_labels([16, 64])['middle'] == 'middle (17-64)'



def test_dense_baseline_is_the_unpruned_model():
  """A static (L/2-layer) model's measured speedup is over the full model's dense program
  (eval.py's report and bench.py's engines alike)."""
  cfg = tiny_config(num_layers=4)
  params = bert.init_params(cfg, 0)
  s_cfg, s_params = trainer.static_student(cfg, params)
  kw = dict(length_buckets=(8, 16), batch_buckets=(1, 4))
  own = engine_lib.prepare(cfg, params)
  assert engine_lib.unpruned_dense(cfg, own, **kw).params is own.tree  # unpruned: own weights
  s_own = engine_lib.prepare(s_cfg, s_params)
  dense = engine_lib.unpruned_dense(s_cfg, s_own, **kw)
  assert isinstance(dense, engine_lib.DenseEngine) and dense.cfg == cfg
  out = dense.predict([([2, 5, 7, 3], [0, 0, 0, 0])] * 3)  # runs at the full model's shapes
  assert out['labels'].shape == (3,)
  bench = workers.build_engines(s_cfg, s_own, prune=False, exits=False, tau=0.0, engine_kw=kw)
  assert bench['dense'].cfg == cfg and bench['engine'].cfg == s_cfg


def test_an_exits_final_without_its_plan_is_re_exported_not_retrained(trained):
  """A final/ of format 2 (before exit plans): the same train.py command exports it again with
  its plan, and trains nothing (last in this file: the module's workdir changes only there)."""
  c, workdir = trained
  final = workdir / 'final'
  meta = json.loads((final / workdir_lib.FINAL_META).read_text())
  fsio.write_json(final / workdir_lib.FINAL_META, {**meta, 'format': 2})
  (final / exit_plan.FILE).unlink()
  done = {p: p.read_text() for p in workdir.glob('*/done.json')}
  steps = (workdir / 'metrics.jsonl').read_text().count('"step"')
  trainer.run(c, workdir)
  assert json.loads((final / workdir_lib.FINAL_META).read_text())['format'] == 3
  assert workdir_lib.load(workdir).plan is not None
  assert {p: p.read_text() for p in workdir.glob('*/done.json')} == done
  assert (workdir / 'metrics.jsonl').read_text().count('"step"') == steps
  (final / exit_plan.FILE).unlink()  # a current record without its file: exported again too
  trainer.run(c, workdir)
  assert workdir_lib.load(workdir).plan is not None

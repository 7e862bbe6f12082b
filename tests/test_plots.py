"""Plots that need no trained model (mp_jax.evaluation.plots)."""

import os

from mp_jax.evaluation import plots

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def test_pareto_plot_writes_a_png_and_tolerates_missing_wallclock(tmp_path):
  points = {
      'bert': [{'accuracy': 0.90, 'flops_speedup': 1.0, 'wallclock_speedup': 1.0}],
      'ltp': [{'accuracy': 0.895, 'flops_speedup': 1.6}],  # not measured: left panel only
      'mp': [{'accuracy': 0.89, 'flops_speedup': 2.4, 'wallclock_speedup': 1.9, 'label': 'τ=0.2'},
             {'accuracy': 0.90, 'flops_speedup': 1.5, 'wallclock_speedup': 1.3, 'label': 'τ=0.1'},
             {'accuracy': 0.85, 'flops_speedup': 3.1, 'label': 'τ=0.5'}],
  }
  p = plots.pareto(points, tmp_path / 'pareto.png', 'mr: accuracy vs speed', bert_acc=0.90)
  assert p == tmp_path / 'pareto.png'
  assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 2000
  # No wall-clock speed anywhere and no bert line: still a plot, and no stray temp file.
  no_clock = {m: [{k: v for k, v in e.items() if k != 'wallclock_speedup'} for e in pts]
              for m, pts in points.items()}
  q = plots.pareto(no_clock, tmp_path / 'flops_only.png', 'flops only')
  assert q.read_bytes()[:8] == PNG_MAGIC and q.stat().st_size > 2000
  assert sorted(os.listdir(tmp_path)) == ['flops_only.png', 'pareto.png']

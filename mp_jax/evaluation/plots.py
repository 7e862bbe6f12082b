"""PNG plots of an evaluation report (matplotlib, headless)."""

import io
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from mp_jax import fsio  # noqa: E402
from mp_jax.evaluation import compare, reference  # noqa: E402


def save_png(fig, path):
  """Writes `fig` to `path` atomically (rendered in memory first); closes it."""
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format='png', dpi=110)
  plt.close(fig)
  return fsio.write_bytes(path, buf.getvalue())


def _axes():
  return plt.subplots(figsize=(5.5, 4))


def _finish(fig, ax, path, title, xlabel, ylabel, legend=True):
  """Labels, title (after the method), legend; then the PNG."""
  if xlabel:
    ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if legend:
    ax.legend()
  return save_png(fig, path)


def speed_vs_accuracy(rep, path):
  """Accuracy against FLOPs speedup and measured wall-clock speedup over the tau sweep."""
  fig, ax = _axes()
  sweep = rep['tau_sweep']
  acc = [100 * e['accuracy'] for e in sweep]
  ax.plot([e['flops_speedup'] for e in sweep], acc, 'o-', label='FLOPs speedup')
  if all('wallclock_speedup' in e for e in sweep):
    ax.plot([e['wallclock_speedup'] for e in sweep], acc, 's--', label='wall-clock speedup')
  for e, a in zip(sweep, acc):
    ax.annotate(f'τ={e["tau"]:g}', (e['flops_speedup'], a), fontsize=7,
                textcoords='offset points', xytext=(3, 3))
  ax.grid(alpha=0.3)
  return _finish(fig, ax, path, f'{rep["method"]}: speed vs accuracy',
                 'speedup over dense (x)', 'accuracy (%)')


def speedup_by_length(rep, path):
  """FLOPs and wall-clock speedup per input-length group (paper Figure 1)."""
  by = rep['by_length_bucket']
  groups = list(by)
  fig, ax = _axes()
  x = range(len(groups))
  ax.bar([i - 0.2 for i in x], [by[g]['flops_speedup'] for g in groups], 0.4, label='FLOPs')
  if groups and 'wallclock_speedup' in by[groups[0]]:
    ax.bar([i + 0.2 for i in x], [by[g]['wallclock_speedup'] for g in groups], 0.4,
           label='wall-clock')
  labels = reference.group_labels(rep['length_group_edges'])
  ax.set_xticks(list(x), [f'{labels[g]}\n(n={by[g]["num_examples"]})' for g in groups])
  ax.axhline(1.0, color='k', lw=0.8)
  return _finish(fig, ax, path, f'{rep["method"]}: speedup by input length', None,
                 'speedup (x)')


def tokens_kept(rep, path):
  """Mean tokens kept after each layer (the pyramid)."""
  kept = rep['tokens_kept_per_layer']
  fig, ax = _axes()
  ax.plot(range(1, len(kept) + 1), kept, 'o-', label='kept after layer')
  ax.axhline(rep['tokens_in_mean'], color='k', ls=':', label='input (dense)')
  ax.set_ylim(bottom=0)
  return _finish(fig, ax, path, f'{rep["method"]}: tokens kept per layer', 'layer',
                 'tokens per example (mean)')


def exit_histogram(rep, path):
  """How many examples exit at each layer at the report's tau."""
  hist = rep['exit_layer_histogram']
  fig, ax = _axes()
  ax.bar(range(1, len(hist) + 1), hist)
  return _finish(fig, ax, path, f'{rep["method"]}: exit layers at τ={rep["tau"]:g}',
                 'exit layer', 'examples', legend=False)


def pareto(points_by_method, path, title, bert_acc=None):
  """Accuracy vs FLOPs speedup (left) and vs measured speedup (right), with the Pareto front.

  points_by_method: {method: [{'accuracy', 'flops_speedup', 'wallclock_speedup' (optional),
  'label' (optional)}]}; a point without wallclock_speedup is left out of the right panel.
  """
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, key, xlabel in zip(axes, ('flops_speedup', 'wallclock_speedup'),
                             ('FLOPs speedup over dense (x)', 'measured speedup over dense (x)')):
    every = []
    for i, (method, points) in enumerate(points_by_method.items()):
      pts = sorted((p for p in points if p.get(key) is not None), key=lambda p: p[key])
      if not pts:
        continue
      every += pts
      ax.plot([p[key] for p in pts], [100 * p['accuracy'] for p in pts], 'o-', color=f'C{i}',
              label=method)  # a method keeps its colour in both panels
      for p in pts:
        if p.get('label') is not None:
          ax.annotate(str(p['label']), (p[key], 100 * p['accuracy']), fontsize=7,
                      textcoords='offset points', xytext=(3, 3))
    if every:
      front = [every[i] for i in compare.pareto([(p['accuracy'], p[key]) for p in every])]
      # 'pre': at speedup x the front's height is the best accuracy reached at x or faster.
      ax.step([p[key] for p in front], [100 * p['accuracy'] for p in front], where='pre',
              color='grey', lw=2, alpha=0.5, zorder=0, label='Pareto front')
    else:
      ax.text(0.5, 0.5, 'not measured', transform=ax.transAxes, ha='center', color='grey')
    if bert_acc is not None:
      ax.axhline(100 * bert_acc, color='k', ls='--', lw=0.8, label='bert accuracy')
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  axes[0].set_ylabel('accuracy (%)')
  fig.suptitle(title)
  return save_png(fig, path)


def all_plots(rep, outdir):
  """Every plot of a report, as PNGs in `outdir`."""
  outdir = pathlib.Path(outdir)
  return [speed_vs_accuracy(rep, outdir / 'speed_vs_accuracy.png'),
          speedup_by_length(rep, outdir / 'speedup_by_length.png'),
          tokens_kept(rep, outdir / 'tokens_kept.png'),
          exit_histogram(rep, outdir / 'exit_histogram.png')]

"""Paper-layout tables (Table 3, Table 4) and Figure 1 from the per-method reports."""

import pathlib
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from mp_jax import fsio, methods
from mp_jax.evaluation import plots, reference

START, END = '<!-- generated:start -->', '<!-- generated:end -->'
# Methods with exits (a tau to sweep), and the compressing ones (Figure 1 compares them).
EXITING = tuple(m for m in methods.METHODS if methods.has_exits(m))
COMPRESSING = tuple(m for m in methods.METHODS if methods.eval_modes(m) != ('none', False))
PAPER_T3 = (  # He et al. 2021, Table 3, BERT-base: (accuracy, GFLOPs, speedup)
    ('BERT', {'AG news': (94.3, 9.0, 1.00), 'Yelp': (95.8, 17.2, 1.00)}),
    ('LTP', {'AG news': (94.3, 5.3, 1.72), 'Yelp': (94.7, 7.4, 2.32)}),
    ('FastBERT', {'AG news': (94.3, 2.3, 3.97), 'Yelp': (94.8, 2.8, 6.18)}),
    ('MP', {'AG news': (94.3, 1.8, 4.95), 'Yelp': (94.5, 2.1, 8.25)}),
)
PAPER_T4 = {'FastBERT': ((3.97, 10.30, 11.95), (3.15, 6.18, 8.84)),
            'MP': ((4.95, 10.53, 11.95), (5.35, 8.25, 10.10))}  # AG news, Yelp at tau .1 .5 .8


def _x(v):
  return f'{v:.2f}x'


def table3(task, reps):
  lines = [f'### {task}', '',
           '| method | accuracy | GFLOPs / example (FLOPs speedup) | wall-clock speedup | '
           'examples/s (dense) | tau | engine = reference |', '|---|---|---|---|---|---|---|']
  for name, r in reps.items():
    agree = r['engine_agreement']
    lines.append(
        f'| {name} | {100 * r["accuracy"]:.1f} | {r["gflops_per_example"]:.3f} '
        f'({_x(r["flops_speedup"])}) | **{_x(r["wallclock_speedup"])}** | '
        f'{r["examples_per_s"]:.0f} ({r["dense_examples_per_s"]:.0f}) | {r["tau"]:g} | '
        f'{agree["labels"] == 1 and agree["exit_layers"] == 1} |')
  return '\n'.join(lines) + '\n'


def table4(task, reps):
  taus = sorted({e['tau'] for m in EXITING if m in reps
                 for e in reps[m]['tau_sweep']})
  lines = [f'### {task}: FLOPs speedup / wall-clock speedup / accuracy by tau', '',
           '| method | ' + ' | '.join(f'τ={t:g}' for t in taus) + ' |',
           '|---' * (len(taus) + 1) + '|']
  for m in EXITING:
    if m not in reps:
      continue
    by_tau = {e['tau']: e for e in reps[m]['tau_sweep']}
    cells = [f'{_x(by_tau[t]["flops_speedup"])} / {_x(by_tau[t]["wallclock_speedup"])} / '
             f'{100 * by_tau[t]["accuracy"]:.1f}' if t in by_tau else '-' for t in taus]
    lines.append(f'| {m} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def figure1(task, reps, path):
  """Speedup by input-length group per method (FLOPs solid, wall-clock hatched)."""
  groups = reference.GROUPS
  names = [m for m in COMPRESSING if m in reps]
  labels = reference.group_labels(next(iter(reps.values()))['length_group_edges'])
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, key, title in ((axes[0], 'flops_speedup', 'FLOPs speedup'),
                         (axes[1], 'wallclock_speedup', 'measured wall-clock speedup')):
    width = 0.8 / max(len(names), 1)
    for i, m in enumerate(names):
      by = reps[m]['by_length_bucket']
      xs = [g for g in range(3) if groups[g] in by]
      ax.bar([x + i * width for x in xs], [by[groups[x]][key] for x in xs], width, label=m)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(3)],
                  [labels[g] for g in groups])
    ax.axhline(1.0, color='k', lw=0.8)
    ax.set_title(f'{task}: {title}')
    ax.legend()
  axes[0].set_ylabel('speedup over dense BERT (x)')
  return plots.save_png(fig, path)


def ltp_curve(reps):
  rows = [(k, r) for k, r in reps.items() if k == 'ltp' or k.startswith('ltp@')]
  if len(rows) < 2:
    return ''
  lines = ['| LTP run | accuracy | FLOPs speedup | wall-clock speedup | tokens kept after last '
           'layer / input |', '|---|---|---|---|---|']
  for k, r in rows:
    kept = r['tokens_kept_per_layer'][-1] / max(r['tokens_in_mean'], 1e-9)
    lines.append(f'| {k} | {100 * r["accuracy"]:.1f} | {_x(r["flops_speedup"])} | '
                 f'{_x(r["wallclock_speedup"])} | {kept:.2f} |')
  return '\n'.join(lines) + '\n'


def results_markdown(results, out, timings, machine, wall, *, smoke, command, docs='docs'):
  """The generated block of docs/RESULTS.md (kept between markers; hand-written text survives)."""
  figdir = pathlib.Path(docs) / 'figures'
  parts = [START, '', f'Generated {time.strftime("%Y-%m-%d %H:%M")} by `{command}` on {machine}; '
           f'total wall time {wall / 60:.1f} min{" (SMOKE: tiny random model)" if smoke else ""}.',
           '', '## Table 3 layout: accuracy and cost (test split)', '']
  for task, reps in results.items():
    parts.append(table3(task, {k: reps[k] for k in methods.METHODS if k in reps}))
  parts += ['Paper (BERT-base, 12 layers) for orientation:', '',
            '| method | AG news acc | GFLOPs (speedup) | Yelp acc | GFLOPs (speedup) |',
            '|---|---|---|---|---|']
  for name, d in PAPER_T3:
    a, y = d['AG news'], d['Yelp']
    parts.append(f'| {name} | {a[0]} | {a[1]} ({a[2]:.2f}x) | {y[0]} | {y[1]} ({y[2]:.2f}x) |')
  parts += ['', '## Table 4 layout: speed by halt value tau', '']
  for task, reps in results.items():
    parts.append(table4(task, reps))
  parts += ['Paper, FLOPs speedup at τ = 0.1 / 0.5 / 0.8: '
            + '; '.join(f'{m} AG news {a}, Yelp {y}' for m, (a, y) in PAPER_T4.items()), '',
            '## Figure 1 layout: speedup by input length', '']
  for task, reps in results.items():
    p = figure1(task, reps, figdir / f'{task}_figure1.png')
    parts.append(f'![{task} figure 1](figures/{p.name})')
    for m in ('mp',):
      if m in reps:
        for png in sorted((pathlib.Path(out) / task / m / 'eval').glob('*.png')):
          fsio.write_bytes(figdir / f'{task}_{m}_{png.name}', png.read_bytes())
          parts.append(f'![{task} {m} {png.stem}](figures/{task}_{m}_{png.name})')
    parts.append('')
  for task, reps in results.items():
    curve = ltp_curve(reps)
    if curve:
      parts += [f'## LTP trade-off on {task} (final_threshold)', '', curve]
  parts += ['## Wall time per step of the command', '', '| step | minutes |', '|---|---|']
  parts += [f'| {k} | {v / 60:.1f} |' for k, v in timings.items()]
  parts += ['', END]
  return '\n'.join(parts) + '\n'


def splice(existing, block):
  """Replace the generated block inside an existing RESULTS.md (or start a new one)."""
  if START in existing and END in existing:
    return existing[:existing.index(START)] + block.strip() + existing[
        existing.index(END) + len(END):]
  return (existing.rstrip() + '\n\n' if existing.strip() else '# Results\n\n') + block

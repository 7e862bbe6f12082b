"""Paper-layout tables (Table 3 per selection rule, Table 4), Figure 1, the Pareto plot, the
search table and the goal check, from experiments/run.py's per-task results."""

import pathlib
import time

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt

from experiments import selection
from mp_jax import fsio, methods
from mp_jax.evaluation import compare, plots, reference

START, END = '<!-- generated:start -->', '<!-- generated:end -->'
# Every method but bert (Figure 1 compares their speedups by length, all over bert's dense model).
COMPRESSING = tuple(m for m in methods.METHODS if m != 'bert')
# One axis only (ltp: length, fastbert: depth; costeff cuts depth and width): mp's comparators.
SINGLE_AXIS = tuple(m for m in methods.METHODS if len(methods.axes(m)) == 1)
GOAL_RULE = 'bert-1'
# The goals, each on the bert-1 rule's test rows: (method, whom it is compared with, the largest
# GFLOPs ratio to the best of them that meets the goal). Issue 18: mp at <= 0.8x the best single
# axis; issue 14: pyramid below every other method (< 1x).
GOALS = (('mp', 'single-axis', SINGLE_AXIS, 0.8, True),
         ('pyramid', 'other', tuple(m for m in methods.METHODS if m not in ('bert', 'pyramid')),
          1.0, False))
WIDTH = ('costeff', 'pyramid')  # the methods with a width stage (width_table)
CLOCK_GOAL = 0.95  # issue 14: costeff at tau 0 keeps >= this much of its FLOPs speedup measured
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


def _pts(x):
  return f'{100 * x:+.1f}'


def _delta(d):
  """'+0.3 [-1.2, +1.8]': a difference and its 95% interval, in points."""
  return f'{_pts(d["diff"])} [{_pts(d["lo"])}, {_pts(d["hi"])}]'


def rule_table(task, rule, sel, reps):
  """Table 3 layout for one rule: each method at the tau that rule chose on dev, judged on test."""
  lines = [f'### {task}', '',
           '| method | τ | test accuracy | Δ vs bert [95% CI] | dev Δ [95% CI] | '
           'FLOPs speedup (GFLOPs / example) | measured speedup | engine = reference | '
           'rule met on dev |', '|---|---|---|---|---|---|---|---|---|']
  for name, rules in sel.items():
    s, r = rules[rule], reps[name]
    t, agree = s['test'], r['engine_agreement']
    exits = methods.has_exits(r['method'])
    wall = '-' if t['wallclock_speedup'] is None else _x(t['wallclock_speedup'])
    base, tau = name == 'bert', f'{s["tau"]:g}' if exits else '- (no exits)'
    lines.append(
        f'| {name} | {tau} | {100 * t["accuracy"]:.1f} | '
        f'{"-" if base else _delta(t)} | {"-" if base else _delta(s["dev"])} | '
        f'{_x(t["flops_speedup"])} ({t["gflops_per_example"]:.3f}) | {wall} | '
        f'{agree["labels"] == 1 and agree["exit_layers"] == 1} | '
        f'{"yes" if s["qualified"] else "**no**"} |')
  notes = ['', 'Δ: accuracy minus bert\'s on the same examples, in points, with a paired-bootstrap '
           '95% interval (10,000 resamples). "rule met on dev" **no**: no τ reached the rule\'s '
           'floor on dev (an exit method then runs at its smallest τ). engine = reference is '
           'checked at the report\'s τ (the bert-1 choice). Measured speedup: the engine against '
           'the unpruned model\'s dense compiled program (bert\'s, also for static), timed '
           'interleaved on the same rows (SPEC §5); "-": not measured.']
  return '\n'.join(lines + notes) + '\n'


def goal_check(task, sel, reps):
  """'Goal check' lines (GOALS): each mp / pyramid row's test GFLOPs against the best comparator.

  A comparator row (e.g. ltp, fastbert, the searched ltp) counts when its bert-1 choice is within
  1 point of bert on dev.
  """
  rule, lines = GOAL_RULE, []
  for method, kind, against, limit, inclusive in GOALS:
    ok = [n for n in sel if reps[n]['method'] in against and sel[n][rule]['qualified']]
    for name in [n for n in sel if reps[n]['method'] == method]:  # e.g. mp and mp (searched)
      s = sel[name][rule]
      t = s['test']
      head = f'**Goal check** ({task}, {name}, rule `{rule}`)'
      if not ok:
        lines.append(f'{head}: no {kind} method ({", ".join(against)}) is within 1 point of '
                     f'bert on dev; {name} runs at {_x(t["flops_speedup"])} FLOPs speedup, test '
                     f'Δ {_delta(t)}.')
        continue
      best = min(ok, key=lambda m: sel[m][rule]['test']['gflops_per_example'])
      b = sel[best][rule]['test']
      ratio = t['gflops_per_example'] / b['gflops_per_example']
      met = (ratio <= limit if inclusive else ratio < limit) and s['qualified']
      why = '' if s['qualified'] else f'; {name} met the rule at no τ on dev'
      lines.append(
          f'{head}: {name} needs **{ratio:.2f}x** the FLOPs of the best {kind} method, '
          f'{best} ({_x(t["flops_speedup"])} vs {_x(b["flops_speedup"])} FLOPs speedup): goal '
          f'{"<=" if inclusive else "<"} {limit:.2f}x **{"met" if met else "missed"}**{why}. '
          f'Test Δ vs bert: {name} {_delta(t)}, {best} {_delta(b)}.')
  return '\n\n'.join(lines) + '\n' if lines else ''


def width_table(task, sel, reps):
  """Width rows: parameters, the bert-1 choice, and tau 0 (width alone) with its clock ratio.

  Plus the clock goal line of each costeff row: measured / FLOPs speedup at tau 0 >= CLOCK_GOAL
  (batch = the report's largest batch bucket, against the unpruned model's dense program).
  """
  names = [n for n in sel if reps[n]['method'] in WIDTH]
  if not names:
    return ''
  bert = reps['bert']
  lines = [f'### {task}', '', '| method | parameters (vs unpruned) | τ (bert-1) | test accuracy '
           '| FLOPs speedup | measured | at τ 0: accuracy | FLOPs speedup | measured | kept on the '
           'clock |', '|---' * 10 + '|']
  goals = []
  for name in names:
    r, t = reps[name], sel[name][GOAL_RULE]
    p = (f'{r["params"] / 1e6:.1f}M ({r["params"] / r["dense_params"]:.2f})'
         if 'params' in r else '-')
    e0 = next(e for e in r['tau_sweep'] if e['tau'] == 0.0)
    s0 = selection.speeds(r, e0, bert)
    w0 = s0['wallclock_speedup']
    kept = None if w0 is None else w0 / s0['flops_speedup']
    tw = t['test']['wallclock_speedup']
    lines.append(
        f'| {name} | {p} | {t["tau"]:g} | {100 * t["test"]["accuracy"]:.1f} | '
        f'{_x(t["test"]["flops_speedup"])} | {"-" if tw is None else _x(tw)} | '
        f'{100 * e0["accuracy"]:.1f} | {_x(s0["flops_speedup"])} | '
        f'{"-" if w0 is None else _x(w0)} | {"-" if kept is None else f"{kept:.2f}"} |')
    if r['method'] == 'costeff':
      met = 'not measured' if kept is None else (
          f'**{kept:.2f}**: **{"met" if kept >= CLOCK_GOAL else "missed"}**')
      goals.append(f'**Clock goal** ({task}, {name}, τ 0, batch {r.get("batch_size", "-")}): '
                   f'measured / FLOPs speedup >= {CLOCK_GOAL} — {met}.')
  notes = ['', 'Parameters: embeddings, layers, pooler and classifier (exit heads not counted), '
           'and their fraction of the unpruned model\'s. τ 0: no exit fires (width and, for '
           'pyramid, token pruning alone). Measured: the engine against the unpruned model\'s '
           'dense compiled program, interleaved, same rows.', '', *goals]
  return '\n'.join(lines + notes) + '\n'


def pareto_points(sel, reps):
  """{name: points} for plots.pareto: an exit method's test tau sweep, others' one point."""
  bert = reps['bert']
  out = {}
  for name in sel:
    r = reps[name]
    exits = methods.has_exits(r['method'])
    entries = r['tau_sweep'] if exits else [e for e in r['tau_sweep'] if e['tau'] == 0.0]
    pts = []
    for e in entries:
      sp = selection.speeds(r, e, bert)
      pts.append({'accuracy': e['accuracy'], 'flops_speedup': sp['flops_speedup'],
                  'wallclock_speedup': sp['wallclock_speedup'],
                  'label': f'τ={e["tau"]:g}' if exits else None})
    out[name] = pts
  return out


def search_table(task, rec):
  """The search's trials on dev and the chosen one."""
  keys = list(rec['base'])
  lines = [f'### {task}: {len(rec["trials"])} trials (budget {rec["budget"]}), rule '
           f'`{rec["rule"]}` ({rec["rule_text"]}; bert dev accuracy '
           f'{100 * rec["bert_dev_accuracy"]:.1f})', '',
           '| trial | ' + ' | '.join(keys) + ' | dev accuracy | dev FLOPs speedup | chosen |',
           '|---' * (len(keys) + 4) + '|']
  for i, t in enumerate(rec['trials'], 1):
    mark = ''
    if t['name'] == rec['chosen']:
      mark = '**yes**' if rec['qualified'] else '**yes** (none within 1 point: most accurate)'
    lines.append(f'| {i} `{t["name"]}` | ' + ' | '.join(f'{t["settings"][k]:g}' for k in keys)
                 + f' | {100 * t["dev"]["accuracy"]:.1f} | {_x(t["dev"]["flops_speedup"])} | '
                 f'{mark} |')
  return '\n'.join(lines) + '\n'


def table4(task, reps):
  exiting = [k for k, r in reps.items() if methods.has_exits(r['method'])]
  taus = sorted({e['tau'] for m in exiting for e in reps[m]['tau_sweep']})
  lines = [f'### {task}: FLOPs speedup / wall-clock speedup / accuracy by tau', '',
           '| method | ' + ' | '.join(f'τ={t:g}' for t in taus) + ' |',
           '|---' * (len(taus) + 1) + '|']
  for m in exiting:
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
  """The generated block of docs/RESULTS.md (kept between markers; hand-written text survives).

  results: {task: experiments/run.py run_task's {'reports', 'selection', 'search'}}.
  """
  figdir = pathlib.Path(docs) / 'figures'
  parts = [START, '', f'Generated {time.strftime("%Y-%m-%d %H:%M")} by `{command}` on {machine}; '
           f'total wall time {wall / 60:.1f} min{" (SMOKE: tiny random model)" if smoke else ""}.',
           '', 'Each exit method\'s τ is chosen on dev by each rule (the largest dev FLOPs speedup '
           'whose dev accuracy reaches the rule\'s floor) and judged on test; methods without '
           'exits run at τ 0 in both tables. FLOPs speedups are over bert\'s dense model.', '']
  for rule, text in compare.RULES.items():
    parts += [f'## Table 3 layout, rule `{rule}`: τ {text} (test split)', '']
    for task, res in results.items():
      parts.append(rule_table(task, rule, res['selection'], res['reports']))
  parts += ['## Goal check: mp against the best single-axis method, pyramid against every other',
            '']
  for task, res in results.items():
    parts.append(goal_check(task, res['selection'], res['reports']))
  width = [width_table(task, res['selection'], res['reports']) for task, res in results.items()]
  if any(width):
    parts += ['## Width: costeff and pyramid', '', *filter(None, width)]
  parts += ['Paper (BERT-base, 12 layers) for orientation:', '',
            '| method | AG news acc | GFLOPs (speedup) | Yelp acc | GFLOPs (speedup) |',
            '|---|---|---|---|---|']
  for name, d in PAPER_T3:
    a, y = d['AG news'], d['Yelp']
    parts.append(f'| {name} | {a[0]} | {a[1]} ({a[2]:.2f}x) | {y[0]} | {y[1]} ({y[2]:.2f}x) |')
  parts += ['', '## Pareto: accuracy against FLOPs and measured speedup (test split)', '']
  for task, res in results.items():
    p = plots.pareto(pareto_points(res['selection'], res['reports']),
                     figdir / f'{task}_pareto.png', f'{task}: test accuracy vs speedup',
                     bert_acc=res['reports']['bert']['accuracy'])
    parts += [f'![{task} Pareto](figures/{p.name})', '']
  searched = {t: res['search'] for t, res in results.items() if res.get('search')}
  if searched:
    parts += ['## Search on dev: target_token_keep, temperature, mask_lambda '
              '(experiments/search.py)', '']
    parts += [search_table(task, rec) for task, rec in searched.items()]
  parts += ['## Table 4 layout: speed by halt value tau', '']
  for task, res in results.items():
    parts.append(table4(task, res['reports']))
  parts += ['Paper, FLOPs speedup at τ = 0.1 / 0.5 / 0.8: '
            + '; '.join(f'{m} AG news {a}, Yelp {y}' for m, (a, y) in PAPER_T4.items()), '',
            '## Figure 1 layout: speedup by input length', '']
  for task, res in results.items():
    reps = res['reports']
    p = figure1(task, reps, figdir / f'{task}_figure1.png')
    parts.append(f'![{task} figure 1](figures/{p.name})')
    for m in ('mp',):
      if m in reps:
        for png in sorted((pathlib.Path(out) / task / m / 'eval').glob('*.png')):
          fsio.write_bytes(figdir / f'{task}_{m}_{png.name}', png.read_bytes())
          parts.append(f'![{task} {m} {png.stem}](figures/{task}_{m}_{png.name})')
    parts.append('')
  for task, res in results.items():
    curve = ltp_curve(res['reports'])
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

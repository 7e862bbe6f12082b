"""Two serving grids on one task's trained models, in one process, interleaved.

  python experiments/grid.py --task=mr --out=runs/grid_mr.json   # 8 apart vs the CPU grid
  python experiments/grid.py --task=mr --out=/tmp/g.json --methods=ltp \
      --old=$(python -c 'from mp_jax.serving import shapes; print(*shapes.CPU_LENGTHS, sep=",")') \
      --new_chunk_tokens=512                         # the engines' row chunks, same lengths
  python experiments/grid.py --task=bbc --out=/tmp/g.json --methods=ltp,fastbert,mp \
      --old=<the same> --new_schedule_max_length=256  # layer-major up to 256 tokens

For --methods (bert: the dense program) of --runs/<task> (experiments/run.py's models, tau as
experiments/clock.py picks it): every engine and the unpruned dense baseline under --new
(default: the CPU serving grid) and under --old (default: the CPU training grid, 8 apart to 64),
the engines with --*_chunk_tokens row chunks (and layer-major groups of up to that many tokens)
and requests of up to --*_schedule_max_length tokens layer-major, if set (the dense keeps the
grid's), on the eval split at batch 32:
  warm-up      with --warmup: seconds to compile every program the engine can use
               (Engine.warmup, persistent cache off), and how many there are
  shapes       the dense engine's padded MACs / the engine's (mp_jax.serving.work), per grid
  batch 32     median seconds of one predict over the split, all 2 x (methods + 1) contenders
               timed interleaved (--repeats rounds); speedups are over each grid's own dense
A benchmark: never run it beside another training or benchmark.
"""

import pathlib
import sys

from absl import flags, logging

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import clock as clock_script
from experiments import warmup as warmup_script
from mp_jax import cli, fsio, methods
from mp_jax.data import batching, loading
from mp_jax.evaluation import clock, reference, report, timing
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import shapes

F = {}


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  # Compile seconds are measured only without persistent-cache hits.
  out_cache = warmup_script.disable_compilation_cache() if F['warmup'].value else None
  names = F['methods'].value
  subj, _, tok = clock_script.subjects(F['task'].value, False, F['runs'].value, names, None)
  c0, cfg0 = next(iter(subj.values()))[:2]
  ds = loading.load_task(c0.data)
  enc = batching.encode(tok, ds[report.eval_split(c0, ds)], cfg0.max_seq_length)
  rows = list(zip(enc.ids, enc.type_ids))
  old = tuple(int(x) for x in F['old'].value)
  new = tuple(int(x) for x in F['new'].value)
  calls, engines, denses = {}, {}, {}
  out = {'command': ' '.join(sys.argv), 'num_examples': len(rows), 'methods': {},
         'cache': out_cache}
  for m, (c, cfg, params, tau, plan) in subj.items():
    pruning, exits = methods.eval_modes(m)
    tau = tau if exits else 0.0
    shared = engine_lib.prepare(cfg, params)
    res = reference.run(params, cfg, enc, pruning=pruning, exits=exits, batch_size=32,
                        length_buckets=old)
    fl = reference.metrics(res, cfg, tau, plan=plan)[0]['flops_speedup']
    rec = out['methods'][m] = {'tau': tau, 'flops_speedup': fl}
    for name, lengths in (('new', new), ('old', old)):
      grid = shapes.for_model(shapes.resolve(dict(c.eval, length_buckets=lengths)),
                              cfg.max_seq_length)
      kw = grid.engine_kw()
      # The engines' own row chunks and layer-major cut; the dense keeps the grid's.
      chunk, sched = (F[f'{name}_{k}'].value for k in ('chunk_tokens', 'schedule_max_length'))
      eng = engine_lib.Engine(cfg, shared, prune=pruning == 'hard', exits=exits, tau=tau,
                              plan=plan, **dict(kw, chunk_tokens=kw['chunk_tokens']
                                                if chunk is None else chunk,
                                                schedule_max_length=kw['schedule_max_length']
                                                if sched is None else sched))
      if name not in denses:  # one dense baseline per grid (its time ignores the weights)
        denses[name] = engine_lib.unpruned_dense(cfg, shared, **kw)
        calls[f'dense {name}'] = lambda e=denses[name]: e.predict(rows)
      dense = denses[name]
      warm = timing.seconds(eng.warmup) if F['warmup'].value else None
      rec[name] = {'lengths': list(grid.length_buckets), 'chunk_tokens': eng.chunk_tokens,
                   'schedule_max_length': eng.schedule.lbs[-1] if eng.schedule else 0,
                   'warmup_s': warm,
                   'shape_speedup': clock.shape_speedups(cfg, res, dense)(eng, tau)}
      calls[f'{m} {name}'] = lambda e=eng: e.predict(rows)
      logging.info('%s %s: warm-up %s s', m, name, warm)
      engines[f'{m} {name}'] = eng
  t = timing.interleaved(calls, F['repeats'].value, warmup=True)
  out['seconds'] = t
  out['memory_maps'] = timing.process_state()['memory_maps']
  for key, eng in engines.items():  # with --warmup: all it can use; else what the calls used
    m, name = key.split()
    out['methods'][m][name]['programs'] = eng.num_compiles
  lines = ['| method | FLOPs speedup | grid | warm-up s | programs | shapes allow | batch 32 | '
           'kept |', '|---' * 8 + '|']
  for m, rec in out['methods'].items():
    for name in ('old', 'new'):
      r = rec[name]
      r['batch32'] = t[f'dense {name}'] / t[f'{m} {name}']
      warm = '-' if r['warmup_s'] is None else f'{r["warmup_s"]:.1f}'
      lines.append(f'| {m} | {rec["flops_speedup"]:.2f}x | {name} | {warm} | '
                   f'{r["programs"]} | {r["shape_speedup"]:.2f}x | {r["batch32"]:.2f}x | '
                   f'{r["batch32"] / rec["flops_speedup"]:.2f} |')
  out['dense_new_over_old'] = t['dense old'] / t['dense new']
  lines.append(f'\nDense program, new grid over old: {out["dense_new_over_old"]:.3f}x '
               f'({t["dense old"]:.3f} s -> {t["dense new"]:.3f} s per pass over '
               f'{len(rows)} rows); memory maps of the process: {out["memory_maps"]}')
  fsio.write_json(pathlib.Path(F['out'].value), out, indent=2)
  print('\n'.join(lines))


if __name__ == '__main__':
  F.update(
      task=flags.DEFINE_string('task', 'mr', 'Task config in configs/.'),
      runs=flags.DEFINE_string('runs', 'runs/paper', 'experiments/run.py --out of the models.'),
      out=flags.DEFINE_string('out', None, 'JSON output file.'),
      old=flags.DEFINE_list('old', [str(x) for x in shapes.CPU_TRAIN_LENGTHS],
                            'One grid (default: the CPU training grid).'),
      new=flags.DEFINE_list('new', [str(x) for x in shapes.CPU_LENGTHS],
                            'The other (default: the CPU serving grid).'),
      methods=flags.DEFINE_list('methods', ['bert', 'ltp', 'fastbert', 'mp'], 'Methods.'),
      old_chunk_tokens=flags.DEFINE_integer('old_chunk_tokens', None,
                                            "--old's engines' row chunks (default: the grid's)."),
      new_chunk_tokens=flags.DEFINE_integer('new_chunk_tokens', None,
                                            "--new's engines' row chunks (default: the grid's)."),
      old_schedule_max_length=flags.DEFINE_integer(
          'old_schedule_max_length', None, "--old's engines: requests of at most this many tokens "
          'run layer-major (default: the grid\'s; 0: never).'),
      new_schedule_max_length=flags.DEFINE_integer(
          'new_schedule_max_length', None, "--new's engines: the same for --new."),
      repeats=flags.DEFINE_integer('repeats', 5, 'Interleaved rounds.'),
      warmup=flags.DEFINE_bool('warmup', False, 'Also time a full warm-up of every engine.'))
  flags.mark_flag_as_required('out')
  cli.run(main)

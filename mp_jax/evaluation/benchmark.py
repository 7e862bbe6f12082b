"""Wall-clock benchmark: compiled engine vs dense compiled JAX vs HF PyTorch, same weights/data.

Throughput at a serving batch size and latency at batch 1; warm-up excluded; repeats
interleaved across the contenders (so machine drift hits all alike); medians and ratios.
"""

import os
import pathlib

import jax
import numpy as np

from mp_jax import fsio, methods
from mp_jax import workdir as workdir_lib
from mp_jax.data import batching, loading
from mp_jax.evaluation import reference, report, timing
from mp_jax.model import exit_plan
from mp_jax.serving import engine as engine_lib
from mp_jax.serving import shapes, workers


class TorchRunner:
  """HF PyTorch BertForSequenceClassification on the exported `final/` weights (fp32)."""

  def __init__(self, final_dir, threads=None):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.set_num_threads(threads or os.cpu_count())
    self.model = transformers.BertForSequenceClassification.from_pretrained(final_dir).eval()

  def predict(self, rows, batch_size):
    """Length-sorted batches padded to their own longest row (HF's usual dynamic padding)."""
    order = np.argsort([-len(r[0]) for r in rows], kind='stable')
    labels = np.zeros(len(rows), np.int64)
    with self.torch.inference_mode():
      for s in range(0, len(rows), batch_size):
        idx = order[s:s + batch_size]
        t = max(len(rows[i][0]) for i in idx)
        ids = np.zeros((len(idx), t), np.int64)
        types, mask = np.zeros_like(ids), np.zeros_like(ids)
        for j, i in enumerate(idx):
          n = len(rows[i][0])
          ids[j, :n], types[j, :n], mask[j, :n] = rows[i][0], rows[i][1], 1
        out = self.model(input_ids=self.torch.from_numpy(ids),
                         token_type_ids=self.torch.from_numpy(types),
                         attention_mask=self.torch.from_numpy(mask)).logits
        labels[idx] = out.argmax(-1).numpy()
    return labels


def _throughput(calls, rows, repeats, warmup=False):
  """Examples/s of each calls[name](rows): repeats interleaved across the calls, median time."""
  t = timing.interleaved({k: (lambda fn=fn: fn(rows)) for k, fn in calls.items()}, repeats,
                         warmup=warmup)
  return {k: len(rows) / v for k, v in t.items()}


def _workers_throughput(rows, *, n, batch_size, repeats, build_kw):
  """Examples/s of engine and dense served by n single-threaded per-core worker processes."""
  cores = sorted(os.sched_getaffinity(0))
  cores = [cores[i % len(cores)] for i in range(n)]
  with workers.WorkerPool(workers.build_engines, build_kw, cores=cores, block=batch_size) as pool:
    calls = {k: (lambda r, k=k: pool.predict(k, r)) for k in pool.names}
    # Warm-up compiles every program these rows need, in each worker.
    return _throughput(calls, rows, repeats, warmup=True)


def run(config, workdir, *, batch_size=32, repeats=5, latency_rows=64, torch=True, seed=0,
        num_workers=1):
  """Measures and returns the bench dict (also written to <workdir>/bench/bench.json).

  num_workers > 1 also times engine and dense served by that many per-core worker processes
  (mp_jax.serving.workers), each single-threaded, at the same batch size.
  """
  _, cfg, params, tok, names, plan = workdir_lib.load(workdir)
  cfg = cfg.replace(dtype=config.model.dtype)  # as report.build: the config says how to run
  plan = exit_plan.for_eval(plan, config.eval)
  ds = loading.load_task(config.data)
  report.check_labels(names, ds, config, workdir)
  split = report.eval_split(config, ds)
  enc = batching.encode(tok, ds[split], cfg.max_seq_length)
  rows = list(zip(enc.ids, enc.type_ids))
  pruning, exits = methods.eval_modes(config.method)
  tau = float(config.eval.tau) if exits else 0.0
  # None keys: this platform's serving defaults; batch buckets the platform's (as the Predictor's),
  # cut to --batch_size.
  grid = shapes.for_model(shapes.resolve(dict(config.eval, batch_buckets=None)),
                          cfg.max_seq_length, batch_size)
  build_kw = dict(cfg=cfg, params=params, prune=pruning == 'hard', exits=exits, tau=tau,
                  plan=plan, engine_kw=grid.engine_kw())
  # In process, both engines share one device copy of the params (workers build their own).
  runners = workers.build_engines(**dict(build_kw, params=engine_lib.prepare(cfg, params)))
  calls = {k: (lambda r, e=e: e.predict(r)) for k, e in runners.items()}
  if torch:
    try:
      tr = TorchRunner(workdir_lib.final_dir(workdir))
      calls['torch'] = lambda r: tr.predict(r, batch_size)
    except ImportError:
      torch = False
  rng = np.random.default_rng(seed)
  single = [rows[i] for i in rng.choice(len(rows), min(latency_rows, len(rows)), replace=False)]
  for fn in calls.values():  # warm-up: every program these rows need is compiled here
    fn(rows)
    for r in single:
      fn([r])
  tp = _throughput(calls, rows, repeats)
  lat = {k: [] for k in calls}
  for r in single:
    for k, fn in calls.items():
      lat[k].append(1e3 * timing.seconds(lambda fn=fn, r=r: fn([r])))
  n = len(rows)
  out = {
      'method': config.method, 'dtype': cfg.dtype, 'split': split, 'num_examples': n, 'tau': tau,
      'batch_size': batch_size, 'repeats': repeats, 'latency_rows': len(single),
      'mean_tokens': float(enc.lengths.mean()),
      'throughput_examples_per_s': tp,
      'latency_ms': {k: {'p50': float(np.percentile(v, 50)), 'p95': float(np.percentile(v, 95))}
                     for k, v in lat.items()},
  }
  lt = out['latency_ms']
  out['ratios'] = {'engine_vs_dense_throughput': tp['engine'] / tp['dense'],
                   'engine_vs_dense_p50_latency': lt['dense']['p50'] / lt['engine']['p50']}
  if num_workers > 1:
    tw = _workers_throughput(
        rows, n=num_workers, batch_size=batch_size, repeats=repeats,
        build_kw=dict(build_kw, params=jax.tree.map(np.asarray, params)))  # pickles to workers
    out['num_workers'] = num_workers
    out['workers_throughput_examples_per_s'] = tw
    out['ratios']['engine_vs_dense_throughput_workers'] = tw['engine'] / tw['dense']
  if torch:
    out['ratios']['dense_vs_torch_throughput'] = tp['dense'] / tp['torch']
    out['ratios']['engine_vs_torch_throughput'] = tp['engine'] / tp['torch']
    out['ratios']['dense_vs_torch_p50_latency'] = lt['torch']['p50'] / lt['dense']['p50']
  res = reference.run(params, cfg, enc, pruning=pruning, exits=exits, batch_size=64,
                      length_buckets=grid.length_buckets)
  m = reference.metrics(res, cfg, tau, plan=plan)[0]
  out['flops_speedup'] = m['flops_speedup']
  if plan is not None:  # which heads ran (SPEC §3), as report.json says
    out.update(heads=m['heads'], head_weight=plan.weight)
  fsio.write_json(pathlib.Path(workdir) / 'bench' / 'bench.json', out, indent=2)
  return out

"""mp_jax: Magic Pyramid (learned token pruning + early exits) for BERT in JAX/Flax.

Public surface: `mp_jax.Predictor` (= mp_jax.serving.predictor.Predictor), `mp_jax.model.hf.load/
save`, and the entry points train.py, eval.py, bench.py. Layers: docs/DESIGN.md.
"""


def __getattr__(name):
  # Lazy: `import mp_jax` stays cheap; `mp_jax.Predictor` pulls in JAX and the engine.
  if name == 'Predictor':
    from mp_jax.serving.predictor import Predictor  # pylint: disable=g-import-not-at-top
    return Predictor
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

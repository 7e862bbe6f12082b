"""Seeded splits: train/dev/test fractions, a held-out file as test, per-split subsampling.

Sources with a held-out file (GLUE dev.tsv, CSV test.csv, TFDS validation/test) use it as `test`
(GLUE test labels are hidden) and carve `dev` from train by a seeded `dev_fraction` (if 0, `dev`
is the held-out file too); `mr` and `bbc` get seeded train/dev/test fractions.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from mp_jax.data import sources

SPLITS = ('train', 'dev', 'test')


def rng(seed: int, *salt: str | int) -> np.random.Generator:
  """A generator fixed by the seed and the salt (names hashed with crc32)."""
  keys = [zlib.crc32(s.encode()) if isinstance(s, str) else int(s) for s in salt]
  return np.random.default_rng([int(seed), *keys])


def split(examples: list[sources.Example], *, seed: int, fractions: Sequence[float],
          names: Sequence[str] = SPLITS[1:]) -> dict[str, list[sources.Example]]:
  """Seeded split: `names[i]` gets round(n * fractions[i]) examples, 'train' the rest."""
  if any(f < 0 for f in fractions) or sum(fractions) >= 1:
    raise ValueError(f'split fractions {list(fractions)} must be >= 0 and sum to < 1')
  n = len(examples)
  perm = rng(seed, 'split').permutation(n)
  out, start = {}, 0
  for name, frac in zip(names, fractions, strict=True):
    k = int(round(n * frac))
    out[name] = [examples[i] for i in np.sort(perm[start:start + k])]
    start += k
  return {'train': [examples[i] for i in np.sort(perm[start:])], **out}


def subsample(ds: sources.Dataset, max_examples: int, seed: int) -> sources.Dataset:
  """Keeps at most `max_examples` per split (seeded, source order kept); 0 keeps all."""
  if max_examples <= 0:
    return ds
  out = {}
  for name, exs in ds.items():
    if len(exs) > max_examples:
      idx = np.sort(rng(seed, 'subsample', name).permutation(len(exs))[:max_examples])
      exs = [exs[i] for i in idx]
    out[name] = exs
  return sources.Dataset(out, ds.label_names)


def with_heldout(train: list[sources.Example], heldout: list[sources.Example], seed: int,
                 dev_fraction: float) -> dict[str, list[sources.Example]]:
  """A held-out file as `test`, `dev` carved from train (or the held-out file if dev_fraction 0)."""
  if dev_fraction <= 0:
    return {'train': train, 'dev': heldout, 'test': heldout}
  return {**split(train, seed=seed, fractions=[dev_fraction], names=['dev']), 'test': heldout}

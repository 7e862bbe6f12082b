"""Data parallelism: a 1-D `data` mesh over every device of every process.

The batch is sharded along its first axis, the training state is replicated. One code path for
1 device, N devices of one process, and several processes (`jax.distributed`): every process
computes the same global batch (its order is a function of seed and epoch) and contributes only
the rows that live on its own devices.
"""

import ipaddress
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = 'data'
DEFAULTS = {'coordinator': '', 'num_processes': 1, 'process_id': -1}
ENV = {'coordinator': 'MP_JAX_COORDINATOR', 'num_processes': 'MP_JAX_NUM_PROCESSES',
       'process_id': 'MP_JAX_PROCESS_ID'}


def settings(dist=None):
  """(coordinator, num_processes, process_id): `config.dist`, MP_JAX_* env vars fill defaults."""
  out = {}
  for key, default in DEFAULTS.items():
    value = (dist or {}).get(key, default)
    if value == default and os.environ.get(ENV[key]):
      value = os.environ[ENV[key]]
    out[key] = type(default)(value)
  num, pid = out['num_processes'], out['process_id']
  if num < 0 or (num > 1 and pid >= num):
    raise ValueError(f'config.dist: need num_processes >= 0 and process_id < num_processes, got '
                     f'num_processes={num}, process_id={pid}')
  return out['coordinator'], num, pid


def _is_loopback(address):
  host = address.rsplit(':', 1)[0].strip('[]')
  try:
    return host == 'localhost' or ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def initialize(dist=None):
  """Joins a multi-process run (call before any other JAX work); no-op for one process.

  `num_processes=1` (default): single process. `N > 1`: explicit coordinator `host:port` and
  `process_id` (or -1 to let JAX detect it). `0`: JAX detects everything (TPU pods, SLURM, MPI).
  """
  coordinator, num, pid = settings(dist)
  if num == 1 or jax.distributed.is_initialized():
    return
  kw = {}
  if num > 1:
    kw['num_processes'] = num
  if pid >= 0:
    kw['process_id'] = pid
  if coordinator:
    kw['coordinator_address'] = coordinator
    if _is_loopback(coordinator):  # a local run: listen on loopback only, not on every interface
      kw['coordinator_bind_address'] = coordinator
  logging.info('jax.distributed.initialize(%s)', kw)
  jax.distributed.initialize(**kw)
  logging.info('process %d of %d; %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main():
  """True on the process that writes logs, markers and exports (process 0)."""
  return jax.process_index() == 0


def mesh():
  """A 1-D mesh named `data` over all devices of all processes."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def replicated(m):
  return NamedSharding(m, P())


def batch_sharded(m):
  return NamedSharding(m, P(AXIS))


def check_batch_size(batch_size, what='train.batch_size'):
  """Clear error unless the global batch splits evenly over the devices."""
  n = jax.device_count()
  if batch_size % n:
    raise ValueError(f'{what}={batch_size} must be divisible by the number of devices ({n}) '
                     'for data-parallel training')


def replicate(tree, m):
  """Places host values (identical on every process) on every device of the mesh."""
  sh = replicated(m)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sh, np.asarray(x)), tree)


def local_rows(batch_size, m):
  """The slice of global batch rows that lives on this process's devices."""
  index = batch_sharded(m).addressable_devices_indices_map((batch_size,))
  starts = sorted(idx[0].indices(batch_size)[:2] for idx in index.values())
  lo, hi = starts[0][0], starts[-1][1]
  if sum(b - a for a, b in set(starts)) != hi - lo:
    raise ValueError(f'this process holds non-contiguous batch rows {starts}')
  return slice(lo, hi)


def shard_batch(batch, m):
  """Global batch dict (numpy, the same on every process) -> arrays sharded along rows."""
  sh = batch_sharded(m)
  rows = local_rows(len(batch['labels']), m)
  return {k: jax.make_array_from_process_local_data(sh, v[rows], v.shape)
          for k, v in batch.items()}


def to_host(tree):
  """Numpy copy of arrays this process holds whole (replicated ones may span other processes)."""

  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    raise ValueError(f'array of shape {x.shape} is sharded over other processes')

  return jax.tree.map(get, tree)


def barrier(name):
  """Waits for every process (no-op for one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)

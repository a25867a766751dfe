"""Device mesh and data-parallel helpers; multi-host initialisation.

Data parallelism is expressed with one jitted step over a 1-D mesh named 'data': the
batch is sharded along its first axis, parameters and optimiser state are replicated,
and XLA inserts the gradient all-reduce. The step computes the same mathematical
function as on one device (a mean over the global batch), which the tests check on 8
forced CPU devices.
"""

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() for multi-process runs; a no-op for a single process.

  Explicit launch (any machines, e.g. several processes on one host): set
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID
  (0..N-1) in every process. Under SLURM (more than one task) or with ADJAX_DISTRIBUTED=1
  (TPU pods and other clusters JAX detects by itself), JAX finds the values itself.
  """
  from adjax.errors import ConfigError
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if address:
    try:
      num_processes, process_id = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except (KeyError, ValueError):
      raise ConfigError(
          f"JAX_COORDINATOR_ADDRESS={address} asks for a multi-process run, but JAX_NUM_PROCESSES and "
          "JAX_PROCESS_ID are not both set to integers. Set them in every process (JAX_PROCESS_ID 0..N-1, "
          "a different one each), or unset JAX_COORDINATOR_ADDRESS for a single-process run.") from None
    jax.distributed.initialize(address, num_processes, process_id)
  elif slurm or os.environ.get("ADJAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  else:
    return
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def is_main_process() -> bool:
  """Process 0 writes the reports and overlays; every process trains and checkpoints."""
  return jax.process_index() == 0


def record_shard(n: int) -> tuple:
  """(index, count) of this process's share of n records, records index, index + count, ...:
  every process its own when there are at least as many records as processes, else (0, 1)."""
  count = jax.process_count()
  return (jax.process_index(), count) if 1 < count <= n else (0, 1)


def shard_size(n: int) -> int:
  """How many of n records record_shard(n) gives this process."""
  index, count = record_shard(n)
  return len(range(index, n, count))


def gather_shards(tree, n: int, what: str = "records"):
  """Arrays of this process's record_shard(n) (a pytree, leading axis the shard's records) ->
  the arrays of all n records in record order, the same on every process. A no-op for one
  process; every process must call it (a collective), with the same tree structure."""
  index, count = record_shard(n)
  if count == 1:
    return tree
  from jax.experimental import multihost_utils
  rows = -(-n // count)  # the largest shard: shards are padded to it for the all-gather

  def gather(a):
    a = np.asarray(a)
    a = np.concatenate([a, np.zeros((rows - len(a),) + a.shape[1:], a.dtype)]) if len(a) < rows else a
    gathered = np.asarray(multihost_utils.process_allgather(a))  # (processes, rows, ...)
    return gathered.swapaxes(0, 1).reshape((count * rows,) + a.shape[1:])[:n]  # record r: process r % count
  logging.info("This process (%d of %d) computed %d of %d %s; the rest came from the others", index + 1, count,
               shard_size(n), n, what)
  return jax.tree.map(gather, tree)


def local_copy(tree):
  """Arrays that span processes as copies on this process's first device (arrays already
  local, and anything else, unchanged): a process then computes on its own share of the data
  alone, without the others."""
  device = jax.local_devices()[0]
  return jax.tree.map(lambda a: jax.device_put(np.asarray(a), device)
                      if isinstance(a, jax.Array) and not a.is_fully_addressable else a, tree)


def data_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_size: int) -> NamedSharding:
  """Shard along the batch axis when it divides evenly across devices, else replicate
  (e.g. the last, smaller batch of an epoch); the step's result is the same either way."""
  if batch_size % mesh.devices.size == 0:
    return NamedSharding(mesh, P("data"))
  return replicated(mesh)


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Every array in the batch (a pytree) sharded along its leading batch axis. A batch laid out
  so already (caches.gather_batch's) is returned as it is: device_put costs host time per step
  even with nothing to move."""
  leaves = jax.tree.leaves(batch)
  sharding = batch_sharding(mesh, len(leaves[0]))
  if all(isinstance(a, jax.Array) and a.sharding == sharding for a in leaves):
    return batch
  return jax.device_put(batch, sharding)

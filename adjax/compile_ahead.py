"""Ahead-of-time compilation of a category's training programs, overlapping the cache pass.

Building the caches (decoding, the frozen backbone) takes seconds to minutes; compiling init,
the row gathers and the training step for every batch size of an epoch takes seconds more.
Both need only shapes, so `start` compiles in a background thread while the caches are built
(benchmarks/README.md has the measured overlap). The calls that follow use the same jitted
functions with the same shapes and shardings and so find the programs in JAX's in-memory
cache; anything that fails here is simply compiled (and its error raised) by the call itself.
"""

import concurrent.futures

import jax
import numpy as np
from absl import logging

from adjax import caches, io_utils, parallel


def training_batch_sizes(n: int, batch_size: int) -> list:
  """The batch sizes an epoch of n records produces: full batches and a short last one."""
  return sorted({min(batch_size, n)} | ({n % batch_size} if n > batch_size and n % batch_size else set()))


def start(config, method, extractor, n, init_fn, init_key, step_fn, train_key, frozen) -> concurrent.futures.Future:
  """Compiles in background threads, io_utils.background_threads() programs at once (each
  compilation is mostly one thread's work, and on a GPU the step's autotuning waits on the
  device); the future's result is True when everything compiled. `frozen` is the step's last
  argument (the extractor's variables, or None)."""

  def programs():
    mesh = parallel.data_mesh()
    replicated = parallel.replicated(mesh)
    cached = caches.cached_shapes(config, method, extractor, n)
    on_device = {k: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), shapes)
                 for k, (shapes, device) in cached.items() if device}
    per_record = {k: shapes for k, (shapes, _) in cached.items()}
    per_record["subclass"] = jax.ShapeDtypeStruct((n,), np.int32)
    sample = caches.init_sample(per_record)
    out = [init_fn.lower(sample, init_key, frozen)]
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                         jax.eval_shape(init_fn, sample, init_key, frozen))
    rows = jax.ShapeDtypeStruct((n,), np.int32, sharding=replicated)  # epoch order, subclass ids
    for size in reversed(training_batch_sizes(n, config.train.batch_size)):  # the full batch's step first
      sharding = parallel.batch_sharding(mesh, size)
      batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct((size,) + a.shape[1:], caches.batch_dtype(a.dtype),
                                                          sharding=sharding), per_record)
      out.append(step_fn.lower(state, batch, train_key, 0, frozen))
      if on_device:
        out.append(caches.gather_batch(mesh, size).lower(on_device, rows, rows, 0))
    return out

  def compile_all():
    try:
      threads = io_utils.background_threads()
      with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="adjax-precompile") as pool:
        for done in [pool.submit(lowered.compile) for lowered in programs()]:
          done.result()
      return True
    except Exception as e:  # noqa: BLE001 - the real calls recompile and report
      logging.info("Ahead-of-time compilation skipped (%s: %s); compiling on first use.", type(e).__name__, e)
      return False

  executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adjax-precompile")
  future = executor.submit(compile_all)
  executor.shutdown(wait=False)
  return future

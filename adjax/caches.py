"""The training set as the training step takes it: per-epoch batches of cached arrays.

A method's `train_inputs` decide what is cached (adjax/methods/base.py):
  'features'  the frozen extractor's output, computed once per dataset when the method allows
              it (`cache_features`) and train.cache_features is set, in train.feature_cache_dtype;
              else recomputed from the images every epoch, as the reference PyTorch code does
              (both give the same batches in the same order)
  'images'    the decoded, resized and cropped uint8 pixels, decoded once; the training step
              normalises them on the device (and augments them there, if the method does)
Each cache lives on the device (a copy on every device of the data mesh) when it fits its
train.*_cache_device_mb, else on the host; batches are float32 features and uint8 images.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from adjax import configlib, parallel, progress
from adjax.data import pipeline


def compute_features(config, extractor, records, desc, mean, std, subclass_ids=(), into=None):
  """Features of `records`, in order, as host arrays (one array, or a pytree of arrays). In a
  multi-process run each process decodes and extracts its share (parallel.record_shard) and
  the shares are gathered. With `into` (shape structs of all records' features, as
  cached_shapes gives them; one process only) they are written batch by batch into device
  arrays of those shapes and dtypes, replicated over the data mesh, never passing the host."""
  index, count = parallel.record_shard(len(records))
  if into is not None and count > 1:
    raise ValueError("compute_features(into=...) is for a single-process run")
  dataset = pipeline.make_dataset(
      records, image_size=config.data.image_size, crop_size=config.data.crop_size, mean=mean, std=std,
      batch_size=config.train.batch_size, worker_count=config.data.workers, subclass_ids=subclass_ids,
      shard_index=index, shard_count=count, resize=config.data.resize)
  chunks, start = [], 0
  if into is not None:
    replicated = parallel.replicated(parallel.data_mesh())
    buffer, write = _zeros(into, replicated)(), _row_writer(replicated)
  with progress.bar(parallel.shard_size(len(records)), desc) as bar:
    for batch in dataset:
      n = len(batch["index"])
      features = extractor(pipeline.pad_batch(batch["image"], config.train.batch_size))
      if into is None:
        chunks.append(jax.tree.map(lambda a: np.asarray(a)[:n], features))  # host slice: no extra program
      else:
        buffer = write(buffer, jax.device_put(features, replicated), start)
      start += n
      bar.update(n)
  if into is not None:
    return buffer
  return parallel.gather_shards(jax.tree.map(lambda *parts: np.concatenate(parts), *chunks), len(records),
                                "training images' features")


def _zeros(structs, sharding):
  """A compiled call making zero arrays shaped like `structs` on `sharding` (no host array)."""
  leaves, treedef = jax.tree.flatten(structs)
  return _zeros_of(treedef, tuple((s.shape, jnp.dtype(s.dtype)) for s in leaves), sharding)


@functools.cache  # one traced program per cache shape, not one per category
def _zeros_of(treedef, shapes, sharding):
  return jax.jit(lambda: jax.tree.unflatten(treedef, [jnp.zeros(shape, dtype) for shape, dtype in shapes]),
                 out_shardings=sharding)


@functools.cache
def _row_writer(sharding):
  """(cache, a batch of rows, start) -> the cache with its rows from `start` on replaced by the
  batch's, cast to the cache's dtype; the cache is donated, so it is updated in place. The
  padding of a short last batch falls past the cache's last row and is dropped."""
  def adjax_write_rows(cache, rows, start):  # the name shows in JAX's compilation logs
    def write(c, r):
      return c.at[start + jnp.arange(r.shape[0])].set(r.astype(c.dtype), mode="drop")
    return jax.tree.map(write, cache, rows)
  return jax.jit(adjax_write_rows, donate_argnums=0, out_shardings=sharding)


def decode_images(config, records, desc) -> np.ndarray:
  """The uint8 pixels (N, S, S, 3) of `records` after the pipeline's resize and crop, each
  process decoding its share in a multi-process run."""
  index, count = parallel.record_shard(len(records))
  dataset = pipeline.make_dataset(
      records, image_size=config.data.image_size, crop_size=config.data.crop_size, mean=None, std=None,
      batch_size=config.train.batch_size, worker_count=config.data.workers, shard_index=index, shard_count=count,
      resize=config.data.resize)
  chunks = []
  with progress.bar(parallel.shard_size(len(records)), desc) as bar:
    for batch in dataset:
      chunks.append(np.asarray(batch["image"]))
      bar.update(len(chunks[-1]))
  return parallel.gather_shards(np.concatenate(chunks), len(records), "decoded training images")


def nbytes(tree) -> int:
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def feature_dtype(config):
  return jnp.bfloat16 if config.train.feature_cache_dtype == "bfloat16" else np.float32


def fits_on_device(tree, megabytes) -> bool:
  """Whether arrays (or shape structs) fit a train.*_cache_device_mb budget."""
  return nbytes(tree) <= megabytes * 2 ** 20


def cached_shapes(config, method, extractor, n) -> dict:
  """Shape structs of the caches a TrainingSet of n records holds, and whether each is on the
  device: {'features': (structs, on_device), 'images': ...}, from shapes alone."""
  out = {}
  s = configlib.input_size(config)
  if "images" in method.train_inputs:
    images = jax.ShapeDtypeStruct((n, s, s, 3), np.uint8)
    out["images"] = (images, fits_on_device(images, config.train.image_cache_device_mb))
  if "features" in method.train_inputs and caches_features(config, method):
    per_image = jax.eval_shape(extractor.fn, extractor.variables, jax.ShapeDtypeStruct((1, s, s, 3), np.float32))
    features = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n,) + a.shape[1:], feature_dtype(config)), per_image)
    out["features"] = (features, fits_on_device(features, config.train.feature_cache_device_mb))
  return out


def caches_features(config, method) -> bool:
  return bool(config.train.cache_features and method.cache_features)


def feature_source(config, method):
  """Where a training batch's 'features' come from: 'cache' (computed once), 'step' (from the
  batch's clean images inside the training step), 'pipeline' (an input-pipeline pass every
  epoch, for methods that train on features alone), or None (the method takes none)."""
  if "features" not in method.train_inputs:
    return None
  if caches_features(config, method):
    return "cache"
  return "step" if "images" in method.train_inputs else "pipeline"


def init_sample(tree):
  """Zeros shaped like one record of a batch (arrays or shape structs), in the batches' dtypes
  (float32 for floating caches): the sample init is compiled for ahead and called with."""
  return jax.tree.map(lambda a: np.zeros((1,) + a.shape[1:], batch_dtype(a.dtype)), tree)


def batch_dtype(dtype):
  return np.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype


def take_rows(tree, idx):
  """Rows idx of every cached array, floating ones as float32 (the cache may hold bfloat16);
  numpy on the host, traced inside gather_batch's compiled gather."""
  return jax.tree.map(lambda a: a[idx].astype(batch_dtype(a.dtype)), tree)


@functools.cache
def gather_batch(mesh, size: int):
  """The on-device caches' batch as one compiled call: (caches, subclass ids, epoch order, start)
  -> {each cache's rows order[start:start + size], 'subclass'}, sharded along the batch over
  `mesh` as the step takes it; eager indexing would dispatch per array and per step, so the
  order and subclass ids go to the device once per epoch and `start` is a scalar."""
  def adjax_gather_batch(caches, subclass, order, start):  # the name shows in JAX's compilation logs
    idx = jax.lax.dynamic_slice_in_dim(order, start, size)
    return {**take_rows(caches, idx), "subclass": subclass[idx]}
  return jax.jit(adjax_gather_batch, out_shardings=parallel.batch_sharding(mesh, size))


class TrainingSet:
  """Per-epoch training batches {'features'?, 'images'?, 'subclass'} of one category's records."""

  def __init__(self, config, method, extractor, records, subclass_ids, normalisation):
    self.config, self.extractor, self.records = config, extractor, records
    self.mean, self.std = normalisation
    self.subclass = np.asarray([subclass_ids.index(r.subclass) if r.subclass in subclass_ids else -1
                                for r in records], np.int32)
    self.device, self.host = {}, {}  # cache name -> arrays, by where they live
    source = feature_source(config, method)
    self.recompute_features = source == "pipeline"
    if "images" in method.train_inputs:
      self._keep("images", decode_images(config, records, "caching images"), config.train.image_cache_device_mb)
    if source == "cache":
      structs, on_device = cached_shapes(config, method, extractor, len(records))["features"]
      into = structs if on_device and jax.process_count() == 1 else None  # then straight into device memory
      features = compute_features(config, extractor, records, "caching features", self.mean, self.std, subclass_ids,
                                  into)
      if into is None:
        features = jax.tree.map(lambda a: a.astype(feature_dtype(config), copy=False), features)
      self._keep("features", features, config.train.feature_cache_device_mb)

  def _keep(self, name, arrays, device_mb):
    megabytes = nbytes(arrays) / 2 ** 20
    shapes = [a.shape for a in jax.tree.leaves(arrays)]
    if fits_on_device(arrays, device_mb):  # a no-op for arrays compute_features wrote on the device
      self.device[name] = jax.device_put(arrays, parallel.replicated(parallel.data_mesh()))
      logging.info("%s cache: %s, %.0f MB on device", name.capitalize(), shapes, megabytes)
    else:
      self.host[name] = arrays
      logging.info("%s cache: %s, %.0f MB on host (over train.%s_cache_device_mb)", name.capitalize(), shapes,
                   megabytes, name[:-1])

  def all_features(self):
    """Every record's features in record order (from the cache, or computed now)."""
    cached = self.device.get("features", self.host.get("features"))
    if cached is not None:
      return jax.tree.map(lambda a: np.asarray(a).astype(np.float32), cached)
    batches = [jax.tree.map(np.asarray, b["features"]) for b in self.epoch(np.arange(len(self.records)), 8)]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *batches)

  def sample(self):
    """A one-record batch of zeros for init, which reads only its shapes (no device program
    compiled for it); a real one when features are recomputed."""
    if self.recompute_features:
      batch = next(self.epoch(np.arange(1), 1))
      return {k: np.asarray(v) if k == "subclass" else v for k, v in batch.items()}
    return init_sample({**self.device, **self.host, "subclass": self.subclass})

  def epoch(self, order, batch_size):
    """Yields the batches of `order` (indices into records); the on-device caches' part already
    laid out over the data mesh as the training step takes it."""
    mesh = parallel.data_mesh()
    if self.device:
      order_on_device = jax.device_put(np.asarray(order, np.int32), parallel.replicated(mesh))
      subclass_on_device = jax.device_put(self.subclass, parallel.replicated(mesh))
    recomputed = self._recomputed(order, batch_size) if self.recompute_features else None
    for start in range(0, len(order), batch_size):
      idx = order[start:start + batch_size]
      if self.device:
        batch = gather_batch(mesh, len(idx))(self.device, subclass_on_device, order_on_device, start)
      else:
        batch = {"subclass": self.subclass[idx]}
      batch.update(take_rows(self.host, idx))
      if recomputed is not None:
        batch["features"] = next(recomputed)
      yield batch

  def _recomputed(self, order, batch_size):
    ordered = [self.records[i] for i in order]
    dataset = pipeline.make_dataset(
        ordered, image_size=self.config.data.image_size, crop_size=self.config.data.crop_size, mean=self.mean,
        std=self.std, batch_size=batch_size, worker_count=self.config.data.workers, shard_index=0, shard_count=1,
        resize=self.config.data.resize)
    for batch in dataset:
      yield self.extractor(batch["image"])

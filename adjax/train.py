"""The shared run loop: per category, read and check the data, compute frozen-backbone
features once, build the method's state, checkpoint it, evaluate and report.

Methods are reached only through the interface in adjax/methods/__init__.py.
"""

import concurrent.futures
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.metadata import ArrayMetadata
from absl import logging

from adjax import configlib, evaluate, io_utils, methods, parallel, progress
from adjax.backbones.patch_features import make_feature_fn
from adjax.data import datasets, pipeline, synthetic
from adjax.errors import CheckpointError, ConfigError


def resolve_root(config) -> str:
  if config.data.name == "synthetic" and not config.data.root:
    return synthetic.ensure_generated()
  return os.path.expanduser(config.data.root)


def load_splits(config) -> list:
  """Every requested category's split, all checked before any computation starts."""
  root = resolve_root(config)
  if config.data.name != "synthetic" and not config.data.root:
    raise ConfigError(f"data.root is empty: set --config.data.root to the {config.data.name} folder.")
  splits = []
  for category in datasets.categories_from_config(config.data.name, root, config.data.category):
    split = datasets.read_split(config.data.name, root, category)
    datasets.validate(split)
    logging.info("Category %s: %d train, %d test (%d anomalous)%s", split.category, len(split.train),
                 len(split.test), sum(r.label for r in split.test),
                 f", unseen subclasses {split.unseen_subclasses}" if split.unseen_subclasses else "")
    splits.append(split)
  return splits


def compute_features(config, feature_fn, records, desc, subclass_ids=()):
  """Features of `records`, in order, as host arrays (one array, or a pytree of arrays)."""
  dataset = pipeline.make_dataset(
      records, image_size=config.data.image_size, crop_size=config.data.crop_size, mean=feature_fn.spec.mean,
      std=feature_fn.spec.std, batch_size=config.train.batch_size, worker_count=config.data.workers,
      subclass_ids=subclass_ids, shard_index=0, shard_count=1)
  chunks = []
  with progress.bar(len(records), desc) as bar:
    for batch in dataset:
      count = len(batch["index"])
      features = feature_fn(pipeline.pad_batch(batch["image"], config.train.batch_size))
      chunks.append(jax.tree.map(lambda a: np.asarray(a)[:count], features))  # host slice: no extra program
      bar.update(count)
  # Features are one array (patch features) or a pytree of arrays (e.g. PFM's two backbones' maps).
  return jax.tree.map(lambda *parts: np.concatenate(parts), *chunks)


def checkpoint_manager(workdir: str, category: str) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints", category or "default"))
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
                               item_handlers=ocp.StandardCheckpointHandler())


def _local_target(manager, step):
  """A restore target that puts every array on this process's first device, whatever
  devices or processes wrote the checkpoint: a run trained data-parallel on 8 GPUs or on
  several hosts is evaluated on one device (orbax refuses a topology change without it)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = manager.item_metadata(step)
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device) if isinstance(m, ArrayMetadata) else 0,
      metadata.tree if hasattr(metadata, "tree") else metadata)


def save_state(workdir, category, step, state):
  with checkpoint_manager(workdir, category) as manager:
    if step in manager.all_steps():
      manager.delete(step)  # a re-run of a statistics-only method replaces its single checkpoint
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def _restore_latest(manager, path, target=None):
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"The checkpoint folder {path} holds no finished checkpoint; train again.")
  try:
    if target is None:
      target = _local_target(manager, step)
    return manager.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:  # orbax raises many types for damaged files
    raise CheckpointError(f"The checkpoint {path}/{step} cannot be read ({type(e).__name__}: {e}). "
                          "Delete that step folder to fall back to the previous one, or train again.") from None


def restore_state(workdir, category, target=None):
  """The latest checkpoint {'state', 'epoch'}; `target` (a pytree of the same structure)
  restores arrays with its types and shardings."""
  path = os.path.join(workdir, "checkpoints", category or "default")
  if not os.path.isdir(path):
    raise CheckpointError(f"No checkpoint for category '{category}' in {path}. Train first with "
                          f"--mode=train --workdir={workdir}.")
  with checkpoint_manager(workdir, category) as manager:
    return _restore_latest(manager, path, target)


RUN_CONFIG = "config.json"


def write_run_config(workdir, config):
  io_utils.write_text(os.path.join(workdir, RUN_CONFIG), config.to_json_best_effort(indent=2))


def check_run_config(workdir, config):
  """eval/predict must use the model the workdir was trained with."""
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(path):
    raise CheckpointError(f"{workdir} holds no trained run ({RUN_CONFIG} is missing). Train first with "
                          f"--mode=train --workdir={workdir}, or point --workdir at a trained run.")
  trained = json.load(open(path))
  current = json.loads(config.to_json_best_effort())
  differing = [f"model.{k}" for k in sorted(set(trained["model"]) | set(current["model"]))
               if trained["model"].get(k) != current["model"].get(k)]
  for key in ("image_size", "crop_size"):
    if trained["data"].get(key) != current["data"].get(key):
      differing.append(f"data.{key}")
  if differing:
    raise ConfigError(f"The config differs from the one {workdir} was trained with in {', '.join(differing)}. "
                      f"Use the same config file and overrides (saved in {path}), or a new --workdir.")


class FeatureSource:
  """Per-epoch batches of frozen-backbone features for gradient training.

  cache_features=True (the default; the papers use no random augmentation for these
  methods): the frozen backbone runs once per dataset and its features are reused every
  epoch, on the device when they fit in train.feature_cache_device_mb (a copy on every
  device of the data mesh), else on the host.
  cache_features=False recomputes them from the images each epoch, as the reference
  PyTorch code does; both give the same batches in the same order. The cache holds
  train.feature_cache_dtype: float32 (exact), or bfloat16 to fit twice as many features
  on the device (or in host memory); batches are always float32.
  """

  def __init__(self, config, feature_fn, records, subclass_ids):
    self.config, self.feature_fn, self.records = config, feature_fn, records
    self.subclass = np.asarray([subclass_ids.index(r.subclass) if r.subclass in subclass_ids else -1
                                for r in records], np.int32)
    self.features = None
    if config.train.cache_features:
      features = compute_features(config, feature_fn, records, "caching features", subclass_ids)
      features = jax.tree.map(lambda a: a.astype(cache_dtype(config)), features)
      megabytes = _nbytes(features) / 2 ** 20
      shapes = [a.shape for a in jax.tree.leaves(features)]
      if cache_on_device(config, features):
        self.features = jax.device_put(features, parallel.replicated(parallel.data_mesh()))
        logging.info("Feature cache: %s, %.0f MB on device", shapes, megabytes)
      else:
        self.features = features
        logging.info("Feature cache: %s, %.0f MB on host (over train.feature_cache_device_mb)", shapes, megabytes)

  def all_features(self):
    """Every record's features in record order (from the cache, or computed now)."""
    if self.features is not None:
      return jax.tree.map(lambda a: np.asarray(a).astype(np.float32), self.features)
    batches = [jax.tree.map(np.asarray, b["features"]) for b in self.epoch(np.arange(len(self.records)), 8)]
    return jax.tree.map(lambda *parts: np.concatenate(parts), *batches)

  def sample(self):
    """A one-record features batch for init, which reads only its shape (from the cache: zeros of
    that shape, no device program compiled for it)."""
    if self.features is not None:
      return init_sample(self.features)
    return next(self.epoch(np.arange(1), 1))["features"]

  def epoch(self, order, batch_size):
    """Yields {'features', 'subclass'} batches following `order` (indices into records); from
    the on-device cache already laid out over the data mesh as the training step takes them."""
    if self.features is not None and isinstance(jax.tree.leaves(self.features)[0], jax.Array):
      mesh = parallel.data_mesh()
      order_on_device = jax.device_put(np.asarray(order, np.int32), parallel.replicated(mesh))
      subclass_on_device = jax.device_put(self.subclass, parallel.replicated(mesh))
      for start in range(0, len(order), batch_size):
        gather = gather_batch(mesh, min(batch_size, len(order) - start))
        yield gather(self.features, subclass_on_device, order_on_device, start)
      return
    if self.features is not None:
      for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield {"features": _take_rows_host(self.features, idx), "subclass": self.subclass[idx]}
      return
    ordered = [self.records[i] for i in order]
    dataset = pipeline.make_dataset(
        ordered, image_size=self.config.data.image_size, crop_size=self.config.data.crop_size,
        mean=self.feature_fn.spec.mean, std=self.feature_fn.spec.std, batch_size=batch_size,
        worker_count=self.config.data.workers, shard_index=0, shard_count=1)
    for start, batch in zip(range(0, len(order), batch_size), dataset):
      idx = order[start:start + batch_size]
      yield {"features": self.feature_fn(batch["image"]), "subclass": self.subclass[idx]}


def _nbytes(tree) -> int:
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


def init_sample(features):
  """Zeros shaped like one record of `features` (arrays or shape structs), in the batches' float32:
  the sample init is compiled for ahead and called with, so both must build it here."""
  return jax.tree.map(lambda a: np.zeros((1,) + a.shape[1:], np.float32), features)


def cache_on_device(config, features) -> bool:
  """Whether the feature cache (arrays or shape structs) fits train.feature_cache_device_mb."""
  return _nbytes(features) <= config.train.feature_cache_device_mb * 2 ** 20


def cache_dtype(config):
  return jnp.bfloat16 if config.train.feature_cache_dtype == "bfloat16" else np.float32


def _take_rows_host(tree, idx):
  """Rows idx of every cached array, as float32 (the cache may hold bfloat16); numpy on the host,
  traced inside gather_batch's compiled gather."""
  return jax.tree.map(lambda a: a[idx].astype(np.float32), tree)


@functools.lru_cache(maxsize=None)
def gather_batch(mesh, size: int):
  """The on-device cache's batch as one compiled call: (cache, subclass ids, epoch order, start) ->
  {'features': rows order[start:start + size] as float32, 'subclass'}, sharded along the batch
  over `mesh` as the step takes it. Eager indexing cost several dispatches (1.5 ms of host time
  per step on an H100, against a 2.7 ms step), and a separate device_put of each batch 0.2 ms on
  the 2-core CPU; the order and subclass ids go to the device once per epoch, `start` is a scalar."""
  def adjax_gather_batch(cache, subclass, order, start):  # the name shows in JAX's compilation logs
    idx = jax.lax.dynamic_slice_in_dim(order, start, size)
    return {"features": _take_rows_host(cache, idx), "subclass": subclass[idx]}
  return jax.jit(adjax_gather_batch, out_shardings=parallel.batch_sharding(mesh, size))


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The shuffled order of epoch `epoch`: a pure function of (seed, epoch), so resumes replay it."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def make_train_step(config, method):
  """method.train_step as one jitted function (state donated). The step's key fold_in(key, t)
  is derived inside the compiled step: one dispatch per step, not two."""
  def adjax_train_step(state, batch, key, t):  # the name shows in JAX's compilation logs
    return method.train_step(config, state, batch, jax.random.fold_in(key, t))
  return jax.jit(adjax_train_step, donate_argnums=0)


def train_gradient(config, method, source: FeatureSource, state, key, workdir: str, category: str, step=None):
  """Epochs of method.train_step, data-parallel over all devices, checkpointed and resumable.

  Randomness of step t is fold_in(key, t), the data order of epoch e is epoch_order(seed, e):
  an interrupted run restarted with the same workdir continues from its last checkpoint and
  ends with exactly the parameters of an uninterrupted run. `step` is make_train_step's
  function (possibly compiled ahead by precompile_training); a new one when not given.
  """
  mesh = parallel.data_mesh()
  n = len(source.records)
  batch_size = config.train.batch_size
  steps_per_epoch = -(-n // batch_size)
  start_epoch = 0
  with checkpoint_manager(workdir, category) as manager:
    if manager.latest_step() is not None:
      restored = _restore_latest(manager, manager.directory, target={"state": state, "epoch": 0})
      state, start_epoch = restored["state"], int(restored["epoch"]) + 1
      logging.info("Resuming %s from the checkpoint after epoch %d", category, start_epoch)
    state = jax.device_put(state, parallel.replicated(mesh))
    step = step or make_train_step(config, method)
    last_save = time.monotonic()
    with progress.bar((config.train.epochs - start_epoch) * steps_per_epoch, f"training {category}", "step") as bar:
      for epoch in range(start_epoch, config.train.epochs):
        step_metrics = []
        for i, batch in enumerate(source.epoch(epoch_order(config.seed, epoch, n), batch_size)):
          state, metrics = step(state, parallel.put_batch(batch, mesh), key, epoch * steps_per_epoch + i)
          step_metrics.append(metrics)
          bar.update(1)
        # One transfer per epoch; summing on the device would dispatch (and compile) an add per step.
        step_metrics = jax.device_get(step_metrics)
        means = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
        bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()})
        last = epoch == config.train.epochs - 1
        due = ((epoch + 1) % config.train.checkpoint_every == 0
               and time.monotonic() - last_save >= config.train.checkpoint_min_seconds)
        if last or due:
          manager.save(epoch, args=ocp.args.StandardSave({"state": state, "epoch": epoch}))
          last_save = time.monotonic()
        if (epoch + 1) % config.train.log_every == 0 or last:
          logging.info("%s epoch %d/%d: %s", category, epoch + 1, config.train.epochs,
                       ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    manager.wait_until_finished()
  return state


def make_init(config, method, num_subclasses=1):
  """method.init(config, sample, key, num_subclasses) as one jitted function of (sample, key).
  Run op by op, Flax's initialisers compile dozens of small programs, each too quick for the
  persistent compilation cache to keep: on the 2-core CPU SimpleNet's init took 4.0 s
  eagerly, 3.0 s compiled (1.9 s of it compilation, which the cache keeps; both with another
  job running). Gradient methods read only the sample's shape."""
  return jax.jit(lambda sample, key: method.init(config, sample, key, num_subclasses))


def training_batch_sizes(n: int, batch_size: int) -> list:
  """The batch sizes an epoch of n records produces: full batches and a short last one."""
  return sorted({min(batch_size, n)} | ({n % batch_size} if n > batch_size and n % batch_size else set()))


def precompile_training(config, feature_fn, n, init_fn, init_key, step_fn, train_key) -> concurrent.futures.Future:
  """Compiles init, the row gathers and the training step for every batch size of an epoch
  from shapes alone, in a background thread, so that compilation overlaps the feature pass
  instead of following it. Wait for the result (True when everything compiled) before
  training. Compiled with the same jitted functions, shapes and shardings as the calls that
  follow, the programs are found in JAX's in-memory cache by those calls; anything that
  fails here is simply compiled (and its error raised) by the call itself."""

  def compile_all():
    try:
      b = config.train.batch_size
      images = jax.ShapeDtypeStruct((b, config.data.crop_size, config.data.crop_size, 3), np.float32)
      per_batch = jax.eval_shape(feature_fn.fn, feature_fn.variables, images)
      sample = init_sample(per_batch)
      init_fn.lower(sample, init_key).compile()
      mesh = parallel.data_mesh()
      state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(mesh)),
                           jax.eval_shape(init_fn, sample, init_key))
      cached = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n,) + a.shape[1:], cache_dtype(config),
                                                          sharding=parallel.replicated(mesh)), per_batch)
      device_cache = config.train.cache_features and cache_on_device(config, cached)
      rows = jax.ShapeDtypeStruct((n,), np.int32, sharding=parallel.replicated(mesh))  # order, subclass ids
      for size in training_batch_sizes(n, b):
        if device_cache:
          gather_batch(mesh, size).lower(cached, rows, rows, 0).compile()
        sharding = parallel.batch_sharding(mesh, size)
        batch = {"features": jax.tree.map(lambda a: jax.ShapeDtypeStruct((size,) + a.shape[1:], a.dtype,
                                                                          sharding=sharding), per_batch),
                 "subclass": jax.ShapeDtypeStruct((size,), np.int32, sharding=sharding)}
        step_fn.lower(state, batch, train_key, 0).compile()
      return True
    except Exception as e:  # noqa: BLE001 - the real calls recompile and report
      logging.info("Ahead-of-time compilation skipped (%s: %s); compiling on first use.", type(e).__name__, e)
      return False

  executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="adjax-precompile")
  future = executor.submit(compile_all)
  executor.shutdown(wait=False)
  return future


def fit_category(config, method, feature_fn, split, key, workdir):
  """The trained state of one category: statistics-only methods from cached features,
  gradient-trained methods (those with `train_step`) through train_gradient."""
  subclass_ids = sorted({r.subclass for r in split.train})  # experts exist for seen subclasses only
  init_key, train_key, assign_key = jax.random.split(key, 3)
  if not hasattr(method, "train_step"):
    train_features = compute_features(config, feature_fn, split.train, f"features {split.category}", subclass_ids)
    state = method.init(config, train_features, init_key, len(subclass_ids))
    save_state(workdir, split.category, 0, {"state": state, "epoch": 0})
    return state
  step_fn = make_train_step(config, method)
  precompiling = None
  if not hasattr(method, "assign_subclasses"):  # else the state's shape depends on the features
    init_fn = make_init(config, method, len(subclass_ids))
    precompiling = precompile_training(config, feature_fn, len(split.train), init_fn, init_key, step_fn, train_key)
  source = FeatureSource(config, feature_fn, split.train, subclass_ids)
  if hasattr(method, "assign_subclasses"):
    source.subclass = np.asarray(method.assign_subclasses(config, source.all_features(), source.subclass, assign_key),
                                 np.int32)
  num_subclasses = int(source.subclass.max()) + 1
  if len(subclass_ids) > 1 or num_subclasses > 1:
    counts = np.bincount(source.subclass, minlength=num_subclasses)
    names = subclass_ids if len(subclass_ids) == num_subclasses else [f"cluster{k}" for k in range(num_subclasses)]
    logging.info("%s: %d training subclasses %s", split.category, num_subclasses, dict(zip(names, counts.tolist())))
  if precompiling is None:
    init_fn = make_init(config, method, num_subclasses)
  else:
    precompiling.result()
  state = init_fn(source.sample(), init_key)
  state = train_gradient(config, method, source, state, train_key, workdir, split.category, step_fn)
  if hasattr(method, "finalize"):
    state = method.finalize(config, state, source.epoch(np.arange(len(source.records)), config.train.batch_size))
    save_state(workdir, split.category, config.train.epochs - 1, {"state": state, "epoch": config.train.epochs - 1})
  return state


def run(config, workdir: str, mode: str) -> dict:
  """train (then evaluate) or eval; returns the metrics report."""
  configlib.validate(config)
  method = methods.get(config.model.name)
  splits = load_splits(config)
  os.makedirs(workdir, exist_ok=True)
  if mode == "train":
    if os.path.exists(os.path.join(workdir, RUN_CONFIG)):
      check_run_config(workdir, config)  # resuming: the model and data must be the same
    if parallel.is_main_process():
      write_run_config(workdir, config)
  else:
    check_run_config(workdir, config)
  feature_fn = make_feature_fn(config.model)
  key = jax.random.key(config.seed)
  scorer = evaluate.make_scorer(config, method, feature_fn)  # one program for every category of the same shapes
  per_category = {}
  for split in splits:
    key, sub = jax.random.split(key)  # split in eval mode too, so keys never depend on the mode
    if mode == "train":
      state = fit_category(config, method, feature_fn, split, sub, workdir)
    else:
      state = restore_state(workdir, split.category)["state"]
    scored = evaluate.score_dataset(config, method, state, feature_fn, split.test, f"scoring {split.category}",
                                    scorer)
    per_category[split.category] = evaluate.category_metrics(split, scored, config)
    if parallel.is_main_process():
      evaluate.write_overlays(os.path.join(workdir, "overlays", split.category), split, scored, feature_fn.spec,
                              config.eval.num_overlays)
  report = evaluate.summarise(per_category)
  if parallel.is_main_process():
    evaluate.write_reports(workdir, report, config)
  return report

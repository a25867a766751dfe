"""The shared run loop: per category, read and check the data, compute frozen-backbone
features once, build the method's state, checkpoint it, evaluate and report.

Methods are reached only through the interface in adjax/methods/__init__.py.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from adjax import configlib, evaluate, io_utils, methods, progress
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
  """Patch features of `records`, in order, as one host array (computed once, then reused)."""
  dataset = pipeline.make_dataset(
      records, image_size=config.data.image_size, crop_size=config.data.crop_size, mean=feature_fn.spec.mean,
      std=feature_fn.spec.std, batch_size=config.train.batch_size, worker_count=config.data.workers,
      subclass_ids=subclass_ids, shard_index=0, shard_count=1)
  chunks = []
  with progress.bar(len(records), desc) as bar:
    for batch in dataset:
      chunks.append(np.asarray(feature_fn(batch["image"])))
      bar.update(len(batch["index"]))
  return np.concatenate(chunks)


def checkpoint_manager(workdir: str, category: str) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints", category or "default"))
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def save_state(workdir, category, step, state):
  with checkpoint_manager(workdir, category) as manager:
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def restore_state(workdir, category):
  path = os.path.join(workdir, "checkpoints", category or "default")
  if not os.path.isdir(path):
    raise CheckpointError(f"No checkpoint for category '{category}' in {path}. Train first with "
                          f"--mode=train --workdir={workdir}.")
  with checkpoint_manager(workdir, category) as manager:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"The checkpoint folder {path} holds no finished checkpoint; train again.")
    try:
      return manager.restore(step, args=ocp.args.StandardRestore())
    except Exception as e:  # orbax raises many types for damaged files
      raise CheckpointError(f"The checkpoint {path}/{step} cannot be read ({type(e).__name__}: {e}). "
                            "Delete that step folder to fall back to the previous one, or train again.") from None


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
                      f"Use the same config file and overrides (saved in {path}).")


def fit_category(config, method, feature_fn, split, key):
  subclass_ids = split.subclasses
  train_features = compute_features(config, feature_fn, split.train, f"features {split.category}", subclass_ids)
  logging.info("Train features of %s: %s", split.category, train_features.shape)
  return method.init(config, train_features, key)


def run(config, workdir: str, mode: str) -> dict:
  """train (then evaluate) or eval; returns the metrics report."""
  configlib.validate(config)
  method = methods.get(config.model.name)
  splits = load_splits(config)
  os.makedirs(workdir, exist_ok=True)
  if mode == "train":
    write_run_config(workdir, config)
  else:
    check_run_config(workdir, config)
  feature_fn = make_feature_fn(config.model)
  key = jax.random.key(config.seed)
  per_category = {}
  for split in splits:
    if mode == "train":
      key, sub = jax.random.split(key)
      state = fit_category(config, method, feature_fn, split, sub)
      save_state(workdir, split.category, 0, state)
    else:
      state = restore_state(workdir, split.category)
    scored = evaluate.score_dataset(config, method, state, feature_fn, split.test, f"scoring {split.category}")
    per_category[split.category] = evaluate.category_metrics(split, scored, config)
    evaluate.write_overlays(os.path.join(workdir, "overlays", split.category), split, scored, feature_fn.spec,
                            config.eval.num_overlays)
  return evaluate.write_reports(workdir, per_category, config)

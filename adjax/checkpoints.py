"""Checkpoints and the run-config guard: what a workdir holds and whether a config may use it.

Per category, an Orbax CheckpointManager under <workdir>/checkpoints/<category> keeps
{'state': the method's state, 'epoch': the last finished epoch}; <workdir>/config.json is the
config the workdir was trained with, so that eval, predict and resumed training refuse a
different model.
"""

import json
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.metadata import ArrayMetadata

from adjax import io_utils, parallel
from adjax.errors import CheckpointError, ConfigError

RUN_CONFIG = "config.json"


def manager(workdir: str, category: str) -> ocp.CheckpointManager:
  path = os.path.abspath(os.path.join(workdir, "checkpoints", category or "default"))
  return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
                               item_handlers=ocp.StandardCheckpointHandler())


def _local_target(checkpoints, step):
  """A restore target that puts every array on this process's first device, whatever
  devices or processes wrote the checkpoint: a run trained data-parallel on 8 GPUs or on
  several hosts is evaluated on one device (orbax refuses a topology change without it)."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  metadata = checkpoints.item_metadata(step)
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device) if isinstance(m, ArrayMetadata) else 0,
      metadata.tree if hasattr(metadata, "tree") else metadata)


def save(workdir, category, step, state):
  """Writes {'state', 'epoch': step} as checkpoint `step` (replacing one of that step)."""
  with manager(workdir, category) as checkpoints:
    if step in checkpoints.all_steps():
      checkpoints.delete(step)  # a re-run of a statistics-only method replaces its single checkpoint
    checkpoints.save(step, args=ocp.args.StandardSave({"state": state, "epoch": step}))
    checkpoints.wait_until_finished()


def restore_latest(checkpoints, target=None):
  """The latest checkpoint of an open manager; `target` (a pytree of the same structure)
  restores arrays with its types and shardings, else onto this process's first device."""
  path = checkpoints.directory
  step = checkpoints.latest_step()
  if step is None:
    raise CheckpointError(f"The checkpoint folder {path} holds no finished checkpoint; train again.")
  try:
    if target is None:
      target = _local_target(checkpoints, step)
    return checkpoints.restore(step, args=ocp.args.StandardRestore(target))
  except Exception as e:  # orbax raises many types for damaged files
    raise CheckpointError(f"The checkpoint {path}/{step} cannot be read ({type(e).__name__}: {e}). "
                          "Delete that step folder to fall back to the previous one, or train again.") from None


def restore(workdir, category, target=None):
  """The latest checkpoint {'state', 'epoch'} of a trained category."""
  path = os.path.join(workdir, "checkpoints", category or "default")
  if not os.path.isdir(path):
    raise CheckpointError(f"No checkpoint for category '{category}' in {path}. Train first with "
                          f"--mode=train --workdir={workdir}.")
  with manager(workdir, category) as checkpoints:
    return restore_latest(checkpoints, target)


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
  for key in ("image_size", "crop_size", "calibration_fraction"):
    if trained["data"].get(key) != current["data"].get(key):
      differing.append(f"data.{key}")
  if differing:
    raise ConfigError(f"The config differs from the one {workdir} was trained with in {', '.join(differing)}. "
                      f"Use the same config file and overrides (saved in {path}), or a new --workdir.")


def prepare_workdir(workdir, config, mode):
  """Training writes the run config (after checking a resumed one matches); eval needs it."""
  os.makedirs(workdir, exist_ok=True)
  if mode == "train":
    if os.path.exists(os.path.join(workdir, RUN_CONFIG)):
      check_run_config(workdir, config)  # resuming: the model and data must be the same
    if parallel.is_main_process():
      write_run_config(workdir, config)
  else:
    check_run_config(workdir, config)

"""Checkpoints and the run-config guard: what a workdir holds and whether a config may use it.

Per category, an Orbax CheckpointManager under <workdir>/checkpoints/<category> keeps
{'state': the method's state, 'epoch': the last finished epoch}; <workdir>/config.json is the
config the workdir was trained with, so that eval, predict and resumed training refuse a
different model, and <workdir>/training_sets.json the images each category was trained on.
"""

import contextlib
import json
import os
import socket
import time

import filelock
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint.metadata import ArrayMetadata

from adjax import configlib, io_utils, methods, parallel
from adjax.errors import CheckpointError, ConfigError

RUN_CONFIG = "config.json"


def folder(workdir: str, category: str) -> str:
  """Where a category's checkpoints (or a group's, named so) live in workdir."""
  return os.path.join(workdir, "checkpoints", category or "default")


def manager(workdir: str, category: str) -> ocp.CheckpointManager:
  path = os.path.abspath(folder(workdir, category))
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


def exists(workdir, category) -> bool:
  """Whether a category has a finished checkpoint (of any epoch) in workdir."""
  path = folder(workdir, category)
  if not os.path.isdir(path):
    return False
  with manager(workdir, category) as checkpoints:
    return checkpoints.latest_step() is not None


def _checkpoint_folders(workdir) -> list:
  """The names of workdir's checkpoint folders: categories', and groups' trained together (together_*)."""
  root = os.path.join(workdir, "checkpoints")
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) if os.path.isdir(root) else []


def trained_categories(workdir) -> list:
  """The categories with a checkpoint folder in workdir (not the shared ones of categories trained together)."""
  return [d for d in _checkpoint_folders(workdir) if not d.startswith("together_")]


def has_checkpoints(workdir) -> bool:
  """Whether any category (or group trained together) of workdir has a finished checkpoint."""
  return any(exists(workdir, d) for d in _checkpoint_folders(workdir))


def restore(workdir, category, target=None):
  """The latest checkpoint {'state', 'epoch'} of a trained category."""
  path = folder(workdir, category)
  if not os.path.isdir(path):
    trained = trained_categories(workdir)
    raise CheckpointError(f"No checkpoint for category '{category}' in {path}. " + (
        f"{workdir} holds the trained categories {', '.join(trained)}: set --config.data.category to one of them."
        if trained else f"Train first with --mode=train --workdir={workdir}."))
  with manager(workdir, category) as checkpoints:
    return restore_latest(checkpoints, target)


def restore_trained(workdir, category, config, trains=True):
  """The latest checkpoint's state for eval and predict, saying which one it is and warning when
  training did not reach config.train.epochs."""
  restored = restore(workdir, category)
  epoch = int(restored["epoch"])
  path = folder(workdir, category)
  if trains and epoch + 1 < config.train.epochs:
    logging.warning("%s: using the checkpoint after epoch %d of %d in %s: training did not finish. Rerun "
                    "--mode=train with this workdir to continue it.", category, epoch + 1, config.train.epochs, path)
  else:
    logging.info("%s: using the checkpoint in %s%s", category, path,
                 f" (after epoch {epoch + 1} of {config.train.epochs})" if trains else "")
  return restored["state"]


TRAINING_SETS = "training_sets.json"  # per category: datasets.training_set_fingerprint at training


def recorded_training_sets(workdir) -> dict:
  """The training-set fingerprints workdir recorded at training, by category ({} before there were any)."""
  path = os.path.join(workdir, TRAINING_SETS)
  return io_utils.read_json(path) if os.path.exists(path) else {}


def _check_training_sets(workdir, current: dict, mode: str, fresh: bool) -> None:
  """Training records each category's training-set fingerprint; resuming it, or evaluating it (which
  sets the decision threshold again on the images held out in training), needs the same images: with
  others, a threshold image could be one the model trained on. Workdirs from before the record pass;
  `fresh` (training, nothing trained yet) records anew."""
  recorded = {} if fresh else recorded_training_sets(workdir)
  changed = [c for c in current if c in recorded and recorded[c]["sha256"] != current[c]["sha256"]]
  if changed:
    counts = "; ".join(f"{c}: {_counts(recorded[c])} then, {_counts(current[c])} now" for c in changed)
    raise ConfigError(f"The training images of {', '.join(changed)} are not the ones {workdir} was trained on "
                      f"({counts}; a file added, removed or renamed changes which images were held out). Restore "
                      "them, or train into a new --workdir.")
  if mode == "train" and parallel.is_main_process() and any(c not in recorded for c in current):
    io_utils.write_json(os.path.join(workdir, TRAINING_SETS), {**recorded, **current})


def _counts(fingerprint) -> str:
  return ", ".join(f"{n} {role.replace('_', '-')}" for role, n in fingerprint["images"].items()
                   if n or role == "train")


def write_run_config(workdir, config):
  io_utils.write_text(os.path.join(workdir, RUN_CONFIG), config.to_json_best_effort(indent=2))


# What must match between a workdir's config.json and a run using it: the model and how images
# become its input always; for training into it (resuming, or continuing with more epochs) also
# the data and the training settings, since a different one would silently train another model.
_SCORING_KEYS = [f"data.{k}" for k in ("resize", "image_size", "crop_size", "calibration_fraction",
                                        "threshold_fraction", "test_normals_fraction",
                                        "novel_categories")] + ["train.shared_model"]
_TRAINING_KEYS = ["data.name", "data.root", "train.batch_size", "seed"]


def _value(config: dict, key: str):
  node = config
  for part in key.split("."):
    node = node.get(part) if isinstance(node, dict) else None
  if node is None:
    node = configlib.ADDED_DEFAULTS.get(key)  # a config.json written before the key existed
  if key == "data.root" and node:
    node = os.path.abspath(os.path.expanduser(node))
  return node


def check_run_config(workdir, config, mode="eval"):
  """A run may use a workdir only with the model it was trained with (and, to train into it,
  the same data and training settings); raising train.epochs to continue is allowed."""
  path = os.path.join(workdir, RUN_CONFIG)
  if not os.path.exists(path):
    raise CheckpointError(f"{workdir} holds no trained run ({RUN_CONFIG} is missing). Train first with "
                          f"--mode=train --workdir={workdir}, or point --workdir at a trained run.")
  trained = json.load(open(path))
  current = json.loads(config.to_json_best_effort())
  same_result = set(methods.get(config.model.name).execution_keys)
  differing = [f"model.{k}" for k in sorted((set(trained["model"]) | set(current["model"])) - same_result)
               if _value(trained, f"model.{k}") != _value(current, f"model.{k}")]
  keys = _SCORING_KEYS + (_TRAINING_KEYS if mode == "train" else [])
  differing += [k for k in keys if _value(trained, k) != _value(current, k)]
  if differing:
    what = "trained with" if mode != "train" else "trained with (training into it continues that run)"
    raise ConfigError(f"The config differs from the one {workdir} was {what} in {', '.join(differing)}. "
                      f"Use the same config file and overrides (saved in {path}), or a new --workdir.")


def check_writable(workdir) -> None:
  """Before any work: the workdir is a folder this process can create and write in."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise CheckpointError(f"--workdir {workdir} is a file, not a folder. Give a folder path.")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".adjax_write_test")
    with open(probe, "w") as f:
      f.write("")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"--workdir {workdir} cannot be written ({e.strerror}). Give a folder you can write "
                          "to, or fix its permissions.") from None


LOCK = ".adjax.lock"  # held by the run using the workdir; LOCK + ".json" says which run that is


@contextlib.contextmanager
def workdir_lock(workdir, mode):
  """One train or eval run at a time in a workdir: a second one stops at once, naming the first,
  instead of mixing its checkpoints and reports into it. An OS file lock, so it is released however
  the holding process ends; process 0 of a multi-process run holds it for all. Where the filesystem
  refuses locks the run goes on unguarded, with a warning; on network filesystems whether a run on
  another host sees the lock depends on the filesystem."""
  if not parallel.is_main_process():
    yield
    return
  path = os.path.join(workdir, LOCK)
  lock = filelock.FileLock(path, timeout=0)
  try:
    lock.acquire()
  except filelock.Timeout:
    try:
      owner = io_utils.read_json(path + ".json")
      who = (f" ({owner['mode']}, process {owner['pid']} on {owner['host']}, started "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner['started']))})")
    except Exception:  # written just after the lock is taken: a run that is starting has none yet
      who = ""
    raise CheckpointError(f"Another adjax run{who} is using --workdir {workdir}. Wait for it to end, or give "
                          "another --workdir.") from None
  except (OSError, NotImplementedError) as e:
    logging.warning("%s cannot be locked (%s), so a second run started into this workdir would not be stopped.",
                    path, e)
    yield
    return
  try:
    io_utils.write_json(path + ".json", {"mode": mode, "pid": os.getpid(), "host": socket.gethostname(),
                                         "started": time.time()})
    yield
  finally:
    lock.release()


def prepare_workdir(workdir, config, mode, training_sets: dict):
  """Training writes the run config and the training sets (category -> datasets.training_set_fingerprint),
  after checking that a run already there is the same one (a workdir whose run stopped before its first
  checkpoint, e.g. on missing weights, takes a new config); eval needs both to match."""
  check_writable(workdir)
  fresh = mode == "train" and not has_checkpoints(workdir)
  if mode == "train":
    if os.path.exists(os.path.join(workdir, RUN_CONFIG)) and not fresh:
      check_run_config(workdir, config, mode)  # resuming: the model and data must be the same
    if parallel.is_main_process():
      write_run_config(workdir, config)
  else:
    check_run_config(workdir, config, mode)
  _check_training_sets(workdir, training_sets, mode, fresh)

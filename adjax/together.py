"""Several categories trained in one compiled program (train.categories_together).

For methods whose training is a head on cached features, every category of a run with the
same state shapes is one member of a group: the members' states are stacked on a leading
axis and one jitted step, vmapped over the members, advances all of them; each member draws
its batches from its own feature cache with its own key.

Members go in lockstep on their own solo schedules: global step t is step t of every
member's solo run (its epoch t // steps_per_epoch, that epoch's `train.epoch_order`, its key
fold_in(key, t)), so each member's training is its solo run's up to float rounding.
Uneven categories:
  - fewer images, so fewer steps an epoch and fewer in all: a member whose run has ended
    is masked out of the remaining steps (its state passes through unchanged);
  - an epoch's short last batch (n % batch_size records): the same step compiled for that
    batch size runs with only the members that need it unmasked. So a group compiles one
    program for full batches and one per distinct short size (at most batch_size - 1).
All members' caches are on the device at once: consecutive categories are grouped only while
their caches fit train.feature_cache_device_mb together (`chunks`).
The group's checkpoints (the stacked states, every train.checkpoint_every epochs of its
largest member) are its own; when the group has finished, every member's finished state
(finalize, calibrate) is saved as its solo run would, so eval, predict and export read it
unchanged, and a rerun leaves a category with a checkpoint of its own out of every group.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from adjax import caches, checkpoints, parallel, progress


def applies(config, method, num_categories: int) -> bool:
  """Whether train.categories_together can act: it is on, several categories, a method that
  trains a head on cached features, and one process."""
  if not config.train.get("categories_together", False) or num_categories < 2:
    return False
  if not method.trains or "images" in method.train_inputs or caches.feature_source(config, method) != "cache":
    logging.info("train.categories_together: %s trains on images or uncached features, so its categories "
                 "train one after another.", config.model.name)
    return False
  if jax.process_count() > 1:
    logging.info("train.categories_together: a multi-process run trains its categories one after another.")
    return False
  return True


def chunks(config, method, extractor, candidates: list) -> list:
  """The (split, key) candidates in consecutive runs whose device caches fit
  train.feature_cache_device_mb together (the members' caches live at once, where one after
  another holds one category's); a category alone in its run is left to the solo loop."""
  budget = config.train.feature_cache_device_mb * 2 ** 20
  out, current, used = [], [], 0
  for split, key in candidates:
    shapes = caches.cached_shapes(config, method, extractor, len(split.train))
    size = caches.nbytes([structs for structs, on_device in shapes.values() if on_device])
    if current and used + size > budget:
      out.append(current)
      current, used = [], 0
    current.append((split, key))
    used += size
  out.append(current)
  split_up = [c for c in out if len(c) > 1]
  if len(split_up) != 1 or len(split_up[0]) != len(candidates):
    logging.info("train.categories_together: %s (the groups' feature caches within train.feature_cache_device_mb "
                 "= %d MB)", "; ".join(", ".join(s.category for s, _ in c) + (" together" if len(c) > 1 else " alone")
                                      for c in out), config.train.feature_cache_device_mb)
  return [c for c in out if len(c) > 1]


def signature(prepared) -> tuple:
  """What members of one group share: the state's structure, shapes and dtypes and the cached
  arrays' per-record shapes, all caches on the device."""
  leaves, tree = jax.tree.flatten(prepared.state)
  cached = jax.tree.leaves(prepared.training_set.device)
  return (tree, tuple((np.shape(a), jnp.result_type(a)) for a in leaves),
          jax.tree.structure(prepared.training_set.device), tuple((a.shape[1:], a.dtype) for a in cached),
          not prepared.training_set.host)


def groups(prepared: list) -> list:
  """The prepared categories in groups of one signature, in run order; a category whose caches
  are (partly) on the host is a group of one."""
  by_signature = {}
  for p in prepared:
    sig = signature(p)
    by_signature.setdefault(sig if sig[-1] else id(p), []).append(p)
  out = list(by_signature.values())
  for group in out:
    if len(group) > 1:
      logging.info("Training %s together in one program (train.categories_together)",
                   ", ".join(p.category for p in group))
  lone = [g[0].category for g in out if len(g) == 1]
  if lone and len(lone) < len(prepared):
    logging.info("Training %s on its own: its state's shapes (or its caches' place) differ from the others'",
                 ", ".join(lone))
  return out


def schedule(config, sizes_n: list):
  """(rows (G, C, B) int32, sizes (G, C) int32, steps per epoch per member): member c's batch at
  global step t is rows[t, c, :sizes[t, c]], its solo run's batch t; size 0 after its last step."""
  from adjax import train  # the loop's epoch_order; imported here, train imports this module
  b, epochs = config.train.batch_size, config.train.epochs
  per_epoch = [-(-n // b) for n in sizes_n]
  total = max(epochs * s for s in per_epoch)
  rows = np.zeros((total, len(sizes_n), b), np.int32)
  sizes = np.zeros((total, len(sizes_n)), np.int32)
  for c, (n, steps) in enumerate(zip(sizes_n, per_epoch)):
    for epoch in range(epochs):
      order = train.epoch_order(config.seed, epoch, n)
      for i in range(steps):
        part = order[i * b:(i + 1) * b]
        rows[epoch * steps + i, c, :len(part)] = part
        sizes[epoch * steps + i, c] = len(part)
  return rows, sizes, per_epoch


def make_step(step_fn, mesh, batch_size: int):
  """One global step of every member whose batch at step t has `batch_size` records, as one
  jitted program (states donated); the other members' states pass through."""
  sharding = parallel.batch_sharding(mesh, batch_size)
  batch_spec = NamedSharding(mesh, P(None, "data")) if sharding.spec == P("data") else sharding

  def adjax_train_together(states, cached, subclass, rows, sizes, keys, t):  # the name shows in compile logs
    idx = jax.lax.dynamic_index_in_dim(rows, t, keepdims=False)[:, :batch_size]  # (C, b)
    members = [{**caches.take_rows(c, idx[i]), "subclass": s[idx[i]]} for i, (c, s) in enumerate(zip(cached, subclass))]
    batch = jax.lax.with_sharding_constraint(jax.tree.map(lambda *a: jnp.stack(a), *members), batch_spec)
    new, metrics = jax.vmap(lambda state, b, key: step_fn(state, b, key, t, None))(states, batch, keys)
    active = jax.lax.dynamic_index_in_dim(sizes, t, keepdims=False) == batch_size
    states = jax.tree.map(lambda a, b: jnp.where(active.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, states)
    return states, metrics
  return jax.jit(adjax_train_together, donate_argnums=0)


def train(config, step_fn, members: list, workdir: str) -> dict:
  """{category: finished state} of a group trained together; checkpointed and resumable."""
  from adjax import train as loop
  names = [p.category for p in members]
  label = "+".join(names)
  mesh = parallel.data_mesh()
  replicated = parallel.replicated(mesh)
  rows, sizes, per_epoch = schedule(config, [len(p.training_set.records) for p in members])
  total, epochs, longest = len(rows), config.train.epochs, max(per_epoch)
  put = lambda a: jax.device_put(a, replicated)
  cached = tuple(p.training_set.device for p in members)
  subclass = tuple(put(p.training_set.subclass) for p in members)
  rows_d, sizes_d = put(rows), put(sizes)
  keys = put(jnp.stack([p.train_key for p in members]))
  states = put(jax.tree.map(lambda *a: jnp.stack(a), *[p.state for p in members]))
  programs = {}
  start, saved = 0, None
  with checkpoints.manager(workdir, f"together_{label}") as manager:
    if manager.latest_step() is not None:
      restored = checkpoints.restore_latest(manager, target={"state": states, "epoch": 0})
      states, start = restored["state"], int(restored["epoch"]) + 1
      saved = start - 1
      logging.info("Resuming %s (trained together) from the checkpoint after step %d of %d", label, start, total)
    last_save = time.monotonic()
    log = _EpochLog(config, names, per_epoch)
    pending = []
    t = start
    with progress.bar(total - start, f"training {', '.join(names)} together", "step") as bar, \
        loop._interruptible(label, lambda: (t // longest, None if saved is None else saved // longest)):
      for t in range(start, total):
        for size in sorted(set(sizes[t].tolist()) - {0}, reverse=True):
          if size not in programs:
            programs[size] = make_step(step_fn, mesh, size)
          states, metrics = programs[size](states, cached, subclass, rows_d, sizes_d, keys, t)
          pending.append((t, size, metrics))
        bar.update(1)
        end_of_round = (t + 1) % longest == 0 or t == total - 1
        if end_of_round:
          log.add(sizes, jax.device_get(pending))
          pending = []
          due = (((t + 1) // longest) % config.train.checkpoint_every == 0
                 and time.monotonic() - last_save >= config.train.checkpoint_min_seconds)
          if due or t == total - 1:
            manager.save(t, args=ocp.args.StandardSave({"state": states, "epoch": t}))
            last_save, saved = time.monotonic(), t
    manager.wait_until_finished()
  out = {}
  for i, p in enumerate(members):
    state = p.finish(jax.tree.map(lambda a, i=i: a[i], states))
    checkpoints.save(workdir, p.category, epochs - 1, state)  # as its solo run's last checkpoint
    out[p.category] = state
  return out


class _EpochLog:
  """Each member's epoch means of its step metrics, logged every train.log_every of its epochs
  as its solo run logs them."""

  def __init__(self, config, names, per_epoch):
    self.config, self.names, self.per_epoch = config, names, per_epoch
    self.current = [[] for _ in names]

  def add(self, sizes, pending):
    for t, size, metrics in pending:
      for c, name in enumerate(self.names):
        if sizes[t, c] != size:
          continue
        self.current[c].append({k: float(v[c]) for k, v in metrics.items()})
        steps = self.per_epoch[c]
        if t % steps == steps - 1:
          epoch = t // steps
          means = {k: float(np.mean([m[k] for m in self.current[c]])) for k in self.current[c][0]}
          self.current[c] = []
          if (epoch + 1) % self.config.train.log_every == 0 or epoch == self.config.train.epochs - 1:
            logging.info("%s epoch %d/%d: %s", name, epoch + 1, self.config.train.epochs,
                         ", ".join(f"{k} {v:.4f}" for k, v in means.items()))

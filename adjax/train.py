"""The shared run loop, top to bottom: `run` reads and checks every category's data, then per
category fits the method (`fit_category`: caches, init, prepare, `train_gradient`'s checkpointed epochs,
finalize, calibrate) or restores it, scores the test images and writes the reports.

Methods are reached only through the protocol in adjax/methods/base.py; checkpoints and the
run-config guard are adjax/checkpoints.py, the training caches adjax/caches.py.
"""

import contextlib
import dataclasses
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from adjax import (
  caches,
  checkpoints,
  compile_ahead,
  configlib,
  evaluate,
  io_utils,
  methods,
  parallel,
  progress,
  together,
)
from adjax.data import datasets, synthetic, transforms
from adjax.errors import ConfigError, DataError, Interrupted


def resolve_root(config) -> str:
  if config.data.name == "synthetic" and not config.data.root:
    return synthetic.ensure_generated()
  return os.path.expanduser(config.data.root)


def load_splits(config, method) -> list:
  """Every requested category's split, all checked before any computation starts; a method
  that calibrates gets data.calibration_fraction of the test images (or, if its calibration_source
  is 'normals', of the normal training images) held out as its split; data.test_normals_fraction
  of the training images move to the test set as normals."""
  root = resolve_root(config)
  if config.data.name != "synthetic" and not config.data.root:
    raise ConfigError(f"data.root is empty: set --config.data.root to the {config.data.name} folder.")
  splits = []
  categories = datasets.categories_from_config(config.data.name, root, config.data.category)
  novel = configlib.novel_categories(config)
  absent = [n for n in novel if n not in categories]
  if absent:  # e.g. the paper's novel MVTec classes on a root holding only some categories
    shown = [c or datasets.root_category(root) for c in categories]  # "": a root that is one category
    logging.warning("data.novel_categories names %s, not among this run's categories (%s): not tested. If a "
                    "name is misspelt, the category it meant is trained on as a known one.", ", ".join(absent),
                    ", ".join(shown))
  if novel and not set(categories) - set(novel):
    raise ConfigError(f"Every category of the run ({', '.join(categories)}) is in data.novel_categories, so the "
                      "shared model has nothing to train on; leave at least one category out of it.")
  if categories == [""] and config.data.category.strip() not in ("", "all"):
    logging.info("data.category='%s' does not apply: the folder %s holds train/ itself, so it is one category.",
                 config.data.category, root)
  for category in categories:
    split = datasets.read_split(config.data.name, root, category)
    _log_geometry(config, split.category, datasets.validate(split))
    folders = {}
    for r in split.test:
      folders.setdefault(os.path.basename(os.path.dirname(r.path)), []).append(r.label)
    logging.info("%s test folders: %s", split.category, "; ".join(
        f"{name}: {'normal' if labels[0] == 0 else 'defect type'} ({len(labels)} images)"
        for name, labels in sorted(folders.items())))
    for name in sorted(f for f, labels in folders.items() if labels[0] == 1 and datasets.named_like_normal(f)):
      logging.warning("%s: test/%s is taken as a defect type, its images as anomalous. If they are normal images, "
                      "move them into test/good (a normal test folder is named good, ok or normal).",
                      split.category, name)
    if not any(r.label for r in split.test):
      logging.warning("%s: no anomalous test images (only %s), so image AUROC and the pixel metrics are undefined "
                      "and reported as null. Put defective images in test/<defect type>/.", split.category,
                      ", ".join(sorted(folders)))
    elif all(r.label for r in split.test) and not config.data.get("test_normals_fraction", 0.0):
      logging.warning("%s: no normal test images (only %s), so image AUROC is undefined and reported as null. Put "
                      "normal test images in test/good/.", split.category, ", ".join(sorted(folders)))
    if split.category not in novel:  # a novel category's training images only finalize and calibrate
      split = datasets.hold_out_normals(split, config.data.get("test_normals_fraction", 0.0), config.seed, "test")
    if method.calibrates and method.calibration_source == "normals":
      split = datasets.hold_out_normals(split, config.data.calibration_fraction, config.seed, "calibration")
    elif method.calibrates:
      split = datasets.hold_out_calibration(split, config.data.calibration_fraction, config.seed)
    split = datasets.hold_out_normals(split, config.data.threshold_fraction, config.seed)
    if split.category not in novel and len(split.train) < method.min_train_images:
      raise DataError(f"{split.category}: {len(split.train)} training image(s) left after the hold-outs, and "
                      f"model.name={config.model.name} needs at least {method.min_train_images}. Add normal "
                      "images to train/good, or lower data.threshold_fraction / data.calibration_fraction.")
    logging.info("Category %s: %d train, %d test (%d anomalous)%s%s%s", split.category, len(split.train),
                 len(split.test), sum(r.label for r in split.test),
                 f", {len(split.held_out)} normal training images held out for the decision threshold"
                 if split.held_out else "",
                 f", {len(split.calibration)} held out for calibration" if split.calibration else "",
                 f", unseen subclasses {split.unseen_subclasses}" if split.unseen_subclasses else "")
    if split.held_out and len(split.held_out) < 5:  # then a fifth or more of normal images score above the threshold
      n = len(split.held_out)
      logging.warning("%s: the decision threshold is the largest score of %d held-out normal image%s, so about 1 in "
                      "%d normal images will score above it%s. More normal training images, or a larger "
                      "data.threshold_fraction, make it tighter.", split.category, n, "s" * (n > 1), n + 1,
                      "; with one image there are no normalised scores" if n == 1 else "")
    splits.append(split)
  return splits


def _log_geometry(config, category, sizes) -> None:
  """Says at start-up what data.resize does to this category's images: how much of them a
  centre crop never scores, or how far squashing or padding changes their shape."""
  d = config.data
  aspects = sorted({round(max(w, h) / min(w, h), 2) for w, h in sizes})
  if d.resize == "crop":
    kept = np.asarray([transforms.kept_fraction(w, h, "crop", d.image_size, d.crop_size) for w, h in sizes])
    if kept.min() < 1.0:
      logging.warning("%s: data.resize=crop scores %.1f%% of an image's pixels on average (%.1f%% of the least "
                      "covered); the rest is never scored. data.resize=squash or pad scores whole images.",
                      category or "data", 100 * kept.mean(), 100 * kept.min())
  elif aspects[-1] >= 3.0 and d.resize == "squash":  # e.g. line-scan strips: the long side loses 3x more
    logging.warning("%s: data.resize=squash: whole images of aspect ratios %s..%s squashed to %dx%d, so the long "
                    "side is shrunk up to %.1f times more than the short one and defects narrow along it may vanish. "
                    "Cutting such images into near-square tiles (each tile an image) keeps their resolution; "
                    "data.resize=pad keeps their shape.", category or "data", aspects[0], aspects[-1],
                    d.image_size, d.image_size, aspects[-1])
  elif aspects[-1] > 1.0:
    logging.info("%s: data.resize=%s: whole images of aspect ratios %s..%s %s to %dx%d", category or "data",
                 d.resize, aspects[0], aspects[-1], "squashed" if d.resize == "squash" else "padded", d.image_size,
                 d.image_size)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The shuffled order of epoch `epoch`: a pure function of (seed, epoch), so resumes replay it."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def method_batch(batch, normalisation, extractor=None, frozen=None, xp=np):
  """A cached batch as the method takes it: uint8 images normalised to float32 and, when
  `frozen` (the extractor's variables) is given, the clean images' features added."""
  batch = dict(batch)
  if "images" in batch:
    batch["images"] = transforms.normalise_uint8(batch["images"], *normalisation, xp=xp)
  if frozen is not None:
    batch["features"] = extractor.fn(frozen, batch["images"])
  return batch


def train_step_fn(method, normalisation, extractor=None):
  """method.train_step as a plain function (state, batch, key, t, frozen) -> (state, metrics):
  the step's key fold_in(key, t) is derived inside it, and the images are normalised (and
  augmented by the method) there."""
  def adjax_train_step(state, batch, key, t, frozen):  # the name shows in JAX's compilation logs
    batch = method_batch(batch, normalisation, extractor, frozen, jax.numpy)
    return method.train_step(state, batch, jax.random.fold_in(key, t))
  return adjax_train_step


def make_train_step(method, normalisation, extractor=None):
  """train_step_fn as one jitted function, state donated: one dispatch per step."""
  return jax.jit(train_step_fn(method, normalisation, extractor), donate_argnums=0)


def make_init(method, normalisation, num_subclasses, extractor=None):
  """method.init as one jitted function of (sample, key, frozen): run op by op, Flax's
  initialisers compile dozens of small programs too quick for the persistent compilation
  cache to keep (benchmarks/README.md)."""
  def adjax_init(sample, key, frozen):
    return method.init(method_batch(sample, normalisation, extractor, frozen, jax.numpy), key, num_subclasses)
  return jax.jit(adjax_init)


def train_gradient(config, step, training_set, state, key, workdir, category, frozen=None, finish=None):
  """Epochs of `step` (make_train_step's), data-parallel over all devices, checkpointed and resumable.

  Randomness of step t is fold_in(key, t), the data order of epoch e is epoch_order(seed, e):
  an interrupted run restarted with the same workdir continues from its last checkpoint and
  ends with exactly the parameters of an uninterrupted run. `finish(state)` (finalize,
  calibrate) runs after the last epoch, before its checkpoint, so that the checkpoint a
  finished run leaves is the finished state; a run restarted with more epochs continues from it.
  """
  mesh = parallel.data_mesh()
  n = len(training_set.records)
  batch_size = config.train.batch_size
  steps_per_epoch = -(-n // batch_size)
  start_epoch = 0
  with checkpoints.manager(workdir, category) as manager:
    if manager.latest_step() is not None:
      restored = checkpoints.restore_latest(manager, target={"state": state, "epoch": 0})
      state, start_epoch = restored["state"], int(restored["epoch"]) + 1
      logging.info("Resuming %s from the checkpoint after epoch %d", category, start_epoch)
    state = jax.device_put(state, parallel.replicated(mesh))
    last_save = time.monotonic()
    saved_epoch, epoch = (start_epoch - 1 if start_epoch else None), start_epoch
    total_steps = max(0, config.train.epochs - start_epoch) * steps_per_epoch
    with progress.bar(total_steps, f"training {category}", "step") as bar, _interruptible(category, lambda: (
        epoch, saved_epoch)):
      for epoch in range(start_epoch, config.train.epochs):
        step_metrics = []
        for i, batch in enumerate(training_set.epoch(epoch_order(config.seed, epoch, n), batch_size)):
          state, metrics = step(state, parallel.put_batch(batch, mesh), key, epoch * steps_per_epoch + i, frozen)
          step_metrics.append(metrics)
          bar.update(1)
        # One transfer per epoch; summing on the device would dispatch (and compile) an add per step.
        step_metrics = jax.device_get(step_metrics)
        means = {k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]}
        bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()}, refresh=False)
        last = epoch == config.train.epochs - 1
        due = ((epoch + 1) % config.train.checkpoint_every == 0
               and time.monotonic() - last_save >= config.train.checkpoint_min_seconds)
        if last and finish is not None:
          state = finish(state)
        if last or due:
          manager.save(epoch, args=ocp.args.StandardSave({"state": state, "epoch": epoch}))
          last_save, saved_epoch = time.monotonic(), epoch
        if (epoch + 1) % config.train.log_every == 0 or last:
          logging.info("%s epoch %d/%d: %s", category, epoch + 1, config.train.epochs,
                       ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    manager.wait_until_finished()
  return state


@contextlib.contextmanager
def _interruptible(category, where):
  """Ctrl-C inside becomes errors.Interrupted(category, epoch, last saved epoch) = where()."""
  try:
    yield
  except KeyboardInterrupt as e:
    if isinstance(e, Interrupted):
      raise
    raise Interrupted(category, *where()) from None


def _log_subclasses(category, subclass_ids, subclass):
  num_subclasses = int(subclass.max()) + 1
  if len(subclass_ids) > 1 or num_subclasses > 1:
    counts = np.bincount(subclass, minlength=num_subclasses)
    names = subclass_ids if len(subclass_ids) == num_subclasses else [f"cluster{k}" for k in range(num_subclasses)]
    logging.info("%s: %d training subclasses %s", category, num_subclasses, dict(zip(names, counts.tolist())))


def _calibrator(config, method, extractor, split, scorer):
  """`calibrate(state)`: the method's calibration on the category's calibration split (or the state unchanged)."""
  def calibrate(state):
    if not method.calibrates:
      return state
    scored = evaluate.score_dataset(config, method, state, extractor, split.calibration,
                                    f"calibrating {split.category}", scorer, keep_images=True)
    return method.calibrate(state, {"scores": scored["scores"], "maps": scored["input_maps"],
                                    "labels": scored["labels"], "images": scored["images"]})
  return calibrate


def _subclass_ids(split) -> list:
  return sorted({r.subclass for r in split.train})  # experts exist for seen subclasses only


def _fit_parts(config, method, extractor, split, key, scorer):
  """What fitting one category needs besides its data: normalisation, subclass ids, the (init,
  train, assign) keys and `calibrate`."""
  return (method.normalisation(extractor), _subclass_ids(split), tuple(jax.random.split(key, 3)),
          _calibrator(config, method, extractor, split, scorer))


def fit_category(config, method, extractor, split, key, workdir, scorer=None):
  """The trained (and, if the method calibrates, calibrated) state of one category."""
  normalisation, subclass_ids, keys, calibrate = _fit_parts(config, method, extractor, split, key, scorer)
  if method.trains:
    return _train(config, method, extractor, normalisation, split, subclass_ids, keys, workdir, calibrate)
  training_set = caches.TrainingSet(config, method, extractor, split.train, subclass_ids, normalisation)
  data = {name: training_set.all_features() if name == "features" else np.asarray(training_set.host.get(
      name, training_set.device.get(name))) for name in method.train_inputs}
  state = calibrate(method.fit(method_batch(data, normalisation), keys[0], len(subclass_ids)))
  checkpoints.save(workdir, split.category, 0, state)  # a re-run replaces it
  return state


def _fit_together(config, method, extractor, splits, keys, workdir, scorer) -> dict:
  """{category: trained state} of the categories train.categories_together trains in one program
  (adjax/together.py); the others are left to fit_category. A category with a checkpoint of its
  own (finished, or a solo run's) is left out: it resumes on its own."""
  if not together.applies(config, method, len(splits)):
    return {}
  candidates = [(s, k) for s, k in zip(splits, keys) if not checkpoints.exists(workdir, s.category)]
  normalisation = method.normalisation(extractor)
  step_fn = train_step_fn(method, normalisation, extractor)
  states = {}
  for chunk in together.chunks(config, method, extractor, candidates):
    prepared = []
    for split, key in chunk:
      _, subclass_ids, fit_keys, calibrate = _fit_parts(config, method, extractor, split, key, scorer)
      prepared.append(_prepare(config, method, extractor, normalisation, split, subclass_ids, fit_keys, calibrate))
    for group in together.groups(prepared):
      if len(group) == 1:
        states[group[0].category] = _train_prepared(config, make_train_step(method, normalisation, extractor),
                                                    group[0], workdir)
      else:
        states.update(together.train(config, step_fn, group, workdir))
  return states


# The key of the shared model's (init, train, assign): no category's `jax.random.split` of the run key gives it.
SHARED_KEY_TAG = 0x5EED


def _fit_shared(config, method, extractor, splits, workdir, scorer) -> dict:
  """{category: finished state} under train.shared_model: one state trained on the union of the
  known categories' training images (each record's subclass is its category), then per
  category finalized on that category's own training images and calibrated on its own
  calibration split; the novel categories (data.novel_categories) are never trained on. The
  shared training resumes from its own checkpoints; once it has reached train.epochs, a category
  with a checkpoint of its own is restored, and every other one completed (a run continued with
  more epochs completes them all again)."""
  novel = set(configlib.novel_categories(config))
  known = [s.category for s in splits if s.category not in novel]
  name = "shared_" + "+".join(known)
  with checkpoints.manager(workdir, name) as manager:
    trained_epochs = -1 if manager.latest_step() is None else int(manager.latest_step())
  remaining = splits
  if trained_epochs >= config.train.epochs - 1:
    remaining = [s for s in splits if not checkpoints.exists(workdir, s.category)]
  finished = {s.category for s in splits} - {s.category for s in remaining}
  states = {c: checkpoints.restore_trained(workdir, c, config) for c in sorted(finished)}
  if not remaining:
    return states
  records = [dataclasses.replace(r, subclass=s.category) for s in splits if s.category in known for r in s.train]
  union = datasets.Split("+".join(known), records, [], False)
  normalisation = method.normalisation(extractor)
  step = make_train_step(method, normalisation, extractor)
  keys = tuple(jax.random.split(jax.random.fold_in(jax.random.key(config.seed), SHARED_KEY_TAG), 3))
  tested_novel = sorted(novel & {s.category for s in splits})
  logging.info("train.shared_model: one model trained on %s (%d images)%s", ", ".join(known), len(records),
               f"; novel, never trained on: {', '.join(tested_novel)}" if tested_novel else "")
  shared = _prepare(config, method, extractor, normalisation, union, known, keys, lambda state: state, step)
  state = train_gradient(config, step, shared.training_set, shared.state, shared.train_key, workdir, name,
                         shared.frozen)
  for split in remaining:
    calibrate = _calibrator(config, method, extractor, split, scorer)
    if split.category in known:  # its rows of the shared training cache
      own, rows = shared.training_set, np.flatnonzero(shared.training_set.subclass == known.index(split.category))
    else:
      own = caches.TrainingSet(config, method, extractor, split.train, _subclass_ids(split), normalisation)
      rows = np.arange(len(split.train))

    def batches(own=own, rows=rows):
      for batch in own.epoch(rows, config.train.batch_size):
        yield method_batch(batch, normalisation, extractor, shared.frozen, jax.numpy)

    states[split.category] = calibrate(method.finalize(state, batches()))
    checkpoints.save(workdir, split.category, config.train.epochs - 1, states[split.category])
    logging.info("%s: the shared model finalized%s on its %d training images", split.category,
                 " and calibrated" if method.calibrates else "", len(rows))
  return states


@dataclasses.dataclass
class Prepared:
  """One category ready for its first training step: its caches, initial (prepared) state, the
  key of its steps and `finish` (finalize, calibrate), as fit_category builds them."""
  category: str
  training_set: caches.TrainingSet
  state: object
  train_key: object
  frozen: object
  finish: object


def _prepare(config, method, extractor, normalisation, split, subclass_ids, keys, calibrate, step=None):
  """Caches, init and prepare of one category; with `step` (the solo loop's jitted step) the
  programs are compiled in the background while the caches are built."""
  init_key, train_key, assign_key = keys
  n = len(split.train)
  source = caches.feature_source(config, method)
  frozen = extractor.variables if source == "step" else None
  precompiling = None
  if step is not None and not method.derives_subclasses() and source != "pipeline":
    init_fn = make_init(method, normalisation, len(subclass_ids), extractor)  # else shapes depend on the data
    precompiling = compile_ahead.start(config, method, extractor, n, init_fn, init_key, step, train_key, frozen)
  training_set = caches.TrainingSet(config, method, extractor, split.train, subclass_ids, normalisation)
  if method.derives_subclasses():
    training_set.subclass = np.asarray(
        method.assign_subclasses(training_set.all_features(), training_set.subclass, assign_key), np.int32)
  _log_subclasses(split.category, subclass_ids, training_set.subclass)
  method.check_subclasses(int(training_set.subclass.max()) + 1, split.category)
  if precompiling is None:
    init_fn = make_init(method, normalisation, int(training_set.subclass.max()) + 1, extractor)
  else:
    precompiling.result()
  state = init_fn(training_set.sample(), init_key, frozen)
  if method.prepares():
    state = method.prepare(state, training_set.all_features(), split.category)

  def batches():  # a generator function: nothing is read unless finalize iterates it
    for batch in training_set.epoch(np.arange(n), config.train.batch_size):
      yield method_batch(batch, normalisation, extractor, frozen, jax.numpy)

  def finish(state):
    return calibrate(method.finalize(state, batches()))

  return Prepared(split.category, training_set, state, train_key, frozen, finish)


def _train(config, method, extractor, normalisation, split, subclass_ids, keys, workdir, calibrate):
  step = make_train_step(method, normalisation, extractor)
  return _train_prepared(config, step, _prepare(config, method, extractor, normalisation, split, subclass_ids, keys,
                                                calibrate, step), workdir)


def _train_prepared(config, step, p, workdir):
  """train_gradient's epochs for one Prepared category."""
  return train_gradient(config, step, p.training_set, p.state, p.train_key, workdir, p.category, p.frozen, p.finish)


def run(config, workdir: str, mode: str) -> dict:
  """train (then evaluate) or eval, one run at a time in a workdir; returns the metrics report."""
  configlib.validate(config)
  method = methods.build(config)
  checkpoints.check_writable(workdir)
  with checkpoints.workdir_lock(workdir, mode):
    return _run(config, method, workdir, mode)


def _run(config, method, workdir: str, mode: str) -> dict:
  splits = load_splits(config, method)
  root = resolve_root(config)
  checkpoints.prepare_workdir(workdir, config, mode,
                              {s.category: datasets.training_set_fingerprint(s, root) for s in splits})
  extractor = method.make_extractor()
  key = jax.random.key(config.seed)
  scorer = evaluate.make_scorer(config, method, extractor)  # one program for every category of the same shapes
  keys = []
  for _ in splits:
    key, sub = jax.random.split(key)  # split in eval mode too, so keys never depend on the mode
    keys.append(sub)
  trained = {}
  if mode == "train" and configlib.added(config, "train.shared_model"):
    trained = _fit_shared(config, method, extractor, splits, workdir, scorer)  # every category, never one alone
  elif mode == "train":
    trained = _fit_together(config, method, extractor, splits, keys, workdir, scorer)
  with evaluate.Reports() as reports:  # a category's metrics and overlays while the next one is scored
    for split, sub in zip(splits, keys):
      if split.category in trained:
        state = trained.pop(split.category)
      elif mode == "train":
        state = fit_category(config, method, extractor, split, sub, workdir, scorer)
      else:
        state = checkpoints.restore_trained(workdir, split.category, config, method.trains)
      decision = None
      if split.held_out:
        held = evaluate.score_dataset(config, method, state, extractor, split.held_out,
                                      f"threshold {split.category}", scorer)
        decision = evaluate.decision_rule(held, len(split.held_out))
        if parallel.is_main_process():
          io_utils.write_json(evaluate.decision_path(workdir, split.category), decision)
      scored = evaluate.score_dataset(config, method, state, extractor, split.test, f"scoring {split.category}",
                                      scorer)
      reports.submit(split, scored, config, decision, os.path.join(workdir, "overlays", split.category))
    per_category = reports.results()
  report = evaluate.summarise(per_category, configlib.novel_categories(config))
  if parallel.is_main_process():
    evaluate.write_reports(workdir, report, config)
  return report

"""The method protocol (adjax/methods/base.py): a contract every registered method keeps, and
the image-space and calibration paths through the real loop, shown with tests/toy_methods.py."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import resume
import toy_methods

from adjax import caches, checkpoints, configlib, evaluate, methods, train
from adjax.data import datasets, pipeline
from adjax.errors import ConfigError
from configs import adapted_moe, fegan, patch_knn, pfm, rsad, simplenet, triplet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
toy_methods.register()

SIZE = 32
BUILT_IN = {"patch_knn": patch_knn, "simplenet": simplenet, "rsad": rsad, "adapted_moe": adapted_moe, "pfm": pfm,
            "fegan": fegan, "triplet": triplet}


def small_config(name):
  """The method's default config at 32x32 with random backbone weights and narrow heads."""
  if name in BUILT_IN:
    c = BUILT_IN[name].get_config("")
    c.model.backbone_weights = "random"
    if "source_backbone" in c.model:
      c.model.backbone = c.model.source_backbone  # one backbone built, not two: the contract is the same
    c.data.image_size = c.data.crop_size = SIZE
    if name == "triplet":  # its network maps a 64-pixel patch to one embedding: no smaller input
      c.data.image_size, c.data.crop_size, c.model.scales, c.model.patches_per_scale = 64, 0, (1.0,), (2,)
    for key, value in (("dsc_hidden", None), ("routing_width", 8), ("mona_bottleneck", 8), ("latent", (4, 4, 4)),
                       ("width", 0.125)):
      if key in c.model:
        c.model[key] = tuple(16 for _ in c.model.dsc_hidden) if key == "dsc_hidden" else value
  else:
    c = toy_methods.config(name, size=SIZE)
    c.data.calibration_fraction = 0.25
  c.train.batch_size = 2
  return c


def test_every_method_is_registered_and_every_config_names_a_registered_method():
  assert set(BUILT_IN) <= set(methods.METHODS) | {"toy_autoencoder", "toy_calibrated"}
  for name, module in BUILT_IN.items():
    assert module.get_config("").model.name == name
  with pytest.raises(ConfigError, match="Unknown method 'nope'"):
    methods.get("nope")


# FEGAN's case under -m slow (~80 s on 2 cores): its end-to-end run through the loop (test_fegan.py)
# exercises the same stages in the default suite.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "fegan" else n
                                  for n in list(methods.METHODS) + ["toy_autoencoder", "toy_calibrated"]])
def test_method_contract(name, tmp_path):
  """build, init (or fit), one jitted training step, score shapes and dtypes, save and restore."""
  config = small_config(name)
  method = methods.build(config)
  extractor = method.make_extractor()
  assert (extractor is None) == ("features" not in method.train_inputs + method.score_inputs)
  normalisation = method.normalisation(extractor)
  rng = np.random.default_rng(0)
  side = configlib.input_size(config)
  images = rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)
  batch = {"subclass": np.zeros(2, np.int32)}
  if "images" in method.train_inputs:
    batch["images"] = images
  if "features" in method.train_inputs:
    batch["features"] = extractor(train.method_batch({"images": images}, normalisation)["images"])
  key = jax.random.key(0)
  if method.trains:
    init = train.make_init(method, normalisation, 1, extractor)
    state = init(caches.init_sample(batch), key, None)
    step = train.make_train_step(method, normalisation, extractor)
    before = jax.tree.map(np.array, state)
    state, metrics = step(state, batch, key, 0, None)
    assert np.isfinite(float(metrics["loss"]))
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state))]
    assert any(changed), "one training step changed nothing"
  else:
    state = method.fit(train.method_batch(jax.tree.map(np.asarray, batch), normalisation), key)
  scorer = evaluate.make_scorer(config, method, extractor)
  normalised = train.method_batch({"images": images}, normalisation)["images"]
  scores, maps, diagnostics = scorer(state, None if extractor is None else extractor.variables, normalised)
  assert all(v.shape[0] == 2 and v.ndim == 2 for v in diagnostics.values())
  assert scores.shape == (2,) and scores.dtype == np.float32
  assert maps.shape == (2, side, side) and maps.dtype == np.float32
  assert np.isfinite(np.asarray(maps)).all()
  checkpoints.save(str(tmp_path), "cat", 0, state)
  # Into the state's own structure (as training resumes) ...
  restored = checkpoints.restore(str(tmp_path), "cat", target={"state": state, "epoch": 0})["state"]
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # ... and without a target (as eval and predict do): plain containers that score the same.
  restored = checkpoints.restore(str(tmp_path), "cat")["state"]
  again = scorer(restored, None if extractor is None else extractor.variables, normalised)[0]
  np.testing.assert_array_equal(np.asarray(again), np.asarray(scores))


def test_methods_check_their_own_keys_when_built_before_anything_compiles():
  bad = small_config("pfm")
  bad.model.hierarchies = (3,)
  with pytest.raises(ConfigError, match="model.hierarchies"):
    methods.build(bad)
  bad = small_config("adapted_moe")
  bad.model.subclass_source = "clusters"
  with pytest.raises(ConfigError, match="model.subclass_source"):
    methods.build(bad)
  bad = small_config("toy_calibrated")
  bad.data.calibration_fraction = 0.0
  with pytest.raises(ConfigError, match="data.calibration_fraction"):
    methods.build(bad)


def test_image_cache_holds_uint8_that_normalise_on_device_to_the_pipelines_floats(synthetic_root):
  config = toy_methods.config("toy_autoencoder", size=SIZE)
  records = datasets.read_split("synthetic", synthetic_root, "wood").train[:5]
  method = methods.build(config)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  training_set = caches.TrainingSet(config, method, None, records, [""], (mean, std))
  cached = training_set.device["images"]
  assert isinstance(cached, jax.Array) and cached.dtype == np.uint8 and cached.shape == (5, SIZE, SIZE, 3)
  batch = next(training_set.epoch(np.array([3, 0, 4]), 3))
  assert batch["images"].dtype == np.uint8
  on_device = jax.jit(lambda b: train.method_batch(b, (mean, std), xp=jax.numpy))(batch)["images"]
  floats = next(iter(pipeline.make_dataset([records[i] for i in (3, 0, 4)], image_size=SIZE, crop_size=SIZE,
                                           mean=mean, std=std, batch_size=3, shard_index=0, shard_count=1)))
  np.testing.assert_allclose(np.asarray(on_device), floats["image"], rtol=1e-6, atol=1e-6)
  config.train.image_cache_device_mb = 0  # over budget: the same batches from the host
  host_set = caches.TrainingSet(config, method, None, records, [""], (mean, std))
  assert not host_set.device and host_set.host["images"].dtype == np.uint8
  np.testing.assert_array_equal(next(host_set.epoch(np.array([3, 0, 4]), 3))["images"], np.asarray(batch["images"]))


def test_augmentation_is_drawn_anew_at_every_step_from_the_steps_key():
  images = np.random.default_rng(0).uniform(size=(4, 8, 8, 3)).astype(np.float32)
  key = jax.random.key(1)
  first, second = (toy_methods.augment(images, jax.random.fold_in(key, t)) for t in (0, 1))
  assert not np.allclose(first, second)
  np.testing.assert_array_equal(first, toy_methods.augment(images, jax.random.fold_in(key, 0)))


def _params(workdir, category="wood"):
  from flax import traverse_util
  state = checkpoints.restore(str(workdir), category)["state"]
  return traverse_util.flatten_dict(jax.device_get(state["params"]), sep="/")


def test_image_space_training_resumes_to_the_uninterrupted_parameters(tmp_path, synthetic_root, monkeypatch):
  config = toy_methods.config("toy_autoencoder", size=SIZE, epochs=4)
  config.data.root = synthetic_root
  def saved_epochs_1_and_2(workdir):
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "wood")))[-1] == "1"

  resume.straight_and_resumed(config, tmp_path, monkeypatch, after_kill=saved_epochs_1_and_2)
  straight, resumed = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
  assert straight.keys() == resumed.keys()
  for name in straight:
    np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)


_DEVICES_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import jax, numpy as np
    import toy_methods
    from adjax import train
    toy_methods.register()
    config = toy_methods.config("toy_autoencoder", size={size}, epochs=2)
    config.data.root = {root!r}
    report = train.run(config, {workdir!r}, "train")
    print(json.dumps({{"devices": jax.device_count(), "image_auroc": report["wood"]["image_auroc"]}}))
""")


def _run_on_devices(tmp_path, devices, synthetic_root):
  workdir = tmp_path / f"devices{devices}"
  script = _DEVICES_SCRIPT.format(tests=os.path.dirname(__file__), size=SIZE, root=synthetic_root,
                                  workdir=str(workdir))
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": ROOT}
  done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  reported = json.loads(done.stdout.strip().splitlines()[-1])
  assert reported["devices"] == devices
  return _params(workdir), reported


def test_image_space_training_on_8_devices_matches_one(tmp_path, synthetic_root):
  """Batch 8 sharded over 8 forced CPU devices, augmentation inside the step: the same parameters."""
  one, one_report = _run_on_devices(tmp_path, 1, synthetic_root)
  eight, eight_report = _run_on_devices(tmp_path, 8, synthetic_root)
  for name in one:
    np.testing.assert_allclose(eight[name], one[name], rtol=1e-4, atol=1e-6, err_msg=name)
  assert eight_report["image_auroc"] == pytest.approx(one_report["image_auroc"], abs=0.02)


def test_calibration_split_is_held_out_of_the_test_set(tmp_path, synthetic_root, monkeypatch):
  config = toy_methods.config("toy_calibrated", size=SIZE)
  config.data.root, config.data.calibration_fraction = synthetic_root, 0.25
  full = datasets.read_split("synthetic", synthetic_root, "wood")
  scored_records = []
  score_dataset = evaluate.score_dataset
  monkeypatch.setattr(evaluate, "score_dataset", lambda *a, **k: scored_records.append((a[5], list(a[4])))
                      or score_dataset(*a, **k))
  toy_methods.ToyCalibrated.seen.clear()
  report = train.run(config, str(tmp_path), "train")
  (calibration_desc, calibration), (threshold_desc, held_out), (test_desc, test) = scored_records
  assert calibration_desc.startswith("calibrating") and test_desc.startswith("scoring")
  assert threshold_desc.startswith("threshold") and {r.label for r in held_out} == {0}
  assert {r.path for r in held_out} <= {r.path for r in full.train}  # the threshold's images: training normals
  calibration_paths, test_paths = {r.path for r in calibration}, {r.path for r in test}
  assert not calibration_paths & test_paths
  assert calibration_paths | test_paths == {r.path for r in full.test}
  labels = [r.label for r in calibration]
  assert 0 < sum(labels) < len(labels)  # both labels, about a quarter of each
  assert abs(len(calibration) - 0.25 * len(full.test)) <= 2
  seen = toy_methods.ToyCalibrated.seen[-1]
  np.testing.assert_array_equal(seen["labels"], labels)  # calibrate got the held-out split, nothing else
  state = checkpoints.restore(str(tmp_path), "wood")["state"]
  assert float(state["offset"]) == pytest.approx(float(seen["scores"][seen["labels"] == 0].mean()), rel=1e-5)
  evaluated = train.run(config, str(tmp_path), "eval")  # the calibrated state was saved
  assert evaluated["wood"]["image_auroc"] == report["wood"]["image_auroc"]
  held = datasets.hold_out_calibration(full, 0.25, config.seed)
  assert {r.path for r in held.calibration} == calibration_paths  # seeded: the same split every time
  assert dataclasses.replace(held, test=full.test, calibration=[]) == full
  # Calibration never reads a training image, and training never sees a held-out one.
  assert not calibration_paths & {r.path for r in full.train}

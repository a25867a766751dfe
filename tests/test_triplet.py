"""The triplet network (adjax/methods/triplet.py, configs/triplet.py): its shapes, residual crop,
random erasing, training objective, prototype and distance map, the SVM and its calibration
split, which never holds a test image."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from adjax import caches, methods, train
from adjax.data import augment, datasets
from adjax.errors import ConfigError, DataError
from adjax.methods import triplet
from configs import triplet as triplet_config


def test_a_64_patch_gives_one_embedding_and_a_1024_image_481_by_481():
  net = triplet.Embedding()
  params = jax.eval_shape(net.init, jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
  assert jax.eval_shape(net.apply, params, jnp.zeros((2, 64, 64, 1))).shape == (2, 1, 1, 16)
  assert jax.eval_shape(net.apply, params, jnp.zeros((1, 1024, 1024, 1))).shape == (1, 481, 481, 16)
  assert triplet.output_side(64) == 1 and triplet.output_side(1024) == 481


def test_residual_block_adds_its_input_cropped_by_two_on_every_side():
  block = triplet.ResidualBlock(4)
  x = jax.random.normal(jax.random.key(0), (1, 9, 11, 4))
  params = block.init(jax.random.key(1), x)
  zero = jax.tree.map(jnp.zeros_like, params)  # the convolutions add nothing: the output is the crop
  np.testing.assert_array_equal(np.asarray(block.apply(zero, x)), np.asarray(x)[:, 2:-2, 2:-2, :])
  convolved = block.apply(params, x) - x[:, 2:-2, 2:-2, :]
  assert convolved.shape == (1, 5, 7, 4) and float(jnp.abs(convolved).max()) > 0


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 9, 2)])
def test_max_pool_is_flax_max_pool_with_its_gradient_ties_included(shape):
  x = jnp.round(2 * jax.random.normal(jax.random.key(0), shape))  # small integers: windows with tied maxima
  reference = lambda x: nn.max_pool(x, (2, 2), (2, 2))  # noqa: E731 - valid windows: an odd last row/column dropped
  out, pull = jax.vjp(triplet.max_pool_2x2, x)
  want, want_pull = jax.vjp(reference, x)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  g = jax.random.normal(jax.random.key(1), out.shape)
  np.testing.assert_array_equal(np.asarray(pull(g)[0]), np.asarray(want_pull(g)[0]))
  b, h, w, c = shape
  windows = np.asarray(x)[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
  assert (np.sum(windows == windows.max(axis=(2, 4), keepdims=True), axis=(2, 4)) > 1).any()  # ties were tested


def test_random_erasing_changes_pixels_only_inside_its_rectangle():
  x = jax.random.uniform(jax.random.key(0), (6, 64, 64, 1))
  y, mask = augment.random_erasing(x, jax.random.key(1))
  x, y, mask = np.asarray(x), np.asarray(y), np.asarray(mask)
  np.testing.assert_array_equal(y[~mask], x[~mask])
  assert (y[mask] != x[mask]).mean() > 0.99
  for m in mask:  # one axis-aligned rectangle of 2-40% of the patch
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    assert m.sum() == len(rows) * len(cols) and m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    assert 0.01 < m.mean() < 0.45
  _, windowed = augment.random_erasing(jnp.asarray(x), jax.random.key(2), window=jnp.full((6,), 16.0))
  assert np.asarray(windowed).sum(axis=(1, 2)).max() <= 0.45 * 16 * 16  # area relative to a 16-pixel window


def test_copy_fill_pastes_a_rectangle_of_the_same_image():
  x = jax.random.uniform(jax.random.key(0), (6, 40, 48, 1))
  y, mask = augment.random_erasing(x, jax.random.key(1), fill="copy")
  x, y, mask = np.asarray(x), np.asarray(y), np.asarray(mask)
  np.testing.assert_array_equal(y[~mask], x[~mask])
  for image, out, m in zip(x, y, mask):  # the rectangle holds an equally large rectangle of the same image
    rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    patch = out[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = patch.shape[:2]
    sources = [(i, j) for i in range(40 - h + 1) for j in range(48 - w + 1)
               if np.array_equal(image[i:i + h, j:j + w], patch)]
    assert sources
  with pytest.raises(ValueError, match="fill"):
    augment.random_erasing(jnp.asarray(x), jax.random.key(1), fill="zeros")


@pytest.mark.parametrize("size", [(12, 10), (9, 10), (36, 6), (4, 3), (36, 30), (12, 7), (20, 11)])
def test_downscale_by_taps_equals_jax_image_resize(size):
  # factors 3x3, 4x3, 1x5, 9x10, none; (12, 7) and (20, 11) divide neither side: jax.image.resize itself
  x = jax.random.uniform(jax.random.key(0), (2, 36, 30, 3))
  expected = jax.image.resize(x, (2, *size, 3), method="linear", antialias=True)
  np.testing.assert_allclose(np.asarray(augment.downscale(x, *size)), np.asarray(expected), atol=1e-6)
  wide = jax.random.uniform(jax.random.key(1), (1, 64, 1024, 1))  # the triplet's scales: factors 2, 4, 8
  for factor in (2, 4, 8):
    np.testing.assert_allclose(np.asarray(augment.downscale(wide, 64 // factor, 1024 // factor)),
                               np.asarray(jax.image.resize(wide, (1, 64 // factor, 1024 // factor, 1), "linear",
                                                           antialias=True)), atol=1e-6)


def test_training_patches_in_chunks_give_the_one_pass_embeddings_and_gradients():
  chunked, whole = methods.build(_toy_config(train_chunk=5)), methods.build(_toy_config(train_chunk=0))
  patches = jax.random.uniform(jax.random.key(0), (12, 64, 64, 1))  # chunks of 5, 5 and 2
  params = whole.net.init(jax.random.key(1), patches[:1])["params"]
  calls = []
  chunked.embed = lambda params, x: calls.append(x.shape[0]) or whole.embed(params, x)
  weights = jnp.arange(1.0, 13.0)[:, None, None, None]  # each patch its own weight: the order counts
  loss = lambda method: lambda p: jnp.sum(weights * method.embed_patches(p, patches) ** 2)
  value, grads = jax.value_and_grad(loss(chunked))(params)
  assert calls == [5, 5, 2]
  expected_value, expected_grads = jax.value_and_grad(loss(whole))(params)
  np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):  # up to summation order
    assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())


def test_a_workdir_is_reused_with_another_train_chunk_but_not_another_model(tmp_path):
  from adjax import checkpoints
  trained = _toy_config(train_chunk=16)
  (tmp_path / "config.json").write_text(trained.to_json_best_effort())
  checkpoints.check_run_config(str(tmp_path), _toy_config(train_chunk=0), mode="train")
  with pytest.raises(ConfigError, match="model.filters"):
    checkpoints.check_run_config(str(tmp_path), _toy_config(train_chunk=0, filters=8))


def _toy_config(**model):
  c = triplet_config.get_config("")
  c.data.image_size = 64
  c.model.scales, c.model.patches_per_scale = (1.0,), (4,)
  for k, v in model.items():
    c.model[k] = v
  return c


def _stripes(n, seed=0):
  """Normal toy images: vertical stripes of random phase, RGB in [0, 1]."""
  rng = np.random.default_rng(seed)
  cols = np.arange(96)[None, :] + rng.integers(0, 8, (n, 1))
  gray = 0.5 + 0.4 * np.sign(np.sin(cols * np.pi / 4))
  return np.repeat(np.broadcast_to(gray[:, None, :, None], (n, 96, 96, 1)), 3, axis=-1)[:, :64, :64].astype(
      np.float32)


def test_training_on_a_toy_set_brings_the_positive_closer_than_the_erased_negative():
  method = methods.build(_toy_config())
  images = _stripes(8)
  state = method.init({"images": images[:1]}, jax.random.key(0))
  step = jax.jit(method.train_step)
  first = None
  for t in range(30):
    state, terms = step(state, {"images": images, "subclass": jnp.zeros(8, jnp.int32)}, jax.random.key(t))
    first = first or {k: float(v) for k, v in terms.items()}
  last = {k: float(v) for k, v in terms.items()}
  assert last["loss"] < 0.6 * first["loss"], (first, last)
  assert last["d2"] - last["d1"] > first["d2"] - first["d1"] and last["d1"] < last["d2"]


def test_triplet_loss_trains_the_aim_not_the_literal_target():
  # softmax(d1, d2)[0] falls as d1 falls below d2: minimising it pulls the positive in.
  near = triplet.triplet_loss(jnp.asarray([0.1]), jnp.asarray([2.0]), jnp.ones(1))
  far = triplet.triplet_loss(jnp.asarray([2.0]), jnp.asarray([0.1]), jnp.ones(1))
  assert float(near) < 0.2 and float(far) > 0.8
  masked = triplet.triplet_loss(jnp.asarray([0.1, 9.0]), jnp.asarray([2.0, 0.0]), jnp.asarray([1.0, 0.0]))
  np.testing.assert_allclose(float(masked), float(near), rtol=1e-6)  # a triplet without a partner image is ignored


def test_prototype_is_the_per_location_mean_and_the_map_its_distance_placed_at_window_centres():
  c = _toy_config(distance_scale="none")  # the paper's plain distance
  c.data.image_size = 72
  method = methods.build(c)
  images = _stripes(6)
  images = np.concatenate([images, images[:, :8]], axis=1)
  images = np.concatenate([images, images[:, :, :8]], axis=2)  # 72 x 72
  state = method.init({"images": images[:1]}, jax.random.key(0))
  state = method.finalize(state, [{"images": images[:4]}, {"images": images[4:]}])
  embeddings = np.asarray(method.embed(state["params"], triplet.grayscale(jnp.asarray(images))))
  assert embeddings.shape == (6, 5, 5, 16)
  np.testing.assert_allclose(np.asarray(state["prototype"]), embeddings.mean(axis=0), rtol=1e-5, atol=1e-6)
  scores, maps = method.score(state, {"images": jnp.asarray(images)}, (72, 72))
  distance = np.linalg.norm(embeddings - embeddings.mean(axis=0), axis=-1)
  assert maps.shape == (6, 72, 72)
  np.testing.assert_allclose(np.asarray(scores), distance.max(axis=(1, 2)) * float(state["svm"][1]), rtol=1e-5)
  # One hot window (2, 1) of a 5 x 5 map over a 72-pixel input: the 64-pixel window at (4, 2),
  # centred at pixel (35.5, 33.5).
  hot = np.zeros((1, 5, 5), np.float32)
  hot[0, 2, 1] = 1.0
  placed = np.asarray(triplet.window_map(jnp.asarray(hot), 72, 64))[0]
  rows, cols = np.nonzero(placed == placed.max())
  assert set(rows) == {35, 36} and set(cols) == {33, 34}


@pytest.mark.parametrize("shared", [False, True])
def test_spread_scaling_divides_each_distance_by_the_training_rms_distance_there_plus_its_mean(shared):
  c = _toy_config(distance_scale="spread")
  c.data.image_size = 72
  c.train.shared_model = shared
  method = methods.build(c)
  images = _stripes(6, seed=3)
  images = np.concatenate([images, images[:, :8]], axis=1)
  images = np.concatenate([images, images[:, :, :8]], axis=2)  # 72 x 72
  state = method.init({"images": images[:1]}, jax.random.key(0))
  assert ("spread" in state) == (not shared)  # a shared training checkpoint holds no finalize output
  state = method.finalize(state, [{"images": images[:4]}, {"images": images[4:]}])
  embeddings = np.asarray(method.embed(state["params"], triplet.grayscale(jnp.asarray(images))), np.float64)
  distance = np.linalg.norm(embeddings - embeddings.mean(axis=0), axis=-1)
  rms = np.sqrt((distance ** 2).mean(axis=0))
  np.testing.assert_allclose(np.asarray(state["spread"]), rms + rms.mean(), rtol=1e-4)
  scaled = np.asarray(method.distances(state, triplet.grayscale(jnp.asarray(images))))
  np.testing.assert_allclose(scaled, distance / (rms + rms.mean()), rtol=1e-4, atol=1e-6)


def test_linear_svm_is_the_hard_margin_separator_and_keeps_its_sign_when_classes_overlap():
  from sklearn.svm import SVC
  rng = np.random.default_rng(0)
  x = np.vstack([rng.normal([0, 0], 0.1, (20, 2)), rng.normal([2, 3], 0.1, (20, 2))])
  y = np.r_[np.zeros(20), np.ones(20)]
  w, b = triplet.linear_svm(x, y)
  reference = SVC(kernel="linear", C=1e8).fit(x, y)
  np.testing.assert_allclose(w, reference.coef_[0], rtol=1e-3)
  np.testing.assert_allclose(b, reference.intercept_[0], rtol=1e-3)
  overlapping = np.vstack([rng.normal([0, 0], 1.0, (18, 2)), rng.normal([1.5, 2.0], 1.0, (72, 2))])
  y = np.r_[np.zeros(18), np.ones(72)]
  w, b = triplet.linear_svm(overlapping, y)
  assert w[0] > 0 and w[1] > 0 and np.mean(((overlapping @ w + b) > 0) == (y == 1)) > 0.8


def test_the_nonnegative_svm_never_lets_a_larger_statistic_lower_the_score():
  """Peaks (erased copies: max up, mean barely) teach an unconstrained fit max minus mean;
  nonnegative=True keeps every weight >= 0 and still separates them."""
  rng = np.random.default_rng(1)
  top = rng.uniform(10, 70, 30)
  normal = np.column_stack([0.002 * top + rng.uniform(0, 0.01, 30), top])  # mean and max rise together
  peak = rng.uniform(60, 1200, 60)
  peaks = np.column_stack([rng.uniform(0.02, 0.06, 60), peak])  # a high max over an ordinary mean
  x, y = np.vstack([normal, peaks]), np.r_[np.zeros(30), np.ones(60)]
  free, _ = triplet.linear_svm(x, y)
  w, b = triplet.linear_svm(x, y, nonnegative=True)
  assert free[0] < 0 and (w >= 0).all() and w[1] > 0
  assert np.mean(((x @ w + b) > 0) == (y == 1)) > 0.9
  brighter = normal + [0.5, 0.0]  # farther from the prototype on average, same peak: never more normal
  assert (brighter @ w >= normal @ w).all()


def test_default_calibration_holds_out_training_normals_and_never_a_test_image(synthetic_root):
  c = triplet_config.get_config("")
  c.data.root, c.data.category = synthetic_root, "wood"
  method = methods.build(c)
  assert method.calibration_source == "normals"
  original = datasets.read_split("synthetic", synthetic_root, "wood")
  split = train.load_splits(c, method)[0]
  train_paths, test_paths = {r.path for r in original.train}, {r.path for r in original.test}
  calibration = {r.path for r in split.calibration}
  assert calibration and calibration <= train_paths and not calibration & test_paths
  assert all(r.label == 0 for r in split.calibration)
  assert not calibration & {r.path for r in split.train + split.held_out}
  assert {r.path for r in split.test} == test_paths  # every test image is still scored


@pytest.mark.parametrize("fill", ["noise", "copy"])
def test_calibrate_fits_the_svm_on_normals_against_their_erased_copies(fill):
  c = _toy_config(calibration_fill=fill)
  method = methods.build(c)
  images = _stripes(8)
  state = method.init({"images": images[:1]}, jax.random.key(0))
  step = jax.jit(method.train_step)
  for t in range(5):
    state, _ = step(state, {"images": images, "subclass": jnp.zeros(8, jnp.int32)}, jax.random.key(t))
  state = method.finalize(state, [{"images": images}])
  held = _stripes(6, seed=1)
  calibrated = method.calibrate(state, {"images": held, "labels": np.zeros(6, np.int32)})
  assert not np.array_equal(np.asarray(calibrated["svm"]), np.asarray(state["svm"]))
  clean = triplet.grayscale(jnp.asarray(held))
  erased = method.negatives(clean, jax.random.key(5))
  assert (np.asarray(erased) != np.asarray(clean)).any(axis=(1, 2, 3)).all()
  svm = np.asarray(calibrated["svm"])
  score = lambda gray: np.asarray(method.statistics(method.distances(calibrated, gray))) @ svm[:2] + svm[2]
  assert score(erased).mean() > score(clean).mean()


def test_the_known_class_protocol_moves_half_the_training_normals_to_the_test_set(synthetic_root):
  c = triplet_config.get_config("mvtec_ad")
  assert c.data.test_normals_fraction == 0.5 and c.data.image_size == 1024 and c.train.epochs == 40
  split = datasets.read_split("synthetic", synthetic_root, "metal")
  moved = datasets.hold_out_normals(split, 0.5, 0, "test")
  added = [r for r in moved.test if r.path in {t.path for t in split.train}]
  assert len(added) == len(split.train) - len(moved.train) and abs(len(added) - len(split.train) / 2) <= 3
  assert all(r.label == 0 and r.defect_type == "good" for r in added)
  assert moved.test[:len(split.test)] == split.test


@pytest.mark.parametrize("bad,match", [({"image_score": "median"}, "model.image_score"),
                                       ({"scales": (1.0, 0.25)}, "model.scales"),
                                       ({"patch_size": 32}, "model.patch_size"),
                                       ({"calibration_fill": "zeros"}, "model.calibration_fill"),
                                       ({"distance_scale": "std"}, "model.distance_scale"),
                                       ({"train_chunk": -1}, "model.train_chunk")])
def test_bad_keys_are_named(bad, match):
  from adjax.errors import ConfigError
  with pytest.raises(ConfigError, match=match):
    methods.build(_toy_config(**bad))


def _small_run_config(root, epochs):
  c = triplet_config.get_config("")
  c.data.root, c.data.category, c.data.image_size = root, "wood", 64
  c.data.novel_categories = ""  # one known category, so the shared network is wood's alone
  c.model.scales, c.model.patches_per_scale = (1.0,), (4,)
  c.train.epochs, c.train.batch_size = epochs, 8
  return c


_DEVICES_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import jax
from adjax import train
from test_triplet import _small_run_config
report = train.run(_small_run_config({root!r}, 2), {workdir!r}, "train")
print(json.dumps({{"devices": jax.device_count(), "image_auroc": report["wood"]["image_auroc"]}}))
"""


def _params(workdir):
  from flax import traverse_util

  from adjax import checkpoints
  state = checkpoints.restore(str(workdir), "wood")["state"]
  return traverse_util.flatten_dict(jax.device_get({"params": state["params"], "prototype": state["prototype"],
                                                    "svm": state["svm"]}), sep="/")


@pytest.mark.slow  # ~2 min on 2 cores; the loop's data parallelism for image-space methods is in test_protocol.py
def test_triplet_training_on_8_devices_matches_one(tmp_path, synthetic_root):
  import json
  import os
  import subprocess
  import sys
  tests = os.path.dirname(__file__)
  results = {}
  for devices in (1, 8):
    workdir = tmp_path / f"devices{devices}"
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": os.path.dirname(tests)}
    done = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT.format(tests=tests, root=synthetic_root,
                                                                      workdir=str(workdir))],
                          env=env, cwd=os.path.dirname(tests), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["devices"] == devices
    results[devices] = _params(workdir)
  # Summation order differs across 8 shards, and Adam turns a near-zero gradient's rounding into up to
  # one step (lr 1e-4): a few elements may differ by that much, no more, and almost all agree closely.
  for name in ("prototype", "svm"):  # functions of the parameters: close relative to their own scale
    value = np.asarray(results[1].pop(name))
    np.testing.assert_allclose(results[8][name], value, atol=1e-3 * np.abs(value).max(), err_msg=name)
  diffs = {name: np.abs(np.asarray(results[8][name]) - np.asarray(value)).ravel() for name, value in results[1].items()}
  for name, diff in diffs.items():
    assert diff.max() <= 1e-4, (name, diff.max())
  every = np.concatenate(list(diffs.values()))
  assert (every > 1e-5).mean() <= 0.01, (every > 1e-5).mean()


@pytest.mark.slow  # ~1.5 min on 2 cores; the loop's exact resume is in test_protocol.py
def test_triplet_training_killed_and_resumed_ends_with_the_uninterrupted_state(tmp_path, synthetic_root,
                                                                              monkeypatch):
  import resume
  config = _small_run_config(synthetic_root, 4)
  config.train.checkpoint_every, config.train.checkpoint_min_seconds = 1, 0.0
  resume.straight_and_resumed(config, tmp_path, monkeypatch)
  straight, resumed = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
  assert straight.keys() == resumed.keys()
  for name in straight:
    np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)


def test_paper_kfold_svm_scores_each_test_image_with_a_model_that_never_saw_it(monkeypatch):
  """svm=paper (Sec. III-E fits on the labelled test set): 5-fold, stratified, seeded; every
  reported score is out-of-fold; reported under its own key, and only for names the method has."""
  from adjax import evaluate
  from adjax import linear_svm as svm_module
  rng = np.random.default_rng(0)
  labels = np.array([0] * 30 + [1] * 12)
  x = np.concatenate([rng.normal(0, 1, (30, 2)), rng.normal(3, 1, (12, 2))])
  fitted = []
  fit = svm_module.linear_svm

  def recording(a, b):
    w, bias = fit(a, b)
    fitted.append(({tuple(r) for r in a}, w, bias))
    return w, bias
  monkeypatch.setattr(svm_module, "linear_svm", recording)
  scores = svm_module.out_of_fold_scores(x, labels, 5, seed=0)
  assert len(fitted) == 5
  for row, score in zip(x, scores):  # left out of exactly one of the five fits, and scored by that one
    outside = [(w, bias) for rows, w, bias in fitted if tuple(row) not in rows]
    assert len(outside) == 1 and score == pytest.approx(row @ outside[0][0] + outside[0][1])
  np.testing.assert_array_equal(scores, svm_module.out_of_fold_scores(x, labels, 5, seed=0))
  assert svm_module.out_of_fold_scores(x[:31], labels[:31], 5, seed=0) is None  # one anomalous image
  config = triplet_config.get_config("mvtec_ad,svm=paper")
  assert config.eval.paper_kfold_svm == "mean_distance,max_distance"
  assert triplet_config.get_config("").eval.paper_kfold_svm == ""
  diagnostics = {"image_score_mean_distance": x[:, :1], "image_score_max_distance": x[:, 1:]}
  report = evaluate.log_diagnostics("bottle", diagnostics, labels, config)
  assert report["image_auroc_paper_kfold_svm"] > 0.95  # well separated classes
  assert set(report) == {"image_auroc_paper_kfold_svm", "image_auroc_by_mean_distance", "image_auroc_by_max_distance"}
  from configs import simplenet as simplenet_config
  other = simplenet_config.get_config("")
  other.eval.paper_kfold_svm = "mean_distance"
  with pytest.raises(ConfigError, match="paper_kfold_svm"):
    methods.build(other)


def test_the_positive_comes_from_the_next_image_of_the_same_class_and_a_lone_image_gives_no_triplet():
  partner, paired = triplet.same_class_partner(jnp.asarray([0, 1, 0, 2, 1, 0]))
  np.testing.assert_array_equal(np.asarray(partner), [2, 4, 5, 3, 1, 0])
  np.testing.assert_array_equal(np.asarray(paired), [True, True, True, False, True, True])
  method = methods.build(_toy_config())
  gray = triplet.grayscale(jnp.asarray(_stripes(4)))
  *_, valid = method.sample_patches(gray, jnp.asarray([0, 0, 1, 2]), jax.random.key(0))
  rows = np.asarray(valid).reshape(4, 4)  # 4 patches per image, the images in a random order
  assert (rows == rows[:, :1]).all() and sorted(rows[:, 0]) == [0, 0, 1, 1]
  partner, paired = triplet.same_class_partner(jnp.asarray([3]))  # an epoch's one-image last batch
  assert np.asarray(partner).tolist() == [0] and not bool(paired[0])
  *_, valid = method.sample_patches(gray[:1], jnp.asarray([0]), jax.random.key(0))
  assert float(np.asarray(valid).max()) == 0.0


def test_a_category_with_fewer_than_two_training_images_is_refused_at_start_up(tmp_path):
  from PIL import Image
  rng = np.random.default_rng(0)
  for name in ("train/good/0.png", "train/good/1.png", "test/good/2.png", "test/bad/3.png"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
  c = triplet_config.get_config("")
  c.data.name, c.data.root, c.data.novel_categories = "folder", str(tmp_path), ""
  with pytest.raises(DataError, match="1 training image.*needs at least 2.*data.threshold_fraction"):
    train.load_splits(c, methods.build(c))  # two images, one held out for the SVM (calibration)


def test_a_batch_deals_its_scales_in_equal_shares_and_cuts_each_positive_where_its_anchor_is():
  c = _toy_config()
  c.data.image_size = 128
  c.model.scales, c.model.patches_per_scale = (1.0, 0.5), (6, 3)
  method = methods.build(c)
  assert method.scale_groups(5) == [3, 2] and methods.build(triplet_config.get_config("mvtec_ad")).scale_groups(
      16) == [4, 4, 4, 4]
  ramp = np.broadcast_to(np.linspace(0, 1, 128, dtype=np.float32)[None, :, None, None], (4, 128, 128, 1))
  gray = jnp.asarray(ramp)  # the same image four times
  a, pos, n, valid = method.sample_patches(gray, jnp.zeros(4, jnp.int32), jax.random.key(3))
  assert a.shape == pos.shape == n.shape == (2 * 6 + 2 * 3, 64, 64, 1) and float(valid.min()) == 1.0
  np.testing.assert_allclose(np.asarray(a), np.asarray(pos), atol=1e-6)  # same place and scale of an equal image
  steps = np.diff(np.asarray(a)[:, :, 0, 0], axis=1).mean(axis=1)  # the ramp's slope: 1/127 full size, twice halved
  np.testing.assert_allclose(np.sort(steps), [1 / 127] * 12 + [2 / 127] * 6, rtol=0.05)


def _shared_run_config(root, epochs=2):
  c = triplet_config.get_config("")  # one network on cloth and wood; metal novel
  c.data.root, c.data.image_size = root, 64
  c.model.scales, c.model.patches_per_scale = (1.0,), (4,)
  c.train.epochs, c.train.batch_size = epochs, 8
  c.data.test_normals_fraction = 0.25  # the known classes' protocol, so that the novel exemption shows
  return c


def test_one_network_trains_on_the_known_categories_and_each_category_gets_its_own_prototype_and_svm(
    tmp_path, synthetic_root, monkeypatch):
  """train.shared_model (Sec. III-A): one training run over cloth and wood, subclass = category;
  metal (novel) is never trained on, keeps its test normals, and is scored with its own prototype
  from its own training images; the report gives the known and novel means."""
  from adjax import checkpoints
  trained_on, full = [], train.train_gradient

  def recording(config, step, training_set, *args, **kwargs):
    trained_on.append((list(training_set.records), training_set.subclass.copy()))
    return full(config, step, training_set, *args, **kwargs)

  monkeypatch.setattr(train, "train_gradient", recording)
  config = _shared_run_config(synthetic_root)
  report = train.run(config, str(tmp_path), "train")
  assert len(trained_on) == 1  # one network
  records, subclass = trained_on[0]
  splits = {s.category: s for s in train.load_splits(config, methods.build(config))}
  assert sorted(r.path for r in records) == sorted(r.path for c in ("cloth", "wood") for r in splits[c].train)
  assert {r.category for r in records} == {"cloth", "wood"}
  np.testing.assert_array_equal(subclass, [("cloth", "wood").index(r.category) for r in records])
  metal = datasets.read_split("synthetic", synthetic_root, "metal")
  assert len(splits["metal"].test) == len(metal.test)  # no training normal moved to a novel class's test set
  assert len(splits["wood"].test) > len(datasets.read_split("synthetic", synthetic_root, "wood").test)
  states = {c: checkpoints.restore(str(tmp_path), c)["state"] for c in ("cloth", "wood", "metal")}
  for c in ("wood", "metal"):  # one network, a prototype and an SVM of each category's own
    for a, b in zip(jax.tree.leaves(states["cloth"]["params"]), jax.tree.leaves(states[c]["params"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(states[c]["prototype"]) - np.asarray(states["cloth"]["prototype"])).max() > 1e-3
    assert not np.array_equal(np.asarray(states[c]["svm"]), np.asarray(states["cloth"]["svm"]))
  method = methods.build(config)
  for c in ("cloth", "metal"):  # the per-location mean over exactly its own training images
    images = caches.decode_images(config, splits[c].train, c).astype(np.float32) / 255
    expected = method.finalize(states[c], [{"images": jnp.asarray(images)}])["prototype"]
    np.testing.assert_allclose(np.asarray(states[c]["prototype"]), np.asarray(expected), rtol=1e-4, atol=1e-5)
  assert report["metal"]["novel"] and "novel" not in report["cloth"]
  for group, names in (("mean_known", ("cloth", "wood")), ("mean_novel", ("metal",))):
    assert report[group]["image_auroc"] == pytest.approx(np.mean([report[n]["image_auroc"] for n in names]))
  assert "| metal (novel) |" in (tmp_path / "metrics.md").read_text()
  train.run(config, str(tmp_path), "train")  # finished: every category restored, nothing trained
  assert len(trained_on) == 1
  config.train.epochs = 3  # continued: the one network trains on, and every category is completed again
  train.run(config, str(tmp_path), "train")
  assert len(trained_on) == 2 and len(trained_on[1][0]) == len(records)
  more = {c: checkpoints.restore(str(tmp_path), c) for c in ("cloth", "wood", "metal")}
  assert {int(m["epoch"]) for m in more.values()} == {2}
  for c in ("wood", "metal"):
    for a, b in zip(jax.tree.leaves(more["cloth"]["state"]["params"]), jax.tree.leaves(more[c]["state"]["params"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(jax.tree.leaves(more["metal"]["state"]["params"])[0]),
                            np.asarray(jax.tree.leaves(states["metal"]["params"])[0]))


@pytest.mark.parametrize("change,match", [
    ({"train.shared_model": False}, "needs train.shared_model=true"),
    ({"data.novel_categories": "cloth,wood,metal"}, "nothing to train on"),
])
def test_bad_shared_model_settings_are_named(change, match, synthetic_root, tmp_path):
  config = _shared_run_config(synthetic_root)
  for key, value in change.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(ConfigError, match=match):
    train.run(config, str(tmp_path), "train")


def test_a_method_that_trains_per_category_refuses_the_shared_model():
  from configs import simplenet
  config = simplenet.get_config("")
  config.train.shared_model = True
  with pytest.raises(ConfigError, match="train.shared_model=false"):
    methods.build(config)


@pytest.mark.slow  # ~1.5 min on 2 cores
def test_shared_training_killed_and_resumed_ends_with_the_uninterrupted_states(tmp_path, synthetic_root, monkeypatch):
  import resume

  from adjax import checkpoints
  config = _shared_run_config(synthetic_root, epochs=4)
  config.train.checkpoint_every, config.train.checkpoint_min_seconds = 1, 0.0
  resume.straight_and_resumed(config, tmp_path, monkeypatch)
  for c in ("cloth", "wood", "metal"):
    straight = jax.device_get(checkpoints.restore(str(tmp_path / "straight"), c)["state"])
    resumed = jax.device_get(checkpoints.restore(str(tmp_path / "resumed"), c)["state"])
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=c)


def test_a_workdir_from_before_the_scoring_keys_reads_as_plain_distance_and_noise_fill(tmp_path):
  from adjax import checkpoints, json_config
  old = triplet_config.get_config("distance=plain,fill=noise")
  written = json.loads(old.to_json_best_effort())
  del written["model"]["distance_scale"], written["model"]["calibration_fill"]  # as written before the keys
  (tmp_path / "config.json").write_text(json.dumps(written))
  checkpoints.check_run_config(str(tmp_path), old)  # the settings it was trained with: accepted
  with pytest.raises(ConfigError, match="model.calibration_fill, model.distance_scale"):
    checkpoints.check_run_config(str(tmp_path), triplet_config.get_config(""))  # today's defaults: refused
  reloaded = json_config.get_config(str(tmp_path / "config.json"))
  assert triplet.distance_scale(reloaded) == "none" and triplet.calibration_fill(reloaded) == "noise"
  method = methods.build(reloaded)
  assert "spread" not in method.init({"images": np.zeros((1, 128, 128, 3), np.float32)}, jax.random.key(0))

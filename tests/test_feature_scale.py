"""model.feature_scale='auto' (issue 21): the noise-based methods scale each category's patch
features to the spread their noise sigma was chosen for, from the training features alone, and
keep the factor with the model."""

import logging

import jax
import numpy as np
import pytest

from adjax import caches, checkpoints, configlib, methods, train
from adjax.errors import ConfigError
from adjax.methods import common
from configs import adapted_moe, rsad, simplenet


def small(module, scale="auto"):
  c = module.get_config("")
  c.model.feature_scale = scale
  c.model.dsc_hidden = tuple(32 for _ in c.model.dsc_hidden)
  return c


def trained_scores(config, train_features, test_features, steps=25):
  method = methods.build(config)
  state = method.init({"features": train_features[:1]}, jax.random.key(0))
  if method.prepares():
    state = method.prepare(state, train_features, "toy")
  step = jax.jit(method.train_step)
  rng = np.random.default_rng(0)
  for t in range(steps):
    idx = rng.choice(len(train_features), 4, replace=False)
    state, _ = step(state, {"features": train_features[idx], "subclass": np.zeros(4, np.int32)}, jax.random.key(t))
  scores, maps = jax.jit(method.score)(state, {"features": test_features}, (8, 8))
  return np.asarray(scores), np.asarray(maps), float(state["feature_scale"])


def toy_features(seed=0):
  rng = np.random.default_rng(seed)
  spread = rng.uniform(2.0, 8.0, size=32)  # Lite0-like: about 20x WideResNet50's spread
  train_features = (rng.normal(size=(16, 6, 6, 32)) * spread).astype(np.float32)
  test_features = (rng.normal(size=(4, 6, 6, 32)) * spread * np.linspace(1, 2, 4)[:, None, None, None])
  return train_features, test_features.astype(np.float32)


# RSAD's run under -m slow (~20 s): it shares SimpleNet's FeatureScale mixin.
@pytest.mark.parametrize("module", [simplenet, pytest.param(rsad, marks=pytest.mark.slow)])
def test_auto_scale_makes_training_invariant_to_the_features_scale(module):
  train_features, test_features = toy_features()
  base_scores, base_maps, base_scale = trained_scores(small(module), train_features, test_features)
  scaled_scores, scaled_maps, scaled_scale = trained_scores(small(module), 7.3 * train_features, 7.3 * test_features)
  assert scaled_scale == pytest.approx(base_scale / 7.3, rel=1e-5)
  spread = common.feature_spread(train_features)
  assert base_scale == pytest.approx(configlib.WRN50_FEATURE_SPREAD / spread, rel=1e-5)
  np.testing.assert_allclose(scaled_maps, base_maps, rtol=2e-3, atol=2e-3 * np.abs(base_maps).max())
  assert np.ptp(base_scores) > 1e-3  # the scores are not trivially constant
  # A fixed factor sees the two feature scales as different data: the trained models differ.
  fixed, _, _ = trained_scores(small(module, "0.05"), train_features, test_features)
  fixed_scaled, _, _ = trained_scores(small(module, "0.05"), 7.3 * train_features, 7.3 * test_features)
  assert np.abs(fixed_scaled - fixed).max() > 20 * np.abs(scaled_scores - base_scores).max() + 1e-3


def test_feature_spread_is_the_median_per_dimension_std():
  rng = np.random.default_rng(1)
  spreads = np.asarray([0.5, 1.0, 2.0, 3.0, 9.0])
  features = rng.normal(size=(40, 10, 10, 5)) * spreads + 4.0
  assert common.feature_spread(features) == pytest.approx(2.0, rel=0.03)
  assert common.feature_spread(features, max_rows=1000) == pytest.approx(2.0, rel=0.08)  # strided subset


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan"])
def test_a_bad_feature_scale_is_refused_by_name(value):
  config = simplenet.get_config("")
  config.model.feature_scale = value
  with pytest.raises(ConfigError, match="model.feature_scale"):
    methods.build(config)


def test_defaults_auto_off_the_papers_backbone_and_one_on_it():
  for module, paper in ((simplenet, "mvtec_ad"), (rsad, "mpdd"), (adapted_moe, "texture_ad_cloth")):
    assert module.get_config("").model.feature_scale == "auto"
    assert module.get_config(paper).model.feature_scale == "1.0"  # the papers' WideResNet50 features as they are
    assert methods.build(module.get_config(paper)).fixed_feature_scale(module.get_config(paper).model) == 1.0
  assert simplenet.get_config("mvtec_ad_lite0").model.feature_scale == "auto"


def test_the_loop_fits_the_factor_on_the_training_features_and_keeps_it(tmp_path, synthetic_root, caplog):
  config = small(simplenet)
  config.data.root, config.data.category = synthetic_root, "wood"
  config.data.image_size = config.data.crop_size = 64
  config.train.epochs, config.eval.num_overlays = 1, 0
  caplog.set_level(logging.INFO)
  train.run(config, str(tmp_path), "train")
  method = methods.build(config)
  extractor = method.make_extractor()
  from adjax.data import datasets
  split = datasets.hold_out_normals(datasets.read_split("synthetic", synthetic_root, "wood"),
                                    config.data.threshold_fraction, config.seed)  # the images trained on
  features = caches.compute_features(config, extractor, split.train, "features", *method.normalisation(extractor))
  expected = config.model.feature_spread_target / common.feature_spread(features)
  stored = float(checkpoints.restore(str(tmp_path), "wood")["state"]["feature_scale"])
  assert stored == pytest.approx(expected, rel=1e-4)
  assert 0.005 < stored < 0.5  # Lite0's features are far wider than WideResNet50's
  assert any("wood: feature scale" in r.getMessage() and "(auto)" in r.getMessage() for r in caplog.records)

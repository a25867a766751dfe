"""RSAD's eq. 7 margins: on the pre-sigmoid output (default) the loss truncates to zero once
normal and noised features are told apart; read literally on the sigmoid it cannot."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))
import rsad as rsad_config  # noqa: E402

from adjax.methods import rsad  # noqa: E402


def _seg_losses(hinge_on_logits, steps=300):
  config = rsad_config.get_config("")
  config.model.aligner, config.model.dsc_hidden = "none", (32, 32)
  config.model.noise_std = 1.0  # noise far larger than the features: easily separable
  config.model.hinge_on_logits = hinge_on_logits
  features = np.random.default_rng(0).normal(0, 0.3, size=(4, 4, 4, 16)).astype(np.float32)
  state = rsad.init(config, features, jax.random.key(0))
  step = jax.jit(lambda s, k: rsad.train_step(config, s, {"features": features}, k))
  losses = []
  for i in range(steps):
    state, metrics = step(state, jax.random.key(i + 1))
    losses.append(float(metrics["seg_loss"]))
  return np.array(losses)


def test_margins_on_the_logit_truncate_to_zero_once_separated():
  losses = _seg_losses(hinge_on_logits=True)
  assert losses[:5].mean() > 0.5
  assert losses[-10:].mean() < 0.15  # measured ~0.06 after 300 steps


def test_literal_margins_on_the_sigmoid_can_never_go_below_one_half():
  # th- = -0.5 is unreachable for D in (0, 1): the fake term D + 0.5 is always active.
  losses = _seg_losses(hinge_on_logits=False)
  assert losses.min() >= 0.5 - 1e-6
  assert losses[-10:].mean() < losses[:10].mean() - 0.1  # it learns, but can only approach the floor


@pytest.mark.parametrize("hinge_on_logits", [True, False])
def test_anomaly_map_is_one_minus_the_sigmoid_normality(hinge_on_logits):
  config = rsad_config.get_config("")
  config.model.dsc_hidden, config.model.hinge_on_logits = (8, 8), hinge_on_logits
  features = np.random.default_rng(1).normal(size=(2, 3, 3, 16)).astype(np.float32)
  state = rsad.init(config, features, jax.random.key(0))
  image_scores, maps = rsad.score(config, state, features)
  assert maps.shape == (2, 3, 3)
  assert float(maps.min()) > 0.0 and float(maps.max()) < 1.0
  np.testing.assert_allclose(image_scores, maps.max(axis=(1, 2)), rtol=1e-6)

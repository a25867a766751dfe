"""Pieces shared by the noise-discriminator family (SimpleNet, RSAD, Adapted-MoE experts)."""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from adjax.errors import ConfigError


def torch_bias_init(fan_in: int):
  """torch.nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The reference
  implementations re-initialise only the weights (xavier normal), so biases keep this."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Discriminator(nn.Module):
  """MLP: per hidden width Linear + BatchNorm1d + LeakyReLU(0.2), then Linear(., 1, no bias).

  SimpleNet's official discriminator with hidden=(1024,); RSAD's three-layer version has
  two hidden layers (it applies its sigmoid to this module's output itself).
  """
  hidden: Sequence[int] = (1024,)

  @nn.compact
  def __call__(self, x, train: bool, first_layer_done: bool = False):
    """first_layer_done: x is already fc0's output (a caller that computed it more cheaply,
    see simplenet.first_layer_outputs); the module goes on from fc0's BatchNorm."""
    for i, width in enumerate(self.hidden):
      if not (i == 0 and first_layer_done):
        x = nn.Dense(width, kernel_init=nn.initializers.xavier_normal(), bias_init=torch_bias_init(x.shape[-1]),
                     name=f"fc{i}")(x)
      # torch BatchNorm1d: momentum 0.1 (flax 0.9), eps 1e-5, batch statistics while training.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    x = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.xavier_normal(), name="tail")(x)
    return x


def discriminate(discriminator, state, x):
  """A Discriminator's output (N,) for (N, C) inputs in inference mode, from a state holding its
  params under params['discriminator'] and its BatchNorm statistics as batch_stats."""
  variables = {"params": state["params"]["discriminator"], "batch_stats": state["batch_stats"]}
  return discriminator.apply(variables, x, train=False)[:, 0]


def truncated_l1(true_scores, fake_scores, th_pos, th_neg):
  """SimpleNet eq. 6 / RSAD eq. 7: max(0, th+ - D(q)) + max(0, -th- + D(q-)), averaged."""
  return jnp.mean(jnp.maximum(0.0, th_pos - true_scores)) + jnp.mean(jnp.maximum(0.0, fake_scores - th_neg))


def gradient_step(state, features, key, loss_fn, optimizer):
  """One optimiser step on loss_fn(params, batch_stats, features, key) -> (loss, (stats, metrics))."""
  grad_fn = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)
  (_, (batch_stats, metrics)), grads = grad_fn(state["params"], state["batch_stats"], features, key)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  return {**state, "params": optax.apply_updates(state["params"], updates), "batch_stats": batch_stats,
          "opt_state": opt_state, "step": state["step"] + 1}, metrics


def feature_spread(features, max_rows: int = 1 << 18) -> float:
  """Median over dimensions of the per-dimension std of patch features (..., C), over every
  location of every image (an evenly strided subset of at most max_rows locations)."""
  flat = np.asarray(features).reshape(-1, np.shape(features)[-1])
  flat = flat[::-(-len(flat) // max_rows)].astype(np.float64)
  return float(np.median(flat.std(axis=0)))


class FeatureScale:
  """A mixin for methods whose noise sigma and thresholds assume WideResNet50's feature scale:
  their patch features are multiplied by state['feature_scale'], a fixed
  model.feature_scale or, with 'auto', model.feature_spread_target / feature_spread(the
  category's training features), fitted once in `prepare` and kept with the model."""

  @classmethod
  def check_config(cls, config):
    super().check_config(config)
    cls.fixed_feature_scale(config.model)

  @classmethod
  def fixed_feature_scale(cls, model_config):
    """The number model.feature_scale gives, or None for 'auto'; a ConfigError otherwise."""
    text = str(model_config.feature_scale).strip()
    if text == "auto":
      return None
    try:
      value = float(text)
    except ValueError:
      value = float("nan")
    if not value > 0:
      raise ConfigError(f"model.feature_scale must be 'auto' or a positive number, not '{text}'.")
    return value

  def initial_feature_scale(self):
    fixed = self.fixed_feature_scale(self.config.model)
    return jnp.asarray(1.0 if fixed is None else fixed, jnp.float32)

  def prepares(self) -> bool:
    return self.fixed_feature_scale(self.config.model) is None

  def prepare(self, state, features, label=""):
    spread = feature_spread(features)
    if not spread > 0:
      raise ConfigError(f"{label}: model.feature_scale='auto' found training features with no spread (every "
                        "patch the same); set model.feature_scale to a number, or check the training images.")
    scale = self.config.model.feature_spread_target / spread
    logging.info("%s: feature scale %.4g (auto): the training features' median per-dimension std %.4g -> %.4g "
                 "(model.feature_spread_target)", label, scale, spread, self.config.model.feature_spread_target)
    return {**state, "feature_scale": jnp.asarray(scale, jnp.float32)}

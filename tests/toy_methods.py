"""Two toy methods that use the protocol's image-space and calibration paths through the real loop.

ToyAutoencoder: a two-layer convolutional autoencoder trained on the cached uint8 images,
each step augmenting its batch on the device (random flips and brightness, from the step's
key); anomaly map = per-pixel squared reconstruction error.
ToyFeatureHead: a linear head on cached patch features, plain SGD (so float rounding is not
amplified as Adam amplifies it on near-zero gradients), its loss depending on every row of the
batch, its size and the step's key: two runs with the same batches and keys give the same
parameters to float tolerance, and any other batch, order or key shows.
ToyCalibrated: statistics only (the training images' mean); after fitting it calibrates on
the held-out labelled split (an image-score offset and scale) and records what it saw.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adjax import methods
from adjax.methods import base


class _AE(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(8, (3, 3), strides=(2, 2), name="encode")(x))
    return nn.ConvTranspose(3, (3, 3), strides=(2, 2), name="decode")(h)


def augment(images, key):
  """Per image: a horizontal flip with probability 1/2 and a brightness shift in [-0.1, 0.1]."""
  flip_key, shift_key = jax.random.split(key)
  b = images.shape[0]
  flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
  images = jnp.where(flip, images[:, :, ::-1], images)
  return images + jax.random.uniform(shift_key, (b, 1, 1, 1), minval=-0.1, maxval=0.1)


class ToyAutoencoder(base.Method):
  train_inputs = ("images",)
  score_inputs = ("images",)

  def __init__(self, config):
    super().__init__(config)
    self.net = _AE()
    self.tx = optax.adam(1e-2)

  def make_extractor(self):
    return None

  def init(self, sample, key, num_subclasses=1):
    params = self.net.init(key, sample["images"])["params"]
    return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32)}

  def train_step(self, state, batch, key):
    x = augment(batch["images"], key)

    def loss_fn(params):
      return jnp.mean((self.net.apply({"params": params}, x) - x) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
            "step": state["step"] + 1}, {"loss": loss}

  def score(self, state, inputs, image_shape):
    x = inputs["images"]
    maps = jnp.mean((self.net.apply({"params": state["params"]}, x) - x) ** 2, axis=-1)
    return maps.max(axis=(1, 2)), maps


def _unit(features):
  """Each location's feature vector scaled to unit length: the head's step size then suits any backbone."""
  return features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-6)


class ToyFeatureHead(base.Method):
  train_inputs = ("features",)
  score_inputs = ("features",)

  def init(self, sample, key, num_subclasses=1):
    c = sample["features"].shape[-1]
    return {"w": 0.01 * jax.random.normal(key, (c,)), "b": jnp.zeros(()), "step": jnp.zeros((), jnp.int32)}

  def train_step(self, state, batch, key):
    x = _unit(batch["features"])
    target = jax.random.normal(key, x.shape[:1] + (1, 1))

    def loss_fn(w, b):
      return jnp.mean((x @ w + b - target) ** 2)

    loss, (gw, gb) = jax.value_and_grad(loss_fn, argnums=(0, 1))(state["w"], state["b"])
    return {"w": state["w"] - 0.1 * gw, "b": state["b"] - 0.1 * gb, "step": state["step"] + 1}, {"loss": loss}

  def score(self, state, inputs, image_shape):
    maps = jnp.abs(_unit(inputs["features"]) @ state["w"] + state["b"])
    return maps.max(axis=(1, 2)), maps


class ToyCalibrated(base.Method):
  train_inputs = ("images",)
  score_inputs = ("images",)
  trains = False
  calibrates = True
  seen = []  # what calibrate received, per call (the test inspects it)

  def make_extractor(self):
    return None

  def fit(self, data, key, num_subclasses=1):
    return {"mean": jnp.asarray(data["images"].mean(axis=0)), "offset": jnp.zeros(()), "scale": jnp.ones(())}

  def score(self, state, inputs, image_shape):
    maps = jnp.mean((inputs["images"] - state["mean"]) ** 2, axis=-1)
    return (maps.mean(axis=(1, 2)) - state["offset"]) * state["scale"], maps

  def calibrate(self, state, scored):
    type(self).seen.append({k: np.asarray(v) for k, v in scored.items()})
    normal = scored["scores"][scored["labels"] == 0]
    return {**state, "offset": jnp.asarray(normal.mean(), jnp.float32),
            "scale": jnp.asarray(1.0 / (normal.std() + 1e-6), jnp.float32)}


def register():
  methods.register("toy_autoencoder", ToyAutoencoder)
  methods.register("toy_calibrated", ToyCalibrated)
  methods.register("toy_feature_head", ToyFeatureHead)


def config(name, category="wood", size=32, epochs=3):
  """A small built-in-dataset config for a toy method (no backbone keys: none is used)."""
  from adjax import configlib
  c = configlib.base()
  for key in ("backbone", "backbone_weights", "layers", "dtype"):
    del c.model[key]
  c.model.name = name
  c.data.category = category
  c.data.image_size = c.data.crop_size = size
  c.train.epochs, c.train.batch_size, c.train.checkpoint_every, c.train.checkpoint_min_seconds = epochs, 8, 1, 0.0
  c.eval.num_overlays, c.eval.smoothing_sigma = 0, 0.0
  return c

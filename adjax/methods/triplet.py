"""Triplet network for surface anomaly detection (Tayeh, Aburakhia, Myers, Shami),
../shared/papers/triplet.md: a small residual CNN trained from scratch as a triplet network on
64x64 grayscale patches with random-erased negatives; a per-class prototype; a linear SVM on
the (mean, max) distance to it.

Preprocessing (Sec. III-B): the loop resizes images to data.image_size (1024 in the paper's
protocol); here they become grayscale (ITU-R BT.601 luma, as Keras' and PIL's conversions)
and are min-max scaled to [0, 1] per image, inside the jitted step and scorer.
Network (Sec. III-C, Fig. 5): three 3x3 valid convolutions (16 filters, ReLU), a 2x2 max-pool
of stride 2, then seven residual blocks of two 3x3 valid convolutions with ReLU whose output is
added to the block's input cropped by 2 pixels on every side. A 64x64 patch gives 1x1x16;
the network is fully convolutional, so a 1024x1024 image gives 481x481x16, location (i, j)
seeing the 64x64 window at (2i, 2j).
Training patches (Sec. III-B): each image is resized to one of model.scales (fractions of the
input side: 1024, 512, 256, 128 pixels in the paper) at random and gives model.patches_per_scale
(16, 16, 8, 8) random 64x64 patches, all on the device. The scales are dealt to a batch's images
as a random permutation of equal shares (each image's scale is uniform, as in the paper, but a
batch holds each scale equally often rather than independently), so that every step has the
same number of patches and no compute goes to unused slots: a batch of train.batch_size images
(16) is 4 x (16 + 16 + 8 + 8) = 192 triplets, the expected count of independent draws (Sec.
III-D's batch of 256 is the most a batch of 16 can give).
Triplets (Sec. IV-A): the paper says only that the anchor and the positive are normal patches
of one class. The anchor is a patch of one image; the positive is the patch at the same
position and scale of the next image of the batch of the same class (the batch's 'subclass':
a category's subclass, or, when one network trains on several categories (train.shared_model,
Sec. III-A's known classes), the category), so that normal variation at a location is what the
network learns to ignore, which is what the per-location prototype below measures against; an
image with no other image of its class in the batch gives no triplet. The negative is the
anchor with random erasing (Zhong et al., adjax/data/augment.py): it differs from the anchor
only by a local deviation.
Known and novel classes (Sec. III-A): with train.shared_model the network trains on the known
categories together; every category, novel ones (data.novel_categories) included, then gets its
prototype from its own normal training images and its SVM from its own held-out normals.
Loss (Sec. IV-A, IV-D): d1 = ||f(a) - f(p)||, d2 = ||f(a) - f(n)|| (eqs. 1-2), softmax over
(d1, d2), mean absolute error against a target. The paper writes the target [1, 0], which
pushes d1 above d2, against its own stated aim (a higher similarity for a and p); we train the
aim, as Hoffer and Ailon's triplet network that the paper cites does (softmax(d+, d-) -> (0, 1),
so d+ -> 0): target [0, 1]. The MAE over the two entries equals softmax(d1, d2)[0].
Prototype (Sec. III-E): "embedding a large amount of non-defective data of that class"; we
take the per-location mean embedding map of the category's training images at the scoring
resolution, because the distance map is compared location by location (MVTec objects are
aligned, and for textures the per-location mean tends to the global mean anyway).
Score: the per-location Euclidean distance to the prototype is the anomaly map (placed at the
centre of each location's 64x64 window, so that it covers the image as the network sees it);
the image score is a linear SVM (C = 1e8) on the map's mean and max. The paper fits that SVM on
the labelled test images; adjax fits it (`calibrate`) on normal training images held out of
training (data.calibration_fraction) against copies of them with one rectangle replaced, so no
real defect and no test label is ever seen. The rectangle is drawn as random erasing's and
filled (model.calibration_fill) with another rectangle of the same image ('copy', CutPaste, Li
et al. 2021: a defect made of the image's own content; our default) or with uniform noise
('noise', the training negatives' fill). Noise-filled copies are separated by a peak (their max
rises far more than their mean), so an unconstrained fit learns max minus mean, which ranks an
image that is farther from the prototype everywhere as more normal; model.svm_nonnegative (our
choice, on by default) keeps both weights >= 0, as befits two distances. model.image_score='mean'
or 'max' scores by the raw statistic.
Distance scale (model.distance_scale, ours; the paper's distance is plain Euclidean, 'none'):
'spread' (default) divides each location's distance by the training images' root mean square
distance to the prototype there plus that spread's mean over the map, so that the locations where
normal images vary (an object's rim when it sits a little off centre) do not set every image's
maximum, and a location where they never vary is scaled as an average one, not by ~0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from adjax import configlib
from adjax.backbones import layers
from adjax.data import augment
from adjax.errors import ConfigError
from adjax.linear_svm import linear_svm
from adjax.methods import base

IMAGE_SCORES = ("svm", "mean", "max")
CALIBRATION_FILLS = ("noise", "copy")  # the SVM's negatives: augment.random_erasing's fill
DISTANCE_SCALES = ("none", "spread")  # `finalize`


def output_side(side: int, stem: int = 3, blocks: int = 7) -> int:
  """The embedding map's side for an input side: valid 3x3 convolutions lose 2 pixels each,
  the pool halves, each residual block loses 4 (64 -> 1, 1024 -> 481)."""
  return (side - 2 * stem) // 2 - 4 * blocks


def _pool_windows(x):
  b, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x):
  """nn.max_pool(x, (2, 2), (2, 2)) (NHWC; an odd last row or column dropped), whose gradient goes
  to each window's first maximum in row-major order, as XLA's select-and-scatter does (ties
  included), computed as an argmax: on CPU far faster (benchmarks/README.md, triplet speed)."""
  # The maximum of the window's four strided corners: XLA:CPU ran the reshape-and-reduce form as a slower
  # YNNPACK reduction (benchmarks/README.md, triplet speed).
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  corner = lambda i, j: x[:, i:h:2, j:w:2]  # noqa: E731
  return jnp.maximum(jnp.maximum(corner(0, 0), corner(0, 1)), jnp.maximum(corner(1, 0), corner(1, 1)))


def _max_pool_fwd(x):
  return max_pool_2x2(x), x


def _max_pool_bwd(x, dy):
  b, h, w, c = x.shape
  windows = _pool_windows(x).transpose(0, 1, 3, 5, 2, 4).reshape(*dy.shape, 4)
  first = jnp.argmax(windows, axis=-1)  # argmax returns the first of equal maxima
  dx = jnp.where(jnp.arange(4) == first[..., None], dy[..., None], 0.0).astype(x.dtype)
  dx = dx.reshape(b, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(b, h // 2 * 2, w // 2 * 2, c)
  return (jnp.pad(dx, ((0, 0), (0, h - h // 2 * 2), (0, w - w // 2 * 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class ResidualBlock(nn.Module):
  filters: int = 16

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Conv(self.filters, (3, 3), padding="VALID", name="conv0")(x))
    y = nn.relu(nn.Conv(self.filters, (3, 3), padding="VALID", name="conv1")(y))
    return y + x[:, 2:-2, 2:-2, :]  # Fig. 5: the input cropped by 2 on every side


class Embedding(nn.Module):
  """Sec. III-C: (B, H, W, 1) grayscale in [0, 1] -> (B, h, w, filters), h = output_side(H)."""
  filters: int = 16
  stem: int = 3
  blocks: int = 7

  @nn.compact
  def __call__(self, x):
    for i in range(self.stem):  # the first has one input channel: layers.few_channel_conv
      x = nn.relu(nn.Conv(self.filters, (3, 3), padding="VALID", conv_general_dilated=layers.few_channel_conv,
                          name=f"stem{i}")(x))
    x = max_pool_2x2(x)
    for i in range(self.blocks):
      x = ResidualBlock(self.filters, name=f"block{i}")(x)
    return x


def distance_scale(config) -> str:
  return configlib.added(config, "model.distance_scale")


def calibration_fill(config) -> str:
  return configlib.added(config, "model.calibration_fill")


def grayscale(images):
  """(B, H, W, 3) RGB in [0, 1] -> (B, H, W, 1) luma, min-max scaled per image (Sec. III-B)."""
  # Written out rather than as a contraction over the channels, which XLA:CPU runs as a separate, slower product.
  g = (0.299 * images[..., 0] + 0.587 * images[..., 1] + 0.114 * images[..., 2])[..., None]
  lo = g.min(axis=(1, 2, 3), keepdims=True)
  hi = g.max(axis=(1, 2, 3), keepdims=True)
  return (g - lo) / jnp.maximum(hi - lo, 1e-6)


def distance(a, b):
  """eqs. 1-2: Euclidean distance over the last axis (an epsilon keeps its gradient finite at 0)."""
  return jnp.sqrt(jnp.sum((a - b) ** 2, axis=-1) + 1e-12)


def triplet_loss(d1, d2, valid):
  """MAE of softmax(d1, d2) against the target [0, 1] (the module docstring's reading), i.e. the
  masked mean of softmax(d1, d2)[0]."""
  p_positive = jax.nn.softmax(jnp.stack([d1, d2], axis=-1), axis=-1)[..., 0]
  return jnp.sum(p_positive * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def window_map(dist, side: int, patch: int):
  """(B, h, w) distances of the windows at stride 2 -> (B, side, side): upsampled by the stride
  and padded with edge values so that each value sits at its window's centre."""
  b, h, w = dist.shape
  up = jax.image.resize(dist, (b, 2 * h, 2 * w), method="linear", antialias=False)
  before = patch // 2 - 1  # resize puts output pixel k at window k / 2 - 1/4, whose centre is k + patch/2 - 1
  return jnp.pad(up, ((0, 0), (before, side - 2 * h - before), (before, side - 2 * w - before)), mode="edge")


def same_class_partner(subclass):
  """(partner (B,), paired (B,) bool): for image i the next image of the batch, cyclically, of its
  class; paired is false (partner i itself) when it is the only one of its class in the batch."""
  b = subclass.shape[0]
  if b == 1:  # a one-image batch (an epoch's last, say) has no partner
    return jnp.zeros(1, jnp.int32), jnp.zeros(1, bool)
  offsets = jnp.arange(1, b)
  candidates = (jnp.arange(b)[:, None] + offsets[None, :]) % b  # (B, B - 1), nearest first
  same = subclass[candidates] == subclass[:, None]
  first = jnp.argmax(same, axis=1)
  paired = same.any(axis=1)
  return jnp.where(paired, candidates[jnp.arange(b), first], jnp.arange(b)), paired


class Triplet(base.Method):
  train_inputs = ("images",)
  score_inputs = ("images",)
  calibrates = True
  calibration_source = "normals"
  shares_across_categories = True  # Sec. III-A: one network for the known classes
  alternative_scores = ("mean_distance", "max_distance")  # diagnostics' image_score_<name>
  execution_keys = ("train_chunk",)  # `embed_patches`: the same values in either order
  min_train_images = 2  # a triplet pairs two training images of one class (same_class_partner)

  @classmethod
  def check_config(cls, config):
    cls.check_choice("image_score", config.model.image_score, IMAGE_SCORES)
    if config.model.image_score == "svm":
      super().check_config(config)  # the SVM's held-out normals, and the alternative scores
    else:
      cls.check_alternative_scores(config)
    m = config.model
    cls.check_choice("distance_scale", distance_scale(config), DISTANCE_SCALES)
    cls.check_choice("calibration_fill", calibration_fill(config), CALIBRATION_FILLS)
    if len(tuple(m.scales)) != len(tuple(m.patches_per_scale)) or not tuple(m.scales):
      raise ConfigError(f"model.scales {tuple(m.scales)} and model.patches_per_scale {tuple(m.patches_per_scale)} "
                        "must be equally long and not empty (one patch count per training scale).")
    side = configlib.input_size(config)
    smallest = int(round(side * min(m.scales)))
    if smallest < m.patch_size:
      raise ConfigError(f"model.scales {tuple(m.scales)} resize the {side}-pixel input down to {smallest} pixels, "
                        f"smaller than one {m.patch_size}-pixel patch (model.patch_size): raise data.image_size or "
                        "drop the smallest scale.")
    chunk = configlib.added(config, "model.train_chunk")
    if not isinstance(chunk, int) or chunk < 0:
      raise ConfigError(f"model.train_chunk={chunk!r} must be a whole number >= 0 (patches per network pass in a "
                        "CPU training step; 0: all at once).")
    if output_side(m.patch_size, m.stem, m.blocks) != 1:
      raise ConfigError(f"model.patch_size={m.patch_size} must map to one embedding (1x1) through "
                        f"{m.stem} stem convolutions and {m.blocks} residual blocks; the paper's is 64.")

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.net = Embedding(m.filters, m.stem, m.blocks)
    self.tx = optax.adam(m.lr, b1=m.adam_b1, b2=m.adam_b2, eps=m.adam_eps)

  def make_extractor(self):
    return None  # trained from scratch on the images: no frozen network

  def init(self, sample, key, num_subclasses=1):
    m = self.config.model
    side = sample["images"].shape[1]
    params = self.net.init(key, jnp.zeros((1, m.patch_size, m.patch_size, 1)))["params"]
    h = output_side(side, m.stem, m.blocks)
    return {"params": params, "opt_state": self.tx.init(params), "step": jnp.zeros((), jnp.int32),
            "prototype": jnp.zeros((h, h, m.filters), jnp.float32),
            # A finished per-category checkpoint holds finalize's output, which a longer run resumes from;
            # shared training's checkpoints hold the training state alone (finalize adds the spread later).
            **({"spread": jnp.ones((h, h), jnp.float32)}
               if distance_scale(self.config) == "spread" and not configlib.added(self.config, "train.shared_model")
               else {}),
            # (w_mean, w_max, b) of the linear SVM; until `calibrate` the max distance alone
            "svm": jnp.asarray([0.0, 1.0, 0.0], jnp.float32)}

  def embed(self, params, gray):
    return self.net.apply({"params": params}, gray)

  def embed_patches(self, params, patches):
    """`embed` over the training patches, model.train_chunk at a time when the step runs on one CPU
    device: the same values (the network has no batch statistics), in an order XLA:CPU runs faster
    (benchmarks/README.md, triplet speed); elsewhere in one pass."""
    chunk, n = configlib.added(self.config, "model.train_chunk"), patches.shape[0]
    if not chunk or chunk >= n or jax.default_backend() != "cpu" or jax.device_count() > 1:
      return self.embed(params, patches)
    return jnp.concatenate([self.embed(params, patches[i:i + chunk]) for i in range(0, n, chunk)])

  def scale_groups(self, b: int) -> list:
    """How many of a batch's b images take each training scale: as equal as b allows."""
    n = len(self.config.model.scales)
    return [b // n + (i < b % n) for i in range(n)]

  def sample_patches(self, gray, subclass, key):
    """Anchors, positives, negatives (N, P, P, 1) and their validity (N,): the module docstring's
    training patches and triplets; N = sum over scales of its images times its patch count."""
    m = self.config.model
    b, side, p = gray.shape[0], gray.shape[1], m.patch_size
    k_order, k_pos, k_erase = jax.random.split(key, 3)
    order = jax.random.permutation(k_order, b)  # the images of each scale: a random, equal share
    partner, paired = same_class_partner(subclass)

    def cut(image, corners):
      return jax.vmap(lambda c: jax.lax.dynamic_slice(image, (c[0], c[1], 0), (p, p, 1)))(corners)

    anchors, positives, valid, start = [], [], [], 0
    for i, (fraction, count, g) in enumerate(zip(m.scales, m.patches_per_scale, self.scale_groups(b))):
      if g == 0:
        continue
      idx = order[start:start + g]
      start += g
      s = int(round(side * fraction))
      pair = jnp.concatenate([gray[idx], gray[partner[idx]]])  # anchors' images, then their positives'
      if s != side:
        pair = augment.downscale(pair, s, s)
      corner = (jax.random.uniform(jax.random.fold_in(k_pos, i), (g, count, 2)) * (s - p + 1)).astype(jnp.int32)
      anchors.append(jax.vmap(cut)(pair[:g], corner).reshape(g * count, p, p, 1))
      positives.append(jax.vmap(cut)(pair[g:], corner).reshape(g * count, p, p, 1))  # same place and scale
      valid.append(jnp.repeat(paired[idx], count))
    a, pos = jnp.concatenate(anchors), jnp.concatenate(positives)
    n = augment.random_erasing(a, k_erase, tuple(m.erase_area), tuple(m.erase_aspect))[0]
    return a, pos, n, jnp.concatenate(valid).astype(jnp.float32)

  def losses(self, params, gray, subclass, key):
    a, p, n, valid = self.sample_patches(gray, subclass, key)
    fa, fp, fn = jnp.split(self.embed_patches(params, jnp.concatenate([a, p, n]))[:, 0, 0, :], 3)
    d1, d2 = distance(fa, fp), distance(fa, fn)
    loss = triplet_loss(d1, d2, valid)
    count = jnp.maximum(valid.sum(), 1.0)
    return loss, {"loss": loss, "d1": jnp.sum(d1 * valid) / count, "d2": jnp.sum(d2 * valid) / count}

  def train_step(self, state, batch, key):
    gray = grayscale(batch["images"])
    (_, terms), grads = jax.value_and_grad(self.losses, has_aux=True)(state["params"], gray, batch["subclass"], key)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}, terms

  def distances(self, state, gray):
    """(B, h, w) per-location distance to the prototype (Sec. III-E), divided by the training
    images' spread there when model.distance_scale='spread' (`finalize`)."""
    d = distance(self.embed(state["params"], gray), state["prototype"][None])
    return d / state["spread"][None] if "spread" in state else d

  def statistics(self, dist):
    """(B, 2): each distance map's mean and max, the SVM's inputs."""
    return jnp.stack([dist.mean(axis=(1, 2)), dist.max(axis=(1, 2))], axis=-1)

  def score(self, state, inputs, image_shape):
    images = inputs["images"]
    dist = self.distances(state, grayscale(images))
    statistics = self.statistics(dist)
    kind = self.config.model.image_score
    scores = {"mean": statistics[:, 0], "max": statistics[:, 1],
              "svm": statistics @ state["svm"][:2] + state["svm"][2]}[kind]
    return scores, window_map(dist, images.shape[1], self.config.model.patch_size)

  def diagnostics(self, state, inputs):
    """The raw mean and max distances as other image scores: their AUROC needs no fit at all."""
    statistics = self.statistics(self.distances(state, grayscale(inputs["images"])))
    return {"image_score_mean_distance": statistics[:, :1], "image_score_max_distance": statistics[:, 1:]}

  def finalize(self, state, batches):
    """The prototype: the per-location mean embedding of the training images; with
    model.distance_scale='spread' also each location's spread, the root mean square distance of
    the training images' embeddings to the prototype there (E||e||^2 - ||E e||^2, one pass over
    `batches`), plus its mean over the locations (so that a location where the training images
    never vary is scaled as an average one, not by ~0)."""
    spread = distance_scale(self.config) == "spread"

    def sums(params, images):
      e = self.embed(params, grayscale(images))
      return e.sum(axis=0), (e ** 2).sum(axis=(0, 3)) if spread else None
    sums = jax.jit(sums)
    total, squares, count = None, 0.0, 0
    for batch in batches:
      part, square = sums(state["params"], batch["images"])
      total = part if total is None else total + part
      if spread:  # in float64 on the host: E||e||^2 - ||E e||^2 cancels
        squares = squares + np.asarray(square, np.float64)
      count += batch["images"].shape[0]
    state = {**state, "prototype": (total / count).astype(jnp.float32)}
    if not spread:
      return state
    mean = np.asarray(total, np.float64) / count
    rms = np.sqrt(np.maximum(squares / count - (mean ** 2).sum(axis=-1), 0.0))
    return {**state, "spread": jnp.asarray(rms + rms.mean(), jnp.float32)}

  def negatives(self, gray, key):
    """The SVM's negatives, copies of whole images with one rectangle replaced: drawn as random
    erasing's in training (area_range of a 64-pixel patch at one of the training scales, so
    model.patch_size / scale pixels of the input), at a uniform position, filled as
    model.calibration_fill says."""
    m = self.config.model
    k_scale, k_erase = jax.random.split(key)
    windows = m.patch_size / jnp.asarray(m.scales)[jax.random.randint(k_scale, (gray.shape[0],), 0, len(m.scales))]
    return augment.random_erasing(gray, k_erase, tuple(m.erase_area), tuple(m.erase_aspect), window=windows,
                                  fill=calibration_fill(self.config))[0]

  def calibrate(self, state, scored):
    """The linear SVM (`linear_svm`) on (mean, max) of the distance maps of held-out normal
    training images (class 0) and of their copies with a rectangle replaced (class 1, `negatives`)."""
    m = self.config.model

    statistics = jax.jit(lambda state, gray: self.statistics(self.distances(state, gray)))
    gray_of, erase = jax.jit(grayscale), jax.jit(self.negatives)
    images = np.asarray(scored["images"], np.float32)
    normal, erased = [], []
    key = jax.random.key(self.config.seed)
    for start in range(0, len(images), self.config.eval.batch_size):
      gray = gray_of(images[start:start + self.config.eval.batch_size])
      normal.append(np.asarray(statistics(state, gray)))  # once per image; only the erasures are redrawn
      for copy in range(m.calibration_copies):
        erased.append(np.asarray(statistics(state, erase(gray, jax.random.fold_in(key, copy * len(images) + start)))))
    x = np.concatenate(normal + erased).astype(np.float64)
    y = np.concatenate([np.zeros(sum(len(n) for n in normal)), np.ones(sum(len(e) for e in erased))])
    w, b = linear_svm(x, y, nonnegative=m.svm_nonnegative)
    accuracy = float(np.mean(((x @ w + b) > 0) == (y == 1)))
    logging.info("triplet SVM on %d held-out normal images and %d copies (rectangles filled with %s): %.3f * mean "
                 "+ %.3f * max %+.3f (training accuracy %.3f)", len(images), len(y) - len(images),
                 calibration_fill(self.config), w[0], w[1], b, accuracy)
    return {**state, "svm": jnp.asarray([w[0], w[1], b], jnp.float32)}


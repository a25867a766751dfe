"""FEGAN (Fan, Zhang, Dai; IEEE Access), ../shared/papers/fegan.md: a frozen feature extraction
network (FEN) beside an adversarially trained encoder-decoder fed M-SE-augmented images.

FEN (Sec. III-B): a frozen ImageNet backbone; theta*(x) is the output of VGG19's fifth
convolution block, tapped after its last ReLU and before pool5 ('stage5', 1/16 of the input):
the paper uses "the fifth convolution block" and the issue's 1/16 resolution, and the
encoder's fifth block (below) has no pooling after it either. The FEN sees the clean image,
so its features are cached once per dataset.
Generator (Sec. III-C): an encoder shaped like VGG19's five convolution blocks (3x3
convolutions, ReLU) with average instead of max pooling between them and no fully connected
layers; its fifth block is theta(x~). `model.width` scales its channels; when its width
differs from the FEN's (a width below 1, or an EfficientNet-Lite FEN) a 1x1 convolution
projects theta(x~) to the FEN's channels. Decoder: one deconvolution block of 4x4 stride-2
transposed convolutions (torch's ConvTranspose2d(4, 2, 1); BatchNorm + ReLU between) back to
the RGB image, linear output in the
normalised units of the input. `model.encoder_init='vgg19'` starts the encoder from VGG19's
ImageNet weights (the default of the paper protocol: the paper's encoder "capitalizes on the
deep feature extraction prowess of VGG19"); 'scratch' starts it randomly (needed for other
widths and FENs).
Discriminator: the paper does not describe it; a DCGAN-style one (Radford et al. 2016):
4x4 stride-2 convolutions, LeakyReLU 0.2, BatchNorm after the first (those convolutions without
bias, as DCGAN's), a 1-channel 4x4 output convolution averaged over positions (one logit per image at any input size).
Losses (Sec. III-E), each averaged over its elements: eq. 1 L_fea = mean over locations of
||theta*(x) - theta(x~)||_2 (the per-location distance eq. 6 scores), eq. 3 L_con =
mean |x - G(x~)|, eq. 4 L_adv as binary cross-entropy, the generator's in its non-saturating
form -log D(G(x~)); eq. 5 weights them 30 / 30 / 1. One jitted step updates the discriminator
and the generator, both from the same batch (the generator against the discriminator before
its update); the discriminator sees real and reconstructed batches in separate calls, as
DCGAN's and anomalib's GANomaly training steps do. Adam, lr 2e-4, L2 weight decay 1e-5
(torch Adam's) for both (Sec. IV-C).
M-SE (eq. 2, Sec. III-D) and Table 6's alternatives: adjax/data/augment.py, on the device.
Score (Sec. III-F): eq. 6 F = per-location ||theta*(x) - theta(x)||_2, upsampled bilinearly to
the image; eq. 7 R = per-pixel ||x - G(x)||_2 over the colour channels (at test time the
generator sees the image itself: x~ = x); eq. 8 S = 0.6 F + 0.4 R. F and R live on different
scales, so before eq. 8 each is divided by a scale taken from the training images
(`model.score_scale`): 'image_max' (default), the mean over training images of the term's
largest value in the image, so that lambda weights the two terms where eq. 10 reads S (its
maximum); 'mean', the term's mean over the training pixels, under which R's isolated peaks
(far more above its mean than F's are above F's; benchmarks/README.md, FEGAN) decide every
normal image's maximum whatever lambda says. Eq. 9's min and max are those of S over the
training images' pixels: read per test image, eq. 9 would make every image's maximum 1 and
eq. 10's image score (max of S) meaningless. All of these statistics come from training images
only (`finalize`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adjax.backbones import layers
from adjax.backbones.vgg import ARCHS
from adjax.data import augment
from adjax.errors import ConfigError
from adjax.methods import base

SCORE_SCALES = ("image_max", "mean")  # how F and R are brought to one scale before eq. 8
ROWS = ("full", "con", "con_mse", "con_mse_adv", "con_mse_fea")  # Table 7, top to bottom (full last there)


class Encoder(nn.Module):
  """VGG19's convolution blocks with average pooling; parameter names follow adjax's VGG
  (torchvision's `features` indices), so VGG19 ImageNet weights load into it."""
  width: float = 1.0

  @nn.compact
  def __call__(self, x):
    index = 0
    for stage, widths in enumerate(ARCHS["vgg19"], start=1):
      for w in widths:
        x = nn.relu(nn.Conv(max(1, int(w * self.width)), (3, 3), padding=((1, 1), (1, 1)), name=f"features_{index}")(x))
        index += 2
      if stage < 5:  # no pooling after the fifth block: theta is at 1/16 of the input
        x = nn.avg_pool(x, (2, 2), (2, 2))
      index += 1
    return x


class Decoder(nn.Module):
  """Four 4x4 stride-2 transposed convolutions: 1/16 of the input back to RGB at full size."""
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    for i, w in enumerate((256, 128, 64)):
      # No bias before a BatchNorm (as DCGAN): its mean subtraction cancels one, whose gradient is zero.
      x = layers.ConvTranspose4x4S2(max(1, int(w * self.width)), use_bias=False, name=f"deconv{i}")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i}")(x))
    return layers.ConvTranspose4x4S2(3, name="deconv3")(x)


class Generator(nn.Module):
  width: float
  feature_channels: int

  @nn.compact
  def __call__(self, x, train: bool):
    code = Encoder(self.width, name="encoder")(x)
    theta = code if code.shape[-1] == self.feature_channels else nn.Conv(self.feature_channels, (1, 1),
                                                                           name="project")(code)
    return Decoder(self.width, name="decoder")(code, train), theta


class Discriminator(nn.Module):
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool):
    for i, w in enumerate((64, 128, 256, 512)):
      x = layers.Conv4x4S2(max(1, int(w * self.width)), use_bias=i == 0, name=f"conv{i}")(x)
      if i > 0:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    return nn.Conv(1, (4, 4), padding=((1, 1), (1, 1)), name="out")(x).mean(axis=(1, 2, 3))


def feature_distance(a, b):
  """eq. 6: per-location L2 distance over channels, (B, h, w)."""
  return jnp.sqrt(jnp.sum((a - b) ** 2, axis=-1) + 1e-12)


def bce_logits(logits, target):
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, jnp.full_like(logits, target)))


class FEGAN(base.Method):
  train_inputs = ("images", "features")
  score_inputs = ("images", "features")

  @classmethod
  def check_config(cls, config):
    super().check_config(config)
    m = config.model
    cls.check_choice("augment", m.augment, augment.OPS)
    cls.check_choice("encoder_init", m.encoder_init, ("vgg19", "scratch"))
    if m.encoder_init == "vgg19" and m.width != 1.0:
      raise ConfigError(f"model.encoder_init='vgg19' loads VGG19's weights, which need model.width=1.0, not "
                        f"{m.width}; use encoder_init='scratch' for other widths.")
    from adjax import configlib
    if configlib.input_size(config) % 16:
      raise ConfigError(f"The input side ({configlib.input_size(config)}: data.image_size, or data.crop_size with "
                        "data.resize=crop) must be a multiple of 16: the encoder halves it "
                        "four times and the decoder doubles it back.")
    if len(tuple(m.layers)) != 1:
      raise ConfigError(f"model.layers {tuple(m.layers)} must name the FEN's one tap (VGG19: 'stage5').")
    from adjax import backbones
    spec = backbones.get_spec(m.backbone)
    if spec.strides[m.layers[0]] != 16:
      raise ConfigError(f"model.layers {tuple(m.layers)} of {m.backbone} is at stride "
                        f"{spec.strides[m.layers[0]]}; the generator's fifth block is at 1/16, so tap a layer "
                        "at stride 16 (VGG19 'stage5', EfficientNet-Lite 'stage5').")
    cls.check_choice("score_scale", m.score_scale, SCORE_SCALES)
    if not 0.0 <= m.score_lambda <= 1.0:
      raise ConfigError(f"model.score_lambda (eq. 8's lambda) must be in [0, 1], not {m.score_lambda}.")

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.discriminator = Discriminator(m.width)
    adam = optax.chain(optax.add_decayed_weights(m.weight_decay), optax.adam(m.lr, b1=m.adam_b1, b2=m.adam_b2,
                                                                                  eps=m.adam_eps))
    self.tx = adam  # one transform, applied to each network's parameters separately

  def make_extractor(self):
    from adjax.backbones.patch_features import make_tap_fn
    return make_tap_fn(self.config.model)

  def generator(self, feature_channels):
    return Generator(self.config.model.width, feature_channels)

  def augment(self, images, key):
    m = self.config.model
    op = augment.OPS[m.augment]
    if m.augment in ("mse", "cutout", "cutout_colour"):
      return op(images, key, total_fraction=m.augment_area, max_patch_fraction=m.max_patch_area)[0]
    return op(images, key)[0]

  def init(self, sample, key, num_subclasses=1):
    images, features = sample["images"], sample["features"]
    k_g, k_d = jax.random.split(key)
    g_vars = self.generator(features.shape[-1]).init(k_g, images, train=False)
    d_vars = self.discriminator.init(k_d, images, train=False)
    g_params = dict(g_vars["params"])
    if self.config.model.encoder_init == "vgg19":
      g_params["encoder"] = _vgg19_encoder_params()
    params = {"generator": g_params, "discriminator": d_vars["params"]}
    return {"params": params,
            "batch_stats": {"generator": g_vars["batch_stats"], "discriminator": d_vars["batch_stats"]},
            "opt_state": {k: self.tx.init(v) for k, v in params.items()}, "step": jnp.zeros((), jnp.int32),
            "score_stats": {k: jnp.asarray(v, jnp.float32) for k, v in
                            (("f_mean", 1.0), ("r_mean", 1.0), ("s_min", 0.0), ("s_max", 1.0))}}

  def generator_loss(self, g_params, g_stats, d_params, d_stats, images, features, key):
    """eq. 5 on one batch: (total, (terms, new generator BatchNorm stats, reconstruction))."""
    m = self.config.model
    augmented = self.augment(images, key) if m.use_mse else images
    (recon, theta), g_updates = self.generator(features.shape[-1]).apply(
        {"params": g_params, "batch_stats": g_stats}, augmented, train=True, mutable=["batch_stats"])
    terms = {"fea_loss": jnp.mean(feature_distance(features, theta)),  # eq. 1
             "con_loss": jnp.mean(jnp.abs(images - recon))}  # eq. 3
    total = m.lambda_con * terms["con_loss"] + (m.lambda_fea * terms["fea_loss"] if m.use_fen else 0.0)
    if m.use_discriminator:
      fake, _ = self.discriminator.apply({"params": d_params, "batch_stats": d_stats}, recon, train=True,
                                         mutable=["batch_stats"])
      terms["adv_loss"] = bce_logits(fake, 1.0)  # eq. 4 for G, non-saturating
      total = total + m.lambda_adv * terms["adv_loss"]
    terms["loss"] = total
    return total, (terms, g_updates["batch_stats"], recon)

  def discriminator_loss(self, d_params, d_stats, images, recon):
    """eq. 4 for D: the real images and the (detached) reconstructions in two calls, so that
    BatchNorm normalises each batch by its own statistics, as in the generator's pass over the
    reconstructions alone (a joint batch would let D separate them by statistics that the
    generator's pass never shows it); the running statistics are updated by both, in order."""
    variables = lambda stats: {"params": d_params, "batch_stats": stats}
    real, updates = self.discriminator.apply(variables(d_stats), images, train=True, mutable=["batch_stats"])
    fake, updates = self.discriminator.apply(variables(updates["batch_stats"]), jax.lax.stop_gradient(recon),
                                             train=True, mutable=["batch_stats"])
    return bce_logits(real, 1.0) + bce_logits(fake, 0.0), updates["batch_stats"]

  def train_step(self, state, batch, key):
    p, s, opt = state["params"], state["batch_stats"], state["opt_state"]
    images, features = batch["images"], batch["features"]
    (_, (terms, g_stats, recon)), g_grads = jax.value_and_grad(self.generator_loss, has_aux=True)(
        p["generator"], s["generator"], p["discriminator"], s["discriminator"], images, features, key)
    updates, g_opt = self.tx.update(g_grads, opt["generator"], p["generator"])
    params = {**p, "generator": optax.apply_updates(p["generator"], updates)}
    stats, opt_state = {**s, "generator": g_stats}, {**opt, "generator": g_opt}
    if self.config.model.use_discriminator:
      (d_loss, d_stats), d_grads = jax.value_and_grad(self.discriminator_loss, has_aux=True)(
          p["discriminator"], s["discriminator"], images, recon)
      updates, opt_state["discriminator"] = self.tx.update(d_grads, opt["discriminator"], p["discriminator"])
      params["discriminator"] = optax.apply_updates(p["discriminator"], updates)
      stats["discriminator"], terms = d_stats, {**terms, "d_loss": d_loss}
    return {**state, "params": params, "batch_stats": stats, "opt_state": opt_state, "step": state["step"] + 1}, terms

  def maps(self, state, images, features):
    """eq. 6 F (upsampled to the image) and eq. 7 R, (B, H, W) each, inference mode."""
    variables = {"params": state["params"]["generator"], "batch_stats": state["batch_stats"]["generator"]}
    recon, theta = self.generator(features.shape[-1]).apply(variables, images, train=False)
    b, h, w, _ = images.shape
    f = jax.image.resize(feature_distance(features, theta), (b, h, w), method="linear", antialias=False)
    r = jnp.sqrt(jnp.sum((images - recon) ** 2, axis=-1) + 1e-12)
    return f, r

  def combine(self, state, f, r):
    """eq. 8 on F and R divided by their training scales, then eq. 9 with the training min and max."""
    stats, lam = state["score_stats"], self.config.model.score_lambda
    s = lam * f / stats["f_scale"] + (1.0 - lam) * r / stats["r_scale"]
    return (s - stats["s_min"]) / jnp.maximum(stats["s_max"] - stats["s_min"], 1e-12)

  def score(self, state, inputs, image_shape):
    f, r = self.maps(state, inputs["images"], inputs["features"])
    s = self.combine(state, f, r)
    return s.max(axis=(1, 2)), s  # eq. 10

  def finalize(self, state, batches):
    """eq. 8-9's statistics from the training images: the scales of F and R, then S's range."""
    maps = jax.jit(self.maps)
    fs, rs = [], []
    for batch in batches:
      f, r = maps(state, batch["images"], batch["features"])
      fs.append(np.asarray(f))
      rs.append(np.asarray(r))
    f, r = np.concatenate(fs), np.concatenate(rs)
    m = self.config.model
    f_scale, r_scale = (scale(a, m.score_scale) for a in (f, r))
    s = m.score_lambda * f / f_scale + (1.0 - m.score_lambda) * r / r_scale
    stats = {"f_scale": f_scale, "r_scale": r_scale, "s_min": s.min(), "s_max": s.max()}
    return {**state, "score_stats": {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}}


def scale(maps: np.ndarray, kind: str) -> float:
  """A term's training scale over its (N, H, W) maps: the mean of the per-image maxima, or of all pixels."""
  return float(maps.reshape(len(maps), -1).max(axis=1).mean() if kind == "image_max" else maps.mean())


def _vgg19_encoder_params():
  """VGG19's ImageNet convolution weights in the encoder's layout (the same names)."""
  from adjax.backbones.weights import load_variables
  return jax.tree.map(jnp.asarray, load_variables("vgg19", "imagenet")["params"])

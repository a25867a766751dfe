"""RSAD (Li et al., Pattern Recognition Letters 2025): SimpleNet with a Mona feature aligner
and a focal loss.

Four stages (Sec. 3): patch features (frozen backbone) -> feature aligner (two Mona adapters,
eq. 5 and 10) -> defect feature fuser (Gaussian noise, eq. 6) -> three-layer MLP discriminator
with sigmoid, D = normality in (0, 1) ("positive values for normal features and negative values
for anomalous features" before the sigmoid, Sec. 3.4). Loss (eq. 7-9) = truncated L1 over locations
(th+ 0.5, th- -0.5) + focal loss on the anomaly 1 - D against 0 for normal and 1 for noised
features (per location by default; see `model.focal_on` below).
Adam 1e-4 (aligner) / 2e-4 (discriminator), weight decay 1e-5, batch 4, 160 epochs.

Where the paper is silent:
- Mona follows its reference implementation (Yin et al., "5%>100%", Mona), including
  torch's default initialisation of its Linear/Conv2d layers: scaled
  LayerNorm LN(x) * gamma + x * gammax (gamma = 1e-6, gammax = 1 at init), 1x1 down-
  projection to 64, depth-wise 3x3/5x5/7x7 convs averaged plus a skip, a 1x1 conv plus a
  skip, GeLU, dropout 0.1, 1x1 up-projection, and a skip around the whole adapter.
- The discriminator's hidden widths (1024, 1024) and BatchNorm + LeakyReLU(0.2) blocks
  follow SimpleNet's discriminator, which RSAD cites as its inspiration [32].
- The focal loss uses torchvision's sigmoid_focal_loss defaults (alpha 0.25, gamma 2).
- Anomaly map = 1 - D per location; image score = its maximum (Sec. 3.4).

Where the paper contradicts itself (`model.hinge_on_logits`): eq. 7 is SimpleNet's truncated
L1 with th+ = 0.5, th- = -0.5, but Sec. 3.4 puts a sigmoid on D; on D in (0, 1) th- is
unreachable, the loss's minimum is 0.5 and a constant D <= 0.5 is a flat plateau, on which
the literal reading stays (benchmarks/README.md). The margins mean something only on an
unbounded output, as in SimpleNet [32], so by default eq. 7 sees the pre-sigmoid logit and
the sigmoid gives the D of eq. 8 and the maps; `hinge_on_logits=False` is the literal reading.

Where the paper is ambiguous (`model.focal_on`): eq. 8's text puts the focal loss on the image
score S_AD against a ground truth written M_{x_i} (a mask's symbol), and Algorithm 1 (line 10)
calls the term "focal loss_loc". 'locations' (default, the pseudo-code's reading) applies it to
every location's anomaly 1 - D against 0 (clean) / 1 (noised); 'image' follows the text. The
default was chosen on training images only, by how fast clean and noised features separate
(benchmarks/noise_separation.py; figures in benchmarks/README.md): 'image' reaches one location
per image with its gradient.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from adjax.methods import base, common

# Mona's reference builds plain torch Linear/Conv2d layers and keeps their default init:
# weights U(+-1/sqrt(3 fan_in)) (kaiming_uniform with a = sqrt(5)), biases U(+-1/sqrt(fan_in)).
# Flax's defaults (lecun normal, zero bias) would make the adapter's initial residual about
# three times larger (two layers, each sqrt(3) larger).
TORCH_DEFAULT_KERNEL = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_dense(features, fan_in, name):
  return nn.Dense(features, kernel_init=TORCH_DEFAULT_KERNEL, bias_init=common.torch_bias_init(fan_in), name=name)


class MonaOp(nn.Module):
  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    convs = [nn.Conv(c, (k, k), padding=((k // 2, k // 2), (k // 2, k // 2)), feature_group_count=c,
                     kernel_init=TORCH_DEFAULT_KERNEL, bias_init=common.torch_bias_init(k * k),
                     name=f"conv{i + 1}")(x) for i, k in enumerate((3, 5, 7))]
    x = (convs[0] + convs[1] + convs[2]) / 3.0 + x
    return x + nn.Conv(c, (1, 1), kernel_init=TORCH_DEFAULT_KERNEL, bias_init=common.torch_bias_init(c),
                       name="projector")(x)


class Mona(nn.Module):
  """Multi-cognitive visual adapter on a (B, H, W, C) feature map."""
  bottleneck: int = 64
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool):
    c = x.shape[-1]
    gamma = self.param("gamma", nn.initializers.constant(1e-6), (c,))
    gammax = self.param("gammax", nn.initializers.ones, (c,))
    y = nn.LayerNorm(epsilon=1e-5, name="norm")(x) * gamma + x * gammax
    y = _torch_dense(self.bottleneck, c, "project1")(y)
    y = MonaOp(name="adapter_conv")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return x + _torch_dense(c, self.bottleneck, "project2")(y)


class TwoMonas(nn.Module):
  """RSAD's feature aligner: two Mona adapters in sequence, each with its own residual. Mona
  (Yin et al.) puts two adapters in every block it tunes, and RSAD's eq. 10 counts two:
  2 x ((2n + 3)m + n^2 + 84n + 2) parameters; the reference implementation adds per-channel
  (not scalar) LayerNorm scales and the convolutions' biases, 2 x (2m - 2 + 4n) more."""
  bottleneck: int = 64
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(2):
      x = Mona(self.bottleneck, self.dropout, name=f"mona{i}")(x, train)
    return x


class BiasFreeFC(nn.Module):
  """Table 5's 'FC layer' aligner: one bias-free linear map C -> C."""

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(x.shape[-1], use_bias=False, name="fc")(x)


class Identity(nn.Module):
  """Table 5's baseline without adapter."""

  @nn.compact
  def __call__(self, x, train: bool):
    return x


ALIGNERS = {"mona": TwoMonas, "fc": BiasFreeFC, "none": Identity}


FOCAL_TARGETS = ("image", "locations")


class RSAD(common.FeatureScale, base.Method):
  """Feature aligner + three-layer discriminator on cached patch features."""

  @classmethod
  def check_config(cls, config):
    super().check_config(config)
    cls.check_choice("aligner", config.model.aligner, sorted(ALIGNERS))
    cls.check_choice("focal_on", config.model.focal_on, FOCAL_TARGETS)

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.aligner = TwoMonas(m.mona_bottleneck, m.mona_dropout) if m.aligner == "mona" else ALIGNERS[m.aligner]()
    # It returns the logit; loss_fn and score apply the sigmoid, so that eq. 7 can see the logit.
    self.discriminator = common.Discriminator(tuple(m.dsc_hidden))
    adam = lambda lr: optax.chain(optax.add_decayed_weights(m.weight_decay), optax.adam(lr))  # torch Adam's L2
    self.tx = optax.multi_transform({"aligner": adam(m.aligner_lr), "discriminator": adam(m.dsc_lr)},
                                    {"aligner": "aligner", "discriminator": "discriminator"})

  def init(self, sample, key, num_subclasses=1):
    k1, k2 = jax.random.split(key)
    sample = jnp.zeros((1,) + tuple(sample["features"].shape[1:]), jnp.float32)
    aligner_params = self.aligner.init(k1, sample, train=False).get("params", {})
    dsc_vars = self.discriminator.init(k2, sample.reshape(-1, sample.shape[-1]), train=False)
    params = {"aligner": aligner_params, "discriminator": dsc_vars["params"]}
    return {"params": params, "batch_stats": dsc_vars["batch_stats"], "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32), "feature_scale": self.initial_feature_scale()}

  def loss_fn(self, params, batch_stats, features, key):
    m = self.config.model
    noise_key, dropout_key = jax.random.split(key)
    b, h, w, c = features.shape
    aligned = self.aligner.apply({"params": params["aligner"]}, features, train=True, rngs={"dropout": dropout_key})
    true = aligned.reshape(-1, c)
    fake = true + m.noise_std * jax.random.normal(noise_key, true.shape, true.dtype)  # eq. 6
    scores, updates = self.discriminator.apply({"params": params["discriminator"], "batch_stats": batch_stats},
                                               jnp.concatenate([true, fake]), train=True, mutable=["batch_stats"])
    true_logit, fake_logit = jnp.split(scores[:, 0], 2)
    true_d, fake_d = jax.nn.sigmoid(true_logit), jax.nn.sigmoid(fake_logit)
    if m.hinge_on_logits:  # see the module docstring
      seg = common.truncated_l1(true_logit, fake_logit, m.th_pos, m.th_neg)  # eq. 7 on the logit
    else:
      seg = common.truncated_l1(true_d, fake_d, m.th_pos, m.th_neg)  # eq. 7 read literally
    if m.focal_on == "image":
      # eq. 8 as its text reads: S_AD = max over locations of the anomaly (1 - D); normal
      # image -> 0, noised copy -> 1.
      anomaly = jnp.concatenate([(1 - true_d).reshape(b, -1).max(axis=1), (1 - fake_d).reshape(b, -1).max(axis=1)])
      targets = jnp.concatenate([jnp.zeros(b), jnp.ones(b)])
    else:
      # Algorithm 1, line 10 ("focal loss_loc") with eq. 8's ground truth M read as a mask:
      # per location, anomaly 1 - D against 0 (clean) / 1 (noised), averaged.
      anomaly = 1 - jnp.concatenate([true_d, fake_d])
      targets = jnp.concatenate([jnp.zeros_like(true_d), jnp.ones_like(fake_d)])
    cls = focal_loss(anomaly, targets, m.focal_alpha, m.focal_gamma)
    loss = seg + m.focal_weight * cls  # eq. 9 (weight 1); other weights are for diagnostics only
    return loss, (updates["batch_stats"], {"loss": loss, "seg_loss": seg, "focal_loss": cls})

  def train_step(self, state, batch, key):
    return common.gradient_step(state, batch["features"] * state["feature_scale"], key, self.loss_fn, self.tx)

  def adapt(self, state, features):
    """Aligned patch features (B*H*W, C) of (B, H, W, C) features (Mona works on the maps), inference mode."""
    aligned = self.aligner.apply({"params": state["params"]["aligner"]}, features, train=False)
    return aligned.reshape(-1, features.shape[-1])

  def discriminate(self, state, aligned):
    """The discriminator's pre-sigmoid normality logit for (N, C) aligned features, inference mode."""
    return common.discriminate(self.discriminator, state, aligned)

  def score(self, state, inputs, image_shape):
    features = inputs["features"] * state["feature_scale"]
    b, h, w, _ = features.shape
    maps = (1.0 - jax.nn.sigmoid(self.discriminate(state, self.adapt(state, features)))).reshape(b, h, w)
    return maps.max(axis=(1, 2)), maps


def focal_loss(probability, target, alpha, gamma):
  """Binary focal loss (Lin et al. 2017) on probabilities, as torchvision's sigmoid_focal_loss."""
  p = jnp.clip(probability, 1e-6, 1 - 1e-6)
  ce = -(target * jnp.log(p) + (1 - target) * jnp.log(1 - p))
  p_t = p * target + (1 - p) * (1 - target)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = loss * (alpha * target + (1 - alpha) * (1 - target))
  return jnp.mean(loss)

"""SimpleNet (Liu et al., CVPR 2023): the noise-discriminator baseline of RSAD and Adapted-MoE.

patch features -> feature adaptor (one linear layer) -> Gaussian noise in feature space
makes "anomalous" copies -> MLP discriminator -> truncated-L1 loss (Sec. 3.2-3.5):
    L = mean(max(0, th+ - D(q))) + mean(max(0, -th- + D(q + eps))),  eps ~ N(0, sigma^2 I)
Anomaly of a patch = -D(adaptor(feature)); image score = the largest patch anomaly.
Training computes the discriminator's first layer on [q; q + eps] in a folded form that
is the same function with half the matrix work (SimpleNet.first_layer_outputs).

Where the paper is silent this follows the official implementation (github DonaldRR/SimpleNet):
adaptor = 1 linear layer (pre_proj=1), AdamW lr 1e-4 (its lr 1e-3 * 0.1) with torch AdamW's
default weight decay 0.01; discriminator = Linear(C, 1024) + BatchNorm1d + LeakyReLU(0.2)
+ Linear(1024, 1, no bias), xavier-normal weights, Adam lr 2e-4 with (coupled) weight decay
1e-5; 40 meta-epochs x 4 discriminator epochs = 160 passes over the data, no LR schedule.
Unlike that code, adjax never picks the epoch with the best test AUROC: the final model
is reported.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from adjax.methods import base, common


class Adaptor(nn.Module):
  """The feature adaptor G: `layers` linear maps C -> C (official default: one)."""
  layers: int = 1

  @nn.compact
  def __call__(self, x):
    for i in range(self.layers):
      x = nn.Dense(x.shape[-1], kernel_init=nn.initializers.xavier_normal(),
                   bias_init=common.torch_bias_init(x.shape[-1]),
                   name=f"fc{i}")(x)
      if i < self.layers - 1:
        x = nn.leaky_relu(x, 0.2)
    return x


class SimpleNet(common.FeatureScale, base.Method):
  """Adaptor + noise discriminator on cached patch features."""

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.adaptor = Adaptor(m.adaptor_layers)
    self.discriminator = common.Discriminator(tuple(m.dsc_hidden))
    self.tx = optax.multi_transform({
        "adaptor": optax.adamw(m.adaptor_lr, weight_decay=m.adaptor_weight_decay),
        "discriminator": optax.chain(optax.add_decayed_weights(m.dsc_weight_decay), optax.adam(m.dsc_lr)),
    }, {"adaptor": "adaptor", "discriminator": "discriminator"})

  def init(self, sample, key, num_subclasses=1):
    c = sample["features"].shape[-1]
    k1, k2 = jax.random.split(key)
    dummy = jnp.zeros((2, c), jnp.float32)
    dsc_vars = self.discriminator.init(k2, dummy, train=False)
    params = {"adaptor": self.adaptor.init(k1, dummy)["params"], "discriminator": dsc_vars["params"]}
    return {"params": params, "batch_stats": dsc_vars["batch_stats"], "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32), "feature_scale": self.initial_feature_scale()}

  def first_layer_outputs(self, params, x, noise):
    """The discriminator's first dense layer (fc0: W1, c1) on [true; fake] = [G(x); G(x) + noise],
    for x (N, C), computed without forming either input. fc0 is linear, so
    fc0(G(x) + noise) = fc0(G(x)) + noise @ W1, and when the adaptor G is one linear layer
    (x @ P + b, the official default) the two maps fold into one: fc0(G(x)) = x @ (P @ W1) + (b @ W1 + c1),
    equal to the plain composition in exact arithmetic and half its matrix work for C = 1536
    and a 1024-wide fc0 (benchmarks/README.md has the measured step times)."""
    w1, c1 = params["discriminator"]["fc0"]["kernel"], params["discriminator"]["fc0"]["bias"]
    if self.config.model.adaptor_layers == 1:
      p, b = params["adaptor"]["fc0"]["kernel"], params["adaptor"]["fc0"]["bias"]
      true = x @ (p @ w1) + (b @ w1 + c1)
    else:
      true = self.adaptor.apply({"params": params["adaptor"]}, x) @ w1 + c1
    return jnp.concatenate([true, true + noise @ w1])

  def loss_fn(self, params, batch_stats, features, key):
    """Truncated-L1 loss of one batch of patch features (B, H, W, C); returns (loss, (stats, metrics))."""
    m = self.config.model
    x = features.reshape(-1, features.shape[-1])
    noise = m.noise_std * jax.random.normal(key, x.shape, x.dtype)  # the adaptor keeps C
    # One discriminator pass over [true; fake], as the reference does: BatchNorm sees both.
    scores, updates = self.discriminator.apply(
        {"params": params["discriminator"], "batch_stats": batch_stats}, self.first_layer_outputs(params, x, noise),
        train=True, first_layer_done=True, mutable=["batch_stats"])
    true_scores, fake_scores = jnp.split(scores[:, 0], 2)
    loss = common.truncated_l1(true_scores, fake_scores, m.th_pos, m.th_neg)
    metrics = {"loss": loss, "p_true": jnp.mean(true_scores >= m.th_pos), "p_fake": jnp.mean(fake_scores < m.th_neg)}
    return loss, (updates["batch_stats"], metrics)

  def train_step(self, state, batch, key):
    return common.gradient_step(state, batch["features"] * state["feature_scale"], key, self.loss_fn, self.tx)

  def adapt(self, state, features):
    """Adapted patch features (B*H*W, C) of (B, H, W, C) features, as the discriminator sees them."""
    return self.adaptor.apply({"params": state["params"]["adaptor"]}, features.reshape(-1, features.shape[-1]))

  def discriminate(self, state, adapted):
    """The discriminator's output (higher = more normal) for (N, C) adapted features, inference mode."""
    return common.discriminate(self.discriminator, state, adapted)

  def score(self, state, inputs, image_shape):
    features = inputs["features"] * state["feature_scale"]
    b, h, w, _ = features.shape
    maps = -self.discriminate(state, self.adapt(state, features)).reshape(b, h, w)
    return maps.max(axis=(1, 2)), maps

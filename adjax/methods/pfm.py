"""PFM, B-PFM and MB-PFM (Wan et al., pre-trained feature mapping), ../shared/papers/pfm.md.

Two frozen ImageNet backbones embed each image: the source network (SNN, default
ResNet34) and the target network (TNN, ResNet50). Per hierarchy k, every position's
feature is L2-normalised (eq. 6-7) and a mapping network of 1x1 ConvBlocks (Conv +
BatchNorm + ReLU, Table I) maps source to target features (MNN); B-PFM adds the reverse
mapping (RMNN) and both directions share their middle layer, the Shared Mapping Unit
(Layer3 of Table I; literally the same parameters). Training minimises the mean squared
distance of normalised mapped and true features (eq. 7; eq. 12 for both directions).
Anomaly map per hierarchy: ||F^_MS - F^_T||^2 (eq. 8), averaged with ||F^_MT - F^_S||^2
for B-PFM (eq. 13, 14); MB-PFM resizes every hierarchy's map bilinearly to the image size
and averages them (eq. 15); image score = max of the map (eq. 9).

Where the paper is silent or its extracted tables are ambiguous (choices, not the paper's):
- Table I's Layer3 reads "1 x 1 x 2c_S x c"; its input is Layer2's output, 2c, so the SMU
  maps 2c -> c. RMNN mirrors MNN: c_T -> c_T/2 + c -> 2c -> SMU -> 2c -> c_S/2 + c -> c_S.
- Layer6 (the output layer) is a plain 1x1 conv: its output is L2-normalised, and a final
  ReLU/BatchNorm would constrain the mapped features for no stated reason.
- No Gaussian smoothing of the maps (the paper describes none): eval.smoothing_sigma = 0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from adjax.errors import ConfigError
from adjax.methods import base, common


def _l2(x):
  return x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)


class ConvBlock(nn.Module):
  """1x1 Conv -> BatchNorm -> ReLU on (B, H, W, C) (Table I footnote 2)."""
  features: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(self.features, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(x)
    return nn.relu(x)


class MappingPair(nn.Module):
  """MNN (source -> target) and, if bidirectional, RMNN (target -> source) sharing `smu`."""
  source_channels: int
  target_channels: int
  latent: int
  bidirectional: bool

  def setup(self):
    c, cs, ct = self.latent, self.source_channels, self.target_channels
    self.smu = ConvBlock(c)  # Layer3, the Shared Mapping Unit
    self.forward_in = [ConvBlock(cs // 2 + c), ConvBlock(2 * c)]
    self.forward_out = [ConvBlock(2 * c), ConvBlock(ct // 2 + c)]
    self.forward_head = nn.Dense(ct)
    if self.bidirectional:
      self.reverse_in = [ConvBlock(ct // 2 + c), ConvBlock(2 * c)]
      self.reverse_out = [ConvBlock(2 * c), ConvBlock(cs // 2 + c)]
      self.reverse_head = nn.Dense(cs)

  def _map(self, x, first, last, head, train):
    for layer in first:
      x = layer(x, train)
    x = self.smu(x, train)
    for layer in last:
      x = layer(x, train)
    return head(x)

  def __call__(self, source, target, train: bool):
    mapped_target = self._map(source, self.forward_in, self.forward_out, self.forward_head, train)
    mapped_source = None
    if self.bidirectional:
      mapped_source = self._map(target, self.reverse_in, self.reverse_out, self.reverse_head, train)
    return mapped_target, mapped_source


class PFM(base.Method):
  """Mapping networks between two frozen backbones' normalised feature maps, per hierarchy."""

  @classmethod
  def check_config(cls, config):
    super().check_config(config)
    from adjax import backbones
    m = config.model
    source, target = backbones.get_spec(m.source_backbone), backbones.get_spec(m.backbone)
    if (source.mean, source.std) != (target.mean, target.std):
      raise ConfigError(f"model.source_backbone {source.name} and model.backbone {target.name} expect different "
                        "input normalisations; pair backbones of the same family (torchvision, or EfficientNet-Lite).")
    source_layers, target_layers = tuple(m.source_layers), tuple(m.layers)
    if len(source_layers) != len(target_layers):
      raise ConfigError(f"model.source_layers {source_layers} and model.layers {target_layers} must name one tap "
                        "per hierarchy each.")
    strides = [target.strides[t] for t in target_layers]
    source_strides = [source.strides.get(t) for t in source_layers]
    if source_strides != strides:
      raise ConfigError(f"model.source_layers {source_layers} of {source.name} must be taps at the strides of "
                        f"model.layers ({strides}), one per hierarchy; got {source_strides}.")
    if not m.hierarchies or any(not 0 <= k < len(target_layers) for k in m.hierarchies):
      raise ConfigError(f"model.hierarchies {tuple(m.hierarchies)} must index the {len(target_layers)} tapped "
                        "layers (model.layers).")
    if len(m.latent) != len(target_layers):
      raise ConfigError(f"model.latent {tuple(m.latent)} must give one latent width per tapped layer "
                        f"({len(target_layers)}).")

  def __init__(self, config):
    super().__init__(config)
    # torch Adam's weight decay is an L2 term added to the gradient.
    self.tx = optax.chain(optax.add_decayed_weights(config.model.weight_decay), optax.adam(config.model.lr))

  def make_extractor(self):
    from adjax.backbones.patch_features import make_pair_fn
    return make_pair_fn(self.config.model)

  def pairs(self, features):
    """Per chosen hierarchy, its MappingPair for the channel counts of `features`."""
    m = self.config.model
    return [MappingPair(features["source"][k].shape[-1], features["target"][k].shape[-1], m.latent[k],
                        m.bidirectional, name=f"hierarchy{k}") for k in m.hierarchies]

  def init(self, sample, key, num_subclasses=1):
    features = sample["features"]
    hierarchies = self.config.model.hierarchies
    params, stats = {}, {}
    for k, pair, sub in zip(hierarchies, self.pairs(features), jax.random.split(key, len(hierarchies))):
      variables = pair.init(sub, features["source"][k][:1], features["target"][k][:1], train=False)
      params[f"hierarchy{k}"], stats[f"hierarchy{k}"] = variables["params"], variables["batch_stats"]
    return {"params": params, "batch_stats": stats, "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32)}

  def hierarchy_maps(self, params, batch_stats, features, train):
    """Per hierarchy: (name, forward distance map, reverse map or None, c_T, c_S, new batch stats)."""
    out = []
    for k, pair in zip(self.config.model.hierarchies, self.pairs(features)):
      name = f"hierarchy{k}"
      source, target = _l2(features["source"][k]), _l2(features["target"][k])
      variables = {"params": params[name], "batch_stats": batch_stats[name]}
      if train:
        (mapped_t, mapped_s), updates = pair.apply(variables, source, target, train=True, mutable=["batch_stats"])
        new_stats = updates["batch_stats"]
      else:
        mapped_t, mapped_s = pair.apply(variables, source, target, train=False)
        new_stats = batch_stats[name]
      forward = jnp.sum((_l2(mapped_t) - target) ** 2, axis=-1)  # eq. 8
      reverse = jnp.sum((_l2(mapped_s) - source) ** 2, axis=-1) if mapped_s is not None else None
      out.append((name, forward, reverse, target.shape[-1], source.shape[-1], new_stats))
    return out

  def loss_fn(self, params, batch_stats, features, key):
    del key  # deterministic
    total, new_stats = 0.0, {}
    for name, forward, reverse, c_t, c_s, stats in self.hierarchy_maps(params, batch_stats, features, True):
      loss = jnp.mean(forward) / c_t  # eq. 7: 1 / (w h c_T) ||.||^2
      if reverse is not None:
        loss = loss + jnp.mean(reverse) / c_s  # eq. 12
      total = total + loss  # MB-PFM: each hierarchy's B-PFM, trained together
      new_stats[name] = stats
    return total, (new_stats, {"loss": total})

  def train_step(self, state, batch, key):
    return common.gradient_step(state, batch["features"], key, self.loss_fn, self.tx)

  def score(self, state, inputs, image_shape):
    maps = []
    for _, forward, reverse, _, _, _ in self.hierarchy_maps(state["params"], state["batch_stats"], inputs["features"],
                                                             False):
      a = forward if reverse is None else 0.5 * (forward + reverse)  # eq. 13 / 14
      maps.append(jax.image.resize(a, (a.shape[0],) + tuple(image_shape), method="linear", antialias=False))  # eq. 15
    fused = sum(maps) / len(maps)
    return fused.max(axis=(1, 2)), fused  # eq. 9

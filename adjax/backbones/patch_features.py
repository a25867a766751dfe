"""Locally aware patch features, as SimpleNet's official implementation builds them.

SimpleNet (Liu et al., CVPR 2023, Sec. 3.1) and, after it, RSAD and Adapted-MoE take
layer2+layer3 of WideResNet50 and, per location:
1. gather the 3x3 neighbourhood (zero padded) of every chosen map: C*9 values in
   (channel, dy, dx) order (torch.nn.Unfold's order);
2. resize every map's patch grid bilinearly (align_corners=False) to the first map's size;
3. adaptive-average-pool each layer's C*9 vector to `pretrain_embed_dim` (the reference's
   MeanMapper), stack the layers and adaptive-average-pool the concatenation to
   `target_embed_dim` (its Aggregator). 1536/1536 for WideResNet50 layer2+3.
The paper gives only the neighbourhood aggregation; steps 2-3 and their order follow
the published code (PatchCore's patch maker, which SimpleNet reuses).
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def unfold3x3(x: jax.Array, patch_size: int = 3) -> jax.Array:
  """(B, H, W, C) -> (B, H, W, C * p * p): zero-padded p x p neighbourhoods, channel-major."""
  pad = (patch_size - 1) // 2
  b, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  shifts = [padded[:, dy:dy + h, dx:dx + w, :] for dy in range(patch_size) for dx in range(patch_size)]
  return jnp.stack(shifts, axis=-1).reshape(b, h, w, c * patch_size * patch_size)


def adaptive_avg_pool_last(x: jax.Array, out_size: int) -> jax.Array:
  """torch.nn.functional.adaptive_avg_pool1d over the last axis."""
  n = x.shape[-1]
  if n == out_size:
    return x
  if n % out_size == 0:
    return x.reshape(*x.shape[:-1], out_size, n // out_size).mean(axis=-1)
  # torch's bins: [floor(i n / m), ceil((i + 1) n / m)); overlapping when n % m != 0.
  starts = np.floor(np.arange(out_size) * n / out_size).astype(np.int32)
  ends = np.ceil((np.arange(out_size) + 1) * n / out_size).astype(np.int32)
  return _binned_mean(x, starts, ends)


def _binned_mean(x, starts, ends):
  """Mean of x[..., s:e] per bin, from one cumulative sum (in float32 at least)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  csum = jnp.concatenate([jnp.zeros_like(x[..., :1]), jnp.cumsum(x, axis=-1)], axis=-1)
  return (csum[..., ends] - csum[..., starts]) / jnp.asarray(ends - starts, x.dtype)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
  """F.interpolate(mode='bilinear', align_corners=False) on (B, H, W, C)."""
  if x.shape[1:3] == (height, width):
    return x
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[3]), method="linear", antialias=False)


def patch_features(feature_maps: Sequence[jax.Array], pretrain_embed_dim: int = 1536,
                   target_embed_dim: int = 1536, patch_size: int = 3) -> jax.Array:
  """(B, H0, W0, target_embed_dim) patch features from maps listed first-to-deepest."""
  height, width = feature_maps[0].shape[1:3]
  per_layer = []
  for fmap in feature_maps:
    patches = resize_bilinear(unfold3x3(fmap, patch_size), height, width)
    per_layer.append(adaptive_avg_pool_last(patches, pretrain_embed_dim))
  stacked = jnp.concatenate(per_layer, axis=-1)  # (B, H, W, L * pretrain_embed_dim), layer-major
  return adaptive_avg_pool_last(stacked, target_embed_dim)


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
  """Images (B, H, W, 3) -> features through the jitted fn(variables, images); `spec` has the
  input normalisation. The frozen weights are an argument of the compiled function, never
  closed over: XLA would embed them in the program as constants (slower to compile;
  benchmarks/README.md)."""
  fn: Callable
  variables: object
  spec: object

  def __call__(self, images):
    return self.fn(self.variables, images)


def make_pair_fn(model_config) -> FeatureExtractor:
  """Raw feature maps of two frozen backbones, {'source': (maps...), 'target': (maps...)}, for
  methods that map one pretrained feature space onto another. Both backbones see the same
  images, so the caller checks that they take the same input normalisation."""
  from adjax import backbones
  source, target = backbones.get_spec(model_config.source_backbone), backbones.get_spec(model_config.backbone)
  dtype = jnp.bfloat16 if model_config.dtype == "bfloat16" else jnp.float32
  source_layers, target_layers = tuple(model_config.source_layers), tuple(model_config.layers)
  weights = model_config.source_weights or model_config.backbone_weights
  extract_s, vars_s = backbones.make_extractor(source.name, source_layers, weights, dtype=dtype)
  extract_t, vars_t = backbones.make_extractor(target.name, target_layers, model_config.backbone_weights,
                                               dtype=dtype, seed=1)

  @jax.jit
  def features(variables, images):
    maps_s, maps_t = extract_s(variables[0], images), extract_t(variables[1], images)
    return {"source": tuple(maps_s[t].astype(jnp.float32) for t in source_layers),
            "target": tuple(maps_t[t].astype(jnp.float32) for t in target_layers)}

  return FeatureExtractor(features, (vars_s, vars_t), target)


def make_tap_fn(model_config) -> FeatureExtractor:
  """The raw feature map of `model.backbone`'s one tap `model.layers[0]`, float32, for methods
  that compare a network's features with a frozen backbone's map."""
  from adjax import backbones
  dtype = jnp.bfloat16 if model_config.dtype == "bfloat16" else jnp.float32
  tap = model_config.layers[0]
  extract, variables = backbones.make_extractor(model_config.backbone, (tap,), model_config.backbone_weights,
                                                dtype=dtype)

  @jax.jit
  def features(variables, images):
    return extract(variables, images)[tap].astype(jnp.float32)

  return FeatureExtractor(features, variables, backbones.get_spec(model_config.backbone))


def make_feature_fn(model_config) -> FeatureExtractor:
  """SimpleNet-style patch features of a config's `model` block. The backbone runs in
  `model.dtype`; patch aggregation and everything after it in float32."""
  from adjax import backbones
  dtype = jnp.bfloat16 if model_config.dtype == "bfloat16" else jnp.float32
  layers = tuple(model_config.layers)
  extract, variables = backbones.make_extractor(model_config.backbone, layers, model_config.backbone_weights,
                                                dtype=dtype)

  @jax.jit
  def features(variables, images):
    maps = extract(variables, images)
    return patch_features([maps[t].astype(jnp.float32) for t in layers], model_config.pretrain_embed_dim,
                          model_config.target_embed_dim, model_config.patch_size)

  return FeatureExtractor(features, variables, backbones.get_spec(model_config.backbone))

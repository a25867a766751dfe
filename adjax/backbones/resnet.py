"""ResNet18/34/50 and WideResNet50-2 exactly as torchvision builds them (NHWC).

Taps: stem (after max-pool, stride 4), layer1 (4), layer2 (8), layer3 (16), layer4 (32), logits.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from adjax.backbones.layers import Dtype, batch_norm, conv, last_needed, max_pool

TAPS = ("stem", "layer1", "layer2", "layer3", "layer4", "logits")
STRIDES = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}

# name: (block, blocks per stage, width_per_group)
ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2), 64),
    "resnet34": ("basic", (3, 4, 6, 3), 64),
    "resnet50": ("bottleneck", (3, 4, 6, 3), 64),
    "wide_resnet50_2": ("bottleneck", (3, 4, 6, 3), 128),
}


def channels(arch: str) -> dict:
  block = ARCHS[arch][0]
  expansion = 4 if block == "bottleneck" else 1
  return {"stem": 64, "layer1": 64 * expansion, "layer2": 128 * expansion,
          "layer3": 256 * expansion, "layer4": 512 * expansion, "logits": 1000}


class BasicBlock(nn.Module):
  planes: int
  stride: int
  downsample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = self.dtype
    y = nn.relu(batch_norm(name="bn1", dtype=d)(conv(self.planes, 3, self.stride, 1, name="conv1", dtype=d)(x)))
    y = batch_norm(name="bn2", dtype=d)(conv(self.planes, 3, 1, 1, name="conv2", dtype=d)(y))
    if self.downsample:
      x = batch_norm(name="downsample_1", dtype=d)(conv(self.planes, 1, self.stride, name="downsample_0", dtype=d)(x))
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (ResNet V1.5): the stride sits on the 3x3 conv."""
  planes: int
  stride: int
  downsample: bool
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = self.dtype
    y = nn.relu(batch_norm(name="bn1", dtype=d)(conv(self.width, 1, name="conv1", dtype=d)(x)))
    y = nn.relu(batch_norm(name="bn2", dtype=d)(conv(self.width, 3, self.stride, 1, name="conv2", dtype=d)(y)))
    y = batch_norm(name="bn3", dtype=d)(conv(self.planes * 4, 1, name="conv3", dtype=d)(y))
    if self.downsample:
      shortcut = conv(self.planes * 4, 1, self.stride, name="downsample_0", dtype=d)(x)
      x = batch_norm(name="downsample_1", dtype=d)(shortcut)
    return nn.relu(y + x)


class ResNet(nn.Module):
  arch: str
  taps: Sequence[str] = ("layer2", "layer3")
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    block, depths, width_per_group = ARCHS[self.arch]
    last = last_needed(TAPS, self.taps)
    out = {}
    d = self.dtype
    x = nn.relu(batch_norm(name="bn1", dtype=d)(conv(64, 7, 2, 3, name="conv1", dtype=d)(x)))
    x = max_pool(x, 3, 2, 1)
    out["stem"] = x
    in_planes = 64
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), depths), start=1):
      if TAPS.index(f"layer{stage}") > last:
        break
      for i in range(n):
        stride = 2 if (stage > 1 and i == 0) else 1
        if block == "basic":
          downsample = i == 0 and (stride != 1 or in_planes != planes)
          x = BasicBlock(planes, stride, downsample, dtype=d, name=f"layer{stage}_{i}")(x)
          in_planes = planes
        else:
          downsample = i == 0 and (stride != 1 or in_planes != planes * 4)
          width = planes * width_per_group // 64
          x = Bottleneck(planes, stride, downsample, width, dtype=d, name=f"layer{stage}_{i}")(x)
          in_planes = planes * 4
      out[f"layer{stage}"] = x
    if last == TAPS.index("logits"):
      out["logits"] = nn.Dense(1000, dtype=d, name="fc")(jnp.mean(x, axis=(1, 2)))
    return {t: out[t] for t in self.taps}

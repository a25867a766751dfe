"""EfficientNet-Lite0/1/2 as ported to PyTorch by the `efficientnet-lite-pytorch` package.

Lite = EfficientNet without squeeze-excitation, ReLU6 instead of swish, the stem (32
channels) and head (1280) not scaled, BatchNorm eps 1e-3, TensorFlow 'SAME' padding.
Taps: stem (stride 2), stage1..stage7 (the output of each block stage: strides 2, 4, 8,
16, 16, 32, 32), head (1280 channels, stride 32), logits.
"""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from adjax.backbones.layers import Dtype, TFSameConv, last_needed

# (repeats, kernel, stride, expand ratio, in, out), from the TF efficientnet_lite_builder.
BASE_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40),
               (3, 3, 2, 6, 40, 80), (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192),
               (1, 3, 1, 6, 192, 320))
# name: (width coefficient, depth coefficient, nominal resolution)
ARCHS = {
    "efficientnet_lite0": (1.0, 1.0, 224),
    "efficientnet_lite1": (1.0, 1.1, 240),
    "efficientnet_lite2": (1.1, 1.2, 260),
}
TAPS = ("stem",) + tuple(f"stage{i}" for i in range(1, 8)) + ("head", "logits")
STRIDES = {"stem": 2, "stage1": 2, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 16,
           "stage6": 32, "stage7": 32, "head": 32}
BN_EPS = 1e-3


def _round_filters(filters, width):
  if width == 1.0:
    return filters
  divisor = 8
  scaled = filters * width
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def stages(arch: str):
  """Per stage: (repeats, kernel, stride, expand, in, out), scaled as the reference does."""
  width, depth, _ = ARCHS[arch]
  out = []
  for i, (r, k, s, e, cin, cout) in enumerate(BASE_STAGES):
    fixed = i in (0, len(BASE_STAGES) - 1)  # first and last stage keep their repeats
    repeats = r if fixed else int(math.ceil(depth * r))
    cin = 32 if i == 0 else _round_filters(cin, width)
    out.append((repeats, k, s, e, cin, _round_filters(cout, width)))
  return out


def channels(arch: str) -> dict:
  result = {"stem": 32, "head": 1280, "logits": 1000}
  for i, stage in enumerate(stages(arch), start=1):
    result[f"stage{i}"] = stage[5]
  return result


def _bn(name, dtype):
  return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, momentum=0.99, name=name, dtype=dtype)


class MBConv(nn.Module):
  kernel: int
  stride: int
  expand: int
  cin: int
  cout: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs):
    d = self.dtype
    x = inputs
    hidden = self.cin * self.expand
    if self.expand != 1:
      x = jnp.clip(_bn("bn0", d)(TFSameConv(hidden, 1, dtype=d, name="expand_conv")(x)), 0, 6)
    x = TFSameConv(hidden, self.kernel, self.stride, groups=hidden, dtype=d, name="depthwise_conv")(x)
    x = jnp.clip(_bn("bn1", d)(x), 0, 6)
    x = _bn("bn2", d)(TFSameConv(self.cout, 1, dtype=d, name="project_conv")(x))
    if self.stride == 1 and self.cin == self.cout:
      x = x + inputs  # drop-connect is training-only
    return x


class EfficientNetLite(nn.Module):
  arch: str
  taps: Sequence[str] = ("stage3", "stage5")
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = self.dtype
    last = last_needed(TAPS, self.taps)
    out = {}
    x = jnp.clip(_bn("bn0", d)(TFSameConv(32, 3, 2, dtype=d, name="conv_stem")(x)), 0, 6)
    out["stem"] = x
    block = 0
    for i, (repeats, k, s, e, cin, cout) in enumerate(stages(self.arch), start=1):
      if TAPS.index(f"stage{i}") > last:
        break
      for r in range(repeats):
        x = MBConv(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout, dtype=d, name=f"blocks_{block}")(x)
        block += 1
      out[f"stage{i}"] = x
    if last >= TAPS.index("head"):
      x = jnp.clip(_bn("bn1", d)(TFSameConv(1280, 1, dtype=d, name="conv_head")(x)), 0, 6)
      out["head"] = x
    if last >= TAPS.index("logits"):
      out["logits"] = nn.Dense(1000, dtype=d, name="fc")(jnp.mean(x, axis=(1, 2)))
    return {t: out[t] for t in self.taps}

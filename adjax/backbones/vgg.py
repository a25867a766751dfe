"""VGG16 and VGG19 (torchvision, no BatchNorm) convolutional part, NHWC.

Taps: stage1..stage5 are the last ReLU of each conv stage (strides 1, 2, 4, 8, 16);
pool1..pool5 the max-pool after it (strides 2..32). The fully connected classifier is
not built: adjax only uses VGG as a feature extractor (conversion drops its weights).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from adjax.backbones.layers import Dtype, conv, last_needed, max_pool

ARCHS = {
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}
TAPS = tuple(f"{kind}{i}" for i in range(1, 6) for kind in ("stage", "pool"))
STRIDES = {**{f"stage{i}": 2 ** (i - 1) for i in range(1, 6)}, **{f"pool{i}": 2 ** i for i in range(1, 6)}}
IGNORED_WEIGHTS = ("classifier.",)


def channels(arch: str) -> dict:
  out = {}
  for i, stage in enumerate(ARCHS[arch], start=1):
    out[f"stage{i}"] = out[f"pool{i}"] = stage[-1]
  return out


class VGG(nn.Module):
  arch: str
  taps: Sequence[str] = ("stage3", "stage4")
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    last = last_needed(TAPS, self.taps)
    out = {}
    index = 0  # position in torchvision's `features` nn.Sequential
    for stage, widths in enumerate(ARCHS[self.arch], start=1):
      if TAPS.index(f"stage{stage}") > last:
        break
      for width in widths:
        x = nn.relu(conv(width, 3, 1, 1, bias=True, name=f"features_{index}", dtype=self.dtype)(x))
        index += 2  # Conv2d, ReLU
      out[f"stage{stage}"] = x
      x = max_pool(x, 2, 2)
      index += 1  # MaxPool2d
      out[f"pool{stage}"] = x
    return {t: out[t] for t in self.taps}

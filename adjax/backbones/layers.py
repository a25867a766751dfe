"""Layers shared by the converted backbones: torchvision-exact conv, BatchNorm and pooling.

Module names follow the torch state-dict path with numeric parts joined by '_'
(`layer1.0.conv1` -> `layer1_0/conv1`), so that one rule converts every architecture
(see convert.py).
"""

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def conv(features, kernel, stride=1, padding=0, groups=1, bias=False, name=None, dtype=jnp.float32):
  """A torch.nn.Conv2d: explicit symmetric zero padding, NHWC."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), feature_group_count=groups,
                 use_bias=bias, name=name, dtype=dtype)


def batch_norm(eps=1e-5, name=None, dtype=jnp.float32):
  """A torch.nn.BatchNorm2d in inference mode (running statistics, eps as in torch)."""
  return nn.BatchNorm(use_running_average=True, epsilon=eps, momentum=0.9, name=name, dtype=dtype)


def max_pool(x, window, stride, padding=0):
  """torch.nn.MaxPool2d: padding counts as -inf, so it never wins the max."""
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow 'SAME' padding for one axis: output ceil(size / stride), extra pixel after."""
  out = math.ceil(size / stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class TFSameConv(nn.Module):
  """Conv with TensorFlow 'SAME' padding computed from the actual input size.

  The EfficientNet-Lite weights were ported from TensorFlow and expect this
  (asymmetric for even sizes at stride 2); it equals the reference's static padding
  at the nominal input size and stays correct at any other size.
  """
  features: int
  kernel: int
  stride: int = 1
  groups: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = [tf_same_padding(x.shape[axis], self.kernel, self.stride) for axis in (1, 2)]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel, self.kernel, x.shape[-1] // self.groups, self.features))
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride), pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups)


def last_needed(order: Sequence[str], taps: Sequence[str]) -> int:
  """Index in `order` of the deepest requested tap, so later stages are not computed."""
  unknown = [t for t in taps if t not in order]
  if unknown:
    raise ValueError(f"unknown feature taps {unknown}; this backbone has {list(order)}")
  return max(order.index(t) for t in taps)

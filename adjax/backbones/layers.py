"""Layers shared by the converted backbones: torchvision-exact conv, BatchNorm and pooling.

Module names follow the torch state-dict path with numeric parts joined by '_'
(`layer1.0.conv1` -> `layer1_0/conv1`), so that one rule converts every architecture
(see convert.py).
"""

import functools
import math
import operator
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


NHWC = ("NHWC", "HWIO", "NHWC")
FEW_INPUT_CHANNELS = 3


def _tap_windows(x, kh: int, kw: int, stride: int, padding):
  """(dy, dx, window) for each tap of a kh x kw kernel: the slice of the zero-padded NHWC input that
  the tap multiplies at every output position."""
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out_h = (xp.shape[1] - kh) // stride + 1
  out_w = (xp.shape[2] - kw) // stride + 1
  for dy in range(kh):
    for dx in range(kw):
      yield dy, dx, jax.lax.slice(xp, (0, dy, dx, 0),
                                  (xp.shape[0], dy + (out_h - 1) * stride + 1, dx + (out_w - 1) * stride + 1,
                                   xp.shape[3]), (1, stride, stride, 1))


def conv2d(x, kernel, stride: int, padding, groups: int = 1):
  """NHWC convolution with an HWIO kernel, choosing the fastest exact formulation.

  XLA:CPU runs 1x1 convolutions slower than the same matmul, and depthwise convolutions
  (feature_group_count = channels) far slower than a fused sum of shifted multiplies
  (benchmarks/README.md); the results are the same up to float summation order.
  """
  (pt, pb), (pl, pr) = padding
  k = kernel.shape[0]
  if k == 1 and groups == 1 and pt == pb == pl == pr == 0:
    if stride > 1:
      x = x[:, ::stride, ::stride, :]
    return jnp.einsum("bhwc,co->bhwo", x, kernel[0, 0])
  depthwise = groups > 1 and groups == x.shape[-1] and kernel.shape[2] == 1 and kernel.shape[3] == groups
  if depthwise and jax.default_backend() == "cpu":
    return functools.reduce(operator.add, (window * kernel[dy, dx, 0]
                                           for dy, dx, window in _tap_windows(x, k, k, stride, padding)))
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), ((pt, pb), (pl, pr)), dimension_numbers=NHWC,
                                      feature_group_count=groups)


def _shifted_products(x, kernel, padding):
  kh, kw, cin, _ = kernel.shape
  return functools.reduce(operator.add, (window[..., c:c + 1] * kernel[dy, dx, c]
                                         for dy, dx, window in _tap_windows(x, kh, kw, 1, padding)
                                         for c in range(cin)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_by_shifted_products(x, kernel, padding):
  """Stride-1 NHWC convolution with an HWIO kernel and padding ((top, bottom), (left, right)), as a
  fused sum of kh * kw * C_in shifted products (the same values up to float summation order); its
  gradient is XLA's convolution's, which XLA:CPU runs faster than that of the sum. For inputs of
  one to three channels, where XLA:CPU's convolution is slow (benchmarks/README.md)."""
  return _shifted_products(x, kernel, padding)


def _shifted_products_fwd(x, kernel, padding):
  return _shifted_products(x, kernel, padding), (x, kernel)


def _shifted_products_bwd(padding, residuals, dy):
  return jax.vjp(lambda x, kernel: conv2d(x, kernel, 1, padding), *residuals)[1](dy)


conv_by_shifted_products.defvjp(_shifted_products_fwd, _shifted_products_bwd)


def few_channel_conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                     dimension_numbers=None, feature_group_count=1, **kwargs):
  """lax.conv_general_dilated, for nn.Conv(conv_general_dilated=...): on CPU a stride-1, undilated NHWC
  convolution of at most FEW_INPUT_CHANNELS input channels by conv_by_shifted_products."""
  plain = (tuple(window_strides) == (1, 1) and all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
           and feature_group_count == 1 and rhs.shape[2] <= FEW_INPUT_CHANNELS and jax.default_backend() == "cpu"
           and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
  if not plain:
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, **kwargs)
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1), padding)
  return conv_by_shifted_products(lhs, rhs, tuple(tuple(int(p) for p in side) for side in padding))


class Conv(nn.Module):
  """torch.nn.Conv2d (explicit symmetric zero padding), NHWC, params `kernel` (HWIO) and `bias`."""
  features: int
  kernel: int
  stride: int = 1
  padding: int = 0
  groups: int = 1
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (self.kernel, self.kernel, x.shape[-1] // self.groups, self.features))
    p = self.padding
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, ((p, p), (p, p)), self.groups)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
    return y


def conv(features, kernel, stride=1, padding=0, groups=1, bias=False, name=None, dtype=jnp.float32):
  return Conv(features, kernel, stride, padding, groups, bias, dtype, name=name)


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
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, pad, self.groups)


def last_needed(order: Sequence[str], taps: Sequence[str]) -> int:
  """Index in `order` of the deepest requested tap, so later stages are not computed."""
  unknown = [t for t in taps if t not in order]
  if unknown:
    raise ValueError(f"unknown feature taps {unknown}; this backbone has {list(order)}")
  return max(order.index(t) for t in taps)


def _phase_taps(parity: int) -> dict:
  """For a 4x4 stride-2 transposed convolution with padding 1 (torch's ConvTranspose2d(4, 2, 1)),
  output row 2m + parity takes input row m + offset with kernel row k: {offset: k}.
  out[o] = sum_i x[i] w[o - 2i + 1], so o = 2m: k = 1 (i = m), 3 (i = m - 1); o = 2m + 1: k = 0
  (i = m + 1), 2 (i = m)."""
  return {0: 1, -1: 3} if parity == 0 else {1: 0, 0: 2}


def conv_transpose_4x4_s2(x, kernel, bias=None):
  """torch.nn.ConvTranspose2d(kernel_size=4, stride=2, padding=1) on NHWC x with kernel
  (4, 4, C_in, C_out), output (B, 2H, 2W, C_out): one stride-1 3x3 convolution giving the four
  output phases as channels, then interleaved. The same function as XLA's transposed
  convolution, whose backward pass XLA:CPU runs several times slower (benchmarks/README.md)."""
  b, h, w, cin = x.shape
  cout = kernel.shape[-1]
  phases = jnp.zeros((3, 3, cin, 2, 2, cout), kernel.dtype)
  for py in (0, 1):
    for px in (0, 1):
      for dy, ky in _phase_taps(py).items():
        for dx, kx in _phase_taps(px).items():
          phases = phases.at[dy + 1, dx + 1, :, py, px, :].set(kernel[ky, kx])
  y = conv2d(x, phases.reshape(3, 3, cin, 4 * cout), 1, ((1, 1), (1, 1)))
  y = y.reshape(b, h, w, 2, 2, cout).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, cout)
  return y if bias is None else y + bias


def conv_s2_space_to_depth(x, kernel, padding: int):
  """A stride-2 convolution with an even k x k HWIO kernel and symmetric zero padding (torch's
  Conv2d(k, 2, padding)) as a stride-1 (k/2) x (k/2) convolution of the 2x2 space-to-depth input:
  input row 2m + ky with ky = 2 dy + py is row m + dy, phase py. The same function; XLA:CPU runs
  the strided form's backward pass (input-dilated and kernel-dilated convolutions) about twice as
  slowly (benchmarks/README.md, FEGAN)."""
  b, h, w, c = x.shape
  k = kernel.shape[0]
  if k % 2:
    raise ValueError(f"conv_s2_space_to_depth needs an even kernel size, not {k}")
  out_h, out_w = (h + 2 * padding - k) // 2 + 1, (w + 2 * padding - k) // 2 + 1
  # An odd padded side gets one more zero row or column to split into 2x2 blocks; the output it
  # would add is cropped, so no output reads it.
  xp = jnp.pad(x, ((0, 0), (padding, padding + (h + 2 * padding) % 2), (padding, padding + (w + 2 * padding) % 2),
                   (0, 0)))
  hh, ww = xp.shape[1] // 2, xp.shape[2] // 2
  s = xp.reshape(b, hh, 2, ww, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, 4 * c)
  kk = kernel.reshape(k // 2, 2, k // 2, 2, c, -1).transpose(0, 2, 1, 3, 4, 5).reshape(k // 2, k // 2, 4 * c, -1)
  return conv2d(s, kk, 1, ((0, 0), (0, 0)))[:, :out_h, :out_w]


class Conv4x4S2(nn.Module):
  """torch.nn.Conv2d(C_in, features, 4, 2, 1), with nn.Conv's parameters `kernel` (4, 4, C_in, C_out)
  and, if use_bias, `bias`; on CPU by conv_s2_space_to_depth (elsewhere the strided convolution,
  which is what the GPU timings in benchmarks/README.md measured)."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (4, 4, x.shape[-1], self.features))
    if jax.default_backend() == "cpu":
      y = conv_s2_space_to_depth(x, kernel, 1)
    else:
      y = conv2d(x, kernel, 2, ((1, 1), (1, 1)))
    return y + self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else y


class ConvTranspose4x4S2(nn.Module):
  """conv_transpose_4x4_s2 with parameters `kernel` (4, 4, C_in, C_out) and, if use_bias, `bias`."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (4, 4, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    return conv_transpose_4x4_s2(x, kernel, bias)

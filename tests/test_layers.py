"""The fast convolution formulations equal lax.conv_general_dilated exactly (up to summation order)."""

import jax
import numpy as np
import pytest

from adjax.backbones import layers


def _reference(x, kernel, stride, padding, groups):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


@pytest.mark.parametrize("kernel_size,stride,padding,depthwise", [
    (1, 1, ((0, 0), (0, 0)), False),
    (1, 2, ((0, 0), (0, 0)), False),
    (3, 1, ((1, 1), (1, 1)), True),
    (5, 2, ((1, 2), (1, 2)), True),   # TF 'SAME' at an even size: the extra pixel goes after
    (3, 2, ((0, 1), (1, 1)), True),
    (3, 1, ((1, 1), (1, 1)), False),
])
def test_conv2d_matches_lax(kernel_size, stride, padding, depthwise):
  rng = np.random.default_rng(kernel_size * 10 + stride)
  channels = 6
  x = rng.normal(size=(2, 11, 14, channels)).astype(np.float32)
  groups = channels if depthwise else 1
  kernel = rng.normal(size=(kernel_size, kernel_size, channels // groups, channels)).astype(np.float32)
  ours = layers.conv2d(x, kernel, stride, padding, groups)
  np.testing.assert_allclose(ours, _reference(x, kernel, stride, padding, groups), rtol=1e-5, atol=1e-5)


def test_tf_same_padding():
  assert layers.tf_same_padding(224, 3, 2) == (0, 1)
  assert layers.tf_same_padding(225, 3, 2) == (1, 1)
  assert layers.tf_same_padding(112, 5, 1) == (2, 2)
  assert layers.tf_same_padding(57, 5, 2) == (2, 2)


def test_cpu_convolution_flag_only_for_measured_jaxlib_and_never_over_the_users():
  import adjax
  flag = "--xla_cpu_experimental_ynn_fusion_type"
  assert adjax.with_cpu_flags("", (0, 10, 2)) == f"{flag}=-individual_convolution"
  assert adjax.with_cpu_flags("--a=1", (0, 10, 2)) == f"--a=1 {flag}=-individual_convolution"
  assert adjax.with_cpu_flags(f"{flag}=dot", (0, 10, 2)) == f"{flag}=dot"  # the user's choice stays
  for unmeasured in [(0, 10, 1), (0, 11, 0), ()]:  # XLA aborts on flags it does not know
    assert adjax.with_cpu_flags("--a=1", unmeasured) == "--a=1"

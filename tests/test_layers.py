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


@pytest.mark.parametrize("size,kernel_size,padding", [((16, 16), 4, 1), ((11, 14), 4, 1), ((9, 7), 2, 0),
                                                      ((10, 13), 6, 2)])
def test_strided_convolution_by_space_to_depth_matches_lax_with_gradients(size, kernel_size, padding):
  rng = np.random.default_rng(sum(size))
  x = rng.normal(size=(2, *size, 3)).astype(np.float32)
  kernel = rng.normal(size=(kernel_size, kernel_size, 3, 5)).astype(np.float32)
  pad = ((padding, padding), (padding, padding))
  ours = layers.conv_s2_space_to_depth(x, kernel, padding)
  reference = _reference(x, kernel, 2, pad, 1)
  assert ours.shape == reference.shape
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4)
  weights = rng.normal(size=reference.shape).astype(np.float32)
  grads = jax.grad(lambda x, k: (layers.conv_s2_space_to_depth(x, k, padding) * weights).sum(), (0, 1))(x, kernel)
  expected = jax.grad(lambda x, k: (_reference(x, k, 2, pad, 1) * weights).sum(), (0, 1))(x, kernel)
  for g, e in zip(grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-3)


def test_transposed_convolution_by_phases_matches_lax():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
  kernel = rng.normal(size=(4, 4, 3, 4)).astype(np.float32)
  # torch's ConvTranspose2d(4, 2, 1) is the gradient of Conv2d(4, 2, 1) with the same kernel.
  _, vjp = jax.vjp(lambda y: _reference(y, kernel.transpose(0, 1, 3, 2), 2, ((1, 1), (1, 1)), 1),
                   np.zeros((2, 10, 14, 4), np.float32))
  np.testing.assert_allclose(layers.conv_transpose_4x4_s2(x, kernel), vjp(x)[0], rtol=1e-5, atol=1e-4)


def test_conv4x4s2_takes_nn_convs_parameters_and_gives_its_output():
  import flax.linen as nn
  x = np.random.default_rng(5).normal(size=(2, 12, 10, 3)).astype(np.float32)
  reference = nn.Conv(4, (4, 4), (2, 2), padding=((1, 1), (1, 1)))
  variables = reference.init(jax.random.key(0), x)  # an older checkpoint's discriminator layer
  np.testing.assert_allclose(layers.Conv4x4S2(4).apply(variables, x), reference.apply(variables, x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels,padding", [(1, "VALID"), (3, "SAME"), (2, ((2, 0), (1, 3))), (16, "VALID")])
def test_few_channel_conv_gives_nn_convs_output_and_gradients(channels, padding):
  import flax.linen as nn
  import jax.numpy as jnp
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 11, 9, channels)).astype(np.float32))
  reference = nn.Conv(5, (3, 3), padding=padding)
  few = nn.Conv(5, (3, 3), padding=padding, conv_general_dilated=layers.few_channel_conv)
  params = reference.init(jax.random.key(0), x)
  by_products = "custom_vjp_call" in str(jax.make_jaxpr(few.apply)(params, x))
  assert by_products == (channels <= layers.FEW_INPUT_CHANNELS and jax.default_backend() == "cpu")
  np.testing.assert_allclose(few.apply(params, x), reference.apply(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda conv: lambda p, x: jnp.sum(jnp.sin(conv.apply(p, x)))
  expected = jax.grad(loss(reference), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(jax.grad(loss(few), argnums=(0, 1))(params, x)), jax.tree.leaves(expected)):
    assert float(jnp.abs(a - b).max()) <= 1e-5 * float(jnp.abs(b).max())

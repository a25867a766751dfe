"""SimpleNet's training loss computes the discriminator's first layer in a folded form
(SimpleNet.first_layer_outputs); it must be the plain composition D([G(x); G(x) + eps])
of the paper and the reference code: same loss, same gradients, same BatchNorm statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from adjax.methods import common, simplenet
from configs import simplenet as simplenet_config


def plain_loss(config, params, batch_stats, features, key):
  """The reference formulation: adapt, add noise, one discriminator call on [true; fake]."""
  method = simplenet.SimpleNet(config)
  adaptor, discriminator = method.adaptor, method.discriminator
  true = adaptor.apply({"params": params["adaptor"]}, features.reshape(-1, features.shape[-1]))
  fake = true + config.model.noise_std * jax.random.normal(key, true.shape, true.dtype)
  scores, updates = discriminator.apply({"params": params["discriminator"], "batch_stats": batch_stats},
                                        jnp.concatenate([true, fake]), train=True, mutable=["batch_stats"])
  true_scores, fake_scores = jnp.split(scores[:, 0], 2)
  loss = common.truncated_l1(true_scores, fake_scores, config.model.th_pos, config.model.th_neg)
  return loss, updates["batch_stats"]


@pytest.mark.parametrize("adaptor_layers", [1, 2])
def test_folded_first_layer_equals_the_plain_composition(adaptor_layers):
  config = simplenet_config.get_config("")
  config.model.adaptor_layers, config.model.dsc_hidden = adaptor_layers, (48,)
  config.model.noise_std = 0.3  # large enough that the fake half matters to the loss
  features = np.random.default_rng(0).normal(0, 0.5, size=(3, 5, 5, 32)).astype(np.float32)
  method = simplenet.SimpleNet(config)
  state = method.init({"features": features}, jax.random.key(0))
  key = jax.random.key(7)

  (folded, (folded_stats, _)), folded_grads = jax.value_and_grad(method.loss_fn, argnums=0, has_aux=True)(
      state["params"], state["batch_stats"], features, key)
  (plain, plain_stats), plain_grads = jax.value_and_grad(plain_loss, argnums=1, has_aux=True)(
      config, state["params"], state["batch_stats"], features, key)

  assert float(plain) > 0.1  # not a trivially zero loss
  np.testing.assert_allclose(float(folded), float(plain), rtol=1e-5)
  for name, value in traverse_util.flatten_dict(jax.device_get(plain_stats), sep="/").items():
    np.testing.assert_allclose(traverse_util.flatten_dict(jax.device_get(folded_stats), sep="/")[name], value,
                               rtol=1e-5, atol=1e-6, err_msg=name)
  folded_grads = traverse_util.flatten_dict(jax.device_get(folded_grads), sep="/")
  plain_grads = traverse_util.flatten_dict(jax.device_get(plain_grads), sep="/")
  assert folded_grads.keys() == plain_grads.keys()
  # One absolute tolerance for all leaves: the biases in front of a BatchNorm have an exactly
  # zero gradient, so only rounding noise is there to compare.
  tolerance = 1e-5 * max(float(np.abs(g).max()) for g in plain_grads.values())
  assert float(np.abs(plain_grads["adaptor/fc0/kernel"]).max()) > 100 * tolerance
  for name, g in plain_grads.items():
    np.testing.assert_allclose(folded_grads[name], g, rtol=0, atol=tolerance, err_msg=name)

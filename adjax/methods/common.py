"""Pieces shared by the noise-discriminator family (SimpleNet, RSAD, Adapted-MoE experts)."""

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax


def torch_bias_init(fan_in: int):
  """torch.nn.Linear's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)). The reference
  implementations re-initialise only the weights (xavier normal), so biases keep this."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Discriminator(nn.Module):
  """MLP: per hidden width Linear + BatchNorm1d + LeakyReLU(0.2), then Linear(., 1, no bias).

  SimpleNet's official discriminator with hidden=(1024,); RSAD's three-layer version has
  two hidden layers (it applies its sigmoid to this module's output itself).
  """
  hidden: Sequence[int] = (1024,)

  @nn.compact
  def __call__(self, x, train: bool, first_layer_done: bool = False):
    """first_layer_done: x is already fc0's output (a caller that computed it more cheaply,
    see simplenet.first_layer_outputs); the module goes on from fc0's BatchNorm."""
    for i, width in enumerate(self.hidden):
      if not (i == 0 and first_layer_done):
        x = nn.Dense(width, kernel_init=nn.initializers.xavier_normal(), bias_init=torch_bias_init(x.shape[-1]),
                     name=f"fc{i}")(x)
      # torch BatchNorm1d: momentum 0.1 (flax 0.9), eps 1e-5, batch statistics while training.
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i}")(x)
      x = nn.leaky_relu(x, 0.2)
    x = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.xavier_normal(), name="tail")(x)
    return x


def discriminate(discriminator, state, x):
  """A Discriminator's output (N,) for (N, C) inputs in inference mode, from a state holding its
  params under params['discriminator'] and its BatchNorm statistics as batch_stats."""
  variables = {"params": state["params"]["discriminator"], "batch_stats": state["batch_stats"]}
  return discriminator.apply(variables, x, train=False)[:, 0]


def truncated_l1(true_scores, fake_scores, th_pos, th_neg):
  """SimpleNet eq. 6 / RSAD eq. 7: max(0, th+ - D(q)) + max(0, -th- + D(q-)), averaged."""
  return jnp.mean(jnp.maximum(0.0, th_pos - true_scores)) + jnp.mean(jnp.maximum(0.0, fake_scores - th_neg))


def gradient_step(state, features, key, loss_fn, optimizer):
  """One optimiser step on loss_fn(params, batch_stats, features, key) -> (loss, (stats, metrics))."""
  grad_fn = jax.value_and_grad(loss_fn, argnums=0, has_aux=True)
  (_, (batch_stats, metrics)), grads = grad_fn(state["params"], state["batch_stats"], features, key)
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  return {**state, "params": optax.apply_updates(state["params"], updates), "batch_stats": batch_stats,
          "opt_state": opt_state, "step": state["step"] + 1}, metrics

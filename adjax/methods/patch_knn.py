"""Nearest-neighbour patch distance: adjax's reference scorer for the shared pipeline.

Not one of the papers: the simplest strong baseline on the same patch features
(PatchCore without coreset selection, Roth et al., CVPR 2022): a memory bank of
training patch features (a seeded random subsample of `model.memory_size`), the
anomaly of a test patch is its Euclidean distance to the nearest bank entry, the image
score the largest patch anomaly. It needs no training, so it exercises data ->
features -> scores -> metrics -> reports end to end in seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np

from adjax.methods import base


class PatchKNN(base.Method):
  """A memory bank of training patches; statistics only, no training."""
  trains = False

  def fit(self, data, key, num_subclasses=1):
    features = data["features"]
    flat = np.asarray(features).reshape(-1, features.shape[-1])
    size = min(self.config.model.memory_size, flat.shape[0])
    chosen = np.asarray(jax.random.choice(key, flat.shape[0], (size,), replace=False))
    return {"memory": jnp.asarray(flat[np.sort(chosen)], jnp.float32)}

  def score(self, state, inputs, image_shape):
    features = inputs["features"]
    b, h, w, c = features.shape
    distances = nearest_distance(features.reshape(-1, c).astype(jnp.float32), state["memory"])
    maps = distances.reshape(b, h, w)
    return maps.max(axis=(1, 2)), maps


def nearest_distance(queries, memory, chunk=4096):
  """min_j ||q_i - m_j|| for every query, scanning the bank in chunks to bound memory."""
  n = memory.shape[0]
  pad = (-n) % chunk
  bank = jnp.pad(memory, ((0, pad), (0, 0)))
  valid = jnp.arange(n + pad) < n
  q2 = jnp.sum(queries ** 2, axis=-1, keepdims=True)

  def step(best, args):
    block, ok = args
    d2 = q2 - 2.0 * queries @ block.T + jnp.sum(block ** 2, axis=-1)[None]
    d2 = jnp.where(ok[None], d2, jnp.inf)
    return jnp.minimum(best, d2.min(axis=1)), None

  blocks = (bank.reshape(-1, chunk, bank.shape[-1]), valid.reshape(-1, chunk))
  best, _ = jax.lax.scan(step, jnp.full(queries.shape[0], jnp.inf), blocks)
  return jnp.sqrt(jnp.maximum(best, 0.0))

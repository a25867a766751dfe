"""PFM / B-PFM / MB-PFM: normalisation, the shared mapping unit, multi-hierarchy fusion."""

import jax
import jax.numpy as jnp
import numpy as np

from adjax.methods import pfm
from configs import pfm as pfm_config


def features(seed=0, n=3):
  rng = np.random.default_rng(seed)
  shapes = [(8, 8), (4, 4), (2, 2)]
  source = tuple(rng.normal(size=(n, h, w, c)).astype(np.float32) for (h, w), c in zip(shapes, (6, 8, 10)))
  target = tuple(rng.normal(size=(n, h, w, c)).astype(np.float32) for (h, w), c in zip(shapes, (7, 9, 12)))
  return {"source": source, "target": target}


def config(model="mbpfm"):
  kind, _, hierarchy = model.partition("_h")
  c = pfm_config.get_config(f"lite0_lite2,model={kind}" + (f",hierarchy={hierarchy}" if hierarchy else ""))
  c.model.latent = (4, 5, 6)
  c.data.image_size = 16
  return c


def test_positions_are_l2_normalised_and_identity_mapping_scores_zero():
  x = jnp.asarray(features()["source"][0])
  np.testing.assert_allclose(np.linalg.norm(pfm._l2(x), axis=-1), 1.0, rtol=1e-6)
  # eq. 8 on normalised features: a mapping that reproduces the target scores 0; the opposite scores 4.
  target = pfm._l2(x)
  assert float(jnp.sum((pfm._l2(2.0 * x) - target) ** 2)) < 1e-8
  np.testing.assert_allclose(jnp.sum((pfm._l2(-x) - target) ** 2, axis=-1), 4.0, rtol=1e-5)


def test_bpfm_shares_one_mapping_unit_between_directions():
  c = config("bpfm_h1")
  f = features()
  method = pfm.PFM(c)
  state = method.init({"features": f}, jax.random.key(0))
  params = state["params"]["hierarchy1"]
  assert "smu" in params and not any("smu" in k for k in params if k != "smu")
  forward_names = {k for k in params if k.startswith("forward")}
  reverse_names = {k for k in params if k.startswith("reverse")}
  assert forward_names and reverse_names
  # Both directions pass through the one `smu`: each direction's loss alone moves it.
  pair = method.pairs(f)[0]
  source, target = pfm._l2(f["source"][1]), pfm._l2(f["target"][1])

  def direction_loss(p, which):
    (mapped_t, mapped_s), _ = pair.apply({"params": p, "batch_stats": state["batch_stats"]["hierarchy1"]},
                                         source, target, train=True, mutable=["batch_stats"])
    out, ref = (mapped_t, target) if which == "forward" else (mapped_s, source)
    return jnp.mean((pfm._l2(out) - ref) ** 2)

  for which in ("forward", "reverse"):
    grads = jax.grad(direction_loss)(params, which)
    assert float(jnp.abs(grads["smu"]["conv"]["kernel"]).sum()) > 0, which
  # The unidirectional PFM has no reverse network at all.
  unidirectional = pfm.PFM(config("pfm_h1")).init({"features": f}, jax.random.key(0))["params"]["hierarchy1"]
  assert not any(k.startswith("reverse") for k in unidirectional)


def test_mbpfm_map_is_the_mean_of_resized_hierarchy_maps():
  c = config("mbpfm")
  f = features()
  state = pfm.PFM(c).init({"features": f}, jax.random.key(0))
  _, fused = pfm.PFM(c).score(state, {"features": f}, (16, 16))
  expected = []
  for k in (0, 1, 2):
    single = config(f"bpfm_h{k}")
    sub_state = {**state, "params": {f"hierarchy{k}": state["params"][f"hierarchy{k}"]},
                 "batch_stats": {f"hierarchy{k}": state["batch_stats"][f"hierarchy{k}"]}}
    expected.append(pfm.PFM(single).score(sub_state, {"features": f}, (16, 16))[1])
  np.testing.assert_allclose(fused, sum(expected) / 3, rtol=1e-5, atol=1e-6)
  assert fused.shape == (3, 16, 16)


def test_training_reduces_the_mapping_loss():
  c = config("mbpfm")
  c.model.lr = 3e-3  # a learnable toy problem, shortened
  rng = np.random.default_rng(1)
  f = features()
  # Targets that are a fixed linear function of the sources: a mapping exists to be learnt.
  f["target"] = tuple(np.einsum("bhwc,cd->bhwd", s, rng.normal(size=(s.shape[-1], t.shape[-1]))).astype(np.float32)
                      for s, t in zip(f["source"], f["target"]))
  method = pfm.PFM(c)
  state = method.init({"features": f}, jax.random.key(0))
  step = jax.jit(method.train_step)
  losses = []
  for i in range(15):
    state, metrics = step(state, {"features": f}, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.8 * losses[0]

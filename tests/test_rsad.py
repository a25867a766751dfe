"""RSAD: Mona equals its reference forward; eq. 7's margins on the pre-sigmoid output (the
default) truncate the loss to zero once normal and noised features are told apart, while
read literally on the sigmoid output they cannot."""

import jax
import numpy as np
import pytest

from adjax.methods import rsad
from configs import rsad as rsad_config


def _seg_losses(hinge_on_logits, steps=300):
  config = rsad_config.get_config("")
  config.model.aligner, config.model.dsc_hidden = "none", (32, 32)
  config.model.noise_std = 1.0  # noise far larger than the features: easily separable
  config.model.hinge_on_logits = hinge_on_logits
  features = np.random.default_rng(0).normal(0, 0.3, size=(4, 4, 4, 16)).astype(np.float32)
  method = rsad.RSAD(config)
  state = method.init({"features": features}, jax.random.key(0))
  step = jax.jit(lambda s, k: method.train_step(s, {"features": features}, k))
  losses = []
  for i in range(steps):
    state, metrics = step(state, jax.random.key(i + 1))
    losses.append(float(metrics["seg_loss"]))
  return np.array(losses)


def test_margins_on_the_logit_truncate_to_zero_once_separated():
  losses = _seg_losses(hinge_on_logits=True)
  assert losses[:5].mean() > 0.5
  assert losses[-10:].mean() < 0.15  # measured ~0.06 after 300 steps


def test_literal_margins_on_the_sigmoid_can_never_go_below_one_half():
  # th- = -0.5 is unreachable for D in (0, 1): the fake term D + 0.5 is always active.
  losses = _seg_losses(hinge_on_logits=False)
  assert losses.min() >= 0.5 - 1e-6
  assert losses[-10:].mean() < losses[:10].mean() - 0.1  # it learns, but can only approach the floor


@pytest.mark.parametrize("hinge_on_logits", [True, False])
def test_anomaly_map_is_one_minus_the_sigmoid_normality(hinge_on_logits):
  config = rsad_config.get_config("")
  config.model.dsc_hidden, config.model.hinge_on_logits = (8, 8), hinge_on_logits
  features = np.random.default_rng(1).normal(size=(2, 3, 3, 16)).astype(np.float32)
  method = rsad.RSAD(config)
  state = method.init({"features": features}, jax.random.key(0))
  image_scores, maps = method.score(state, {"features": features}, (3, 3))
  assert maps.shape == (2, 3, 3)
  assert float(maps.min()) > 0.0 and float(maps.max()) < 1.0
  np.testing.assert_allclose(image_scores, maps.max(axis=(1, 2)), rtol=1e-6)


def _torch_mona(params, x_nhwc):
  """Mona's reference forward (Yin et al.), re-stated in torch on NCHW, with our weights."""
  import torch
  import torch.nn.functional as F
  t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy
  x = t(x_nhwc)  # (B, H, W, C): the reference works on tokens (B, N, C)
  c = x.shape[-1]
  y = F.layer_norm(x, (c,), t(params["norm"]["scale"]), t(params["norm"]["bias"]), eps=1e-5) * t(params["gamma"]) \
      + x * t(params["gammax"])
  y = F.linear(y, t(params["project1"]["kernel"]).T, t(params["project1"]["bias"]))
  y = y.permute(0, 3, 1, 2)  # the reference reshapes tokens to an image for its convs
  ops = params["adapter_conv"]
  convs = []
  for i, k in enumerate((3, 5, 7)):
    w = t(ops[f"conv{i + 1}"]["kernel"]).permute(3, 2, 0, 1)  # HWIO (I = 1) -> OIHW
    convs.append(F.conv2d(y, w, t(ops[f"conv{i + 1}"]["bias"]), padding=k // 2, groups=y.shape[1]))
  y = (convs[0] + convs[1] + convs[2]) / 3.0 + y
  y = y + F.conv2d(y, t(ops["projector"]["kernel"]).permute(3, 2, 0, 1), t(ops["projector"]["bias"]))
  y = F.gelu(y.permute(0, 2, 3, 1))  # exact erf GeLU, as torch.nn.GELU()
  return (x + F.linear(y, t(params["project2"]["kernel"]).T, t(params["project2"]["bias"]))).numpy()


def test_mona_matches_its_reference_forward():
  pytest.importorskip("torch", reason="parity tests need the [test] extra (torch)")
  rng = np.random.default_rng(2)
  x = rng.normal(0, 0.3, size=(2, 7, 9, 24)).astype(np.float32)  # odd, non-square map
  mona = rsad.Mona(bottleneck=8, dropout=0.1)
  params = mona.init(jax.random.key(0), x, train=False)["params"]
  # Non-trivial values for the parameters whose init would hide a wiring error.
  params = jax.tree.map(lambda p: p + 0.1 * rng.normal(size=p.shape).astype(np.float32), params)
  ours = mona.apply({"params": params}, x, train=False)
  np.testing.assert_allclose(np.asarray(ours), _torch_mona(jax.device_get(params), x), rtol=1e-5, atol=1e-5)


def test_mona_starts_from_torch_default_init():
  # torch.nn.Linear / Conv2d defaults: weight std 1/sqrt(3 fan_in), bias U(+-1/sqrt(fan_in)).
  x = np.zeros((1, 8, 8, 512), np.float32)
  params = rsad.Mona(bottleneck=64).init(jax.random.key(0), x, train=False)["params"]
  for name, fan_in in (("project1", 512), ("project2", 64)):
    np.testing.assert_allclose(np.std(params[name]["kernel"]), 1 / np.sqrt(3 * fan_in), rtol=0.05)
    assert 0 < np.abs(params[name]["bias"]).max() <= 1 / np.sqrt(fan_in)
  conv = params["adapter_conv"]["conv3"]  # depth-wise 7x7: fan_in 49
  np.testing.assert_allclose(np.std(conv["kernel"]), 1 / np.sqrt(3 * 49), rtol=0.05)


@pytest.mark.parametrize("focal_on", ["image", "locations"])
def test_focal_term_is_on_the_image_max_or_on_every_location(focal_on):
  # Recompute eq. 8's term from the discriminator's train-mode outputs and compare.
  config = rsad_config.get_config("")
  config.model.aligner, config.model.dsc_hidden, config.model.focal_on = "none", (8, 8), focal_on
  features = np.random.default_rng(2).normal(0, 0.3, size=(2, 3, 3, 16)).astype(np.float32)
  method = rsad.RSAD(config)
  state = method.init({"features": features}, jax.random.key(0))
  key = jax.random.key(5)
  _, (_, metrics) = method.loss_fn(state["params"], state["batch_stats"], features, key)
  noise_key, _ = jax.random.split(key)
  true = features.reshape(-1, 16)
  fake = true + config.model.noise_std * np.asarray(jax.random.normal(noise_key, true.shape))
  discriminator = method.discriminator
  logits, _ = discriminator.apply({"params": state["params"]["discriminator"], "batch_stats": state["batch_stats"]},
                                  np.concatenate([true, fake]), train=True, mutable=["batch_stats"])
  anomaly = 1 - 1 / (1 + np.exp(-np.asarray(logits[:, 0], np.float64)))
  clean, noised = anomaly[:18], anomaly[18:]
  if focal_on == "image":
    anomaly = np.concatenate([clean.reshape(2, -1).max(1), noised.reshape(2, -1).max(1)])
    target = np.array([0, 0, 1, 1])
  else:
    target = np.concatenate([np.zeros(18), np.ones(18)])
  p_t = np.where(target == 1, anomaly, 1 - anomaly)
  expected = np.mean(-np.log(p_t) * (1 - p_t) ** 2 * np.where(target == 1, 0.25, 0.75))
  np.testing.assert_allclose(float(metrics["focal_loss"]), expected, rtol=1e-4)


def test_unknown_focal_target_is_a_config_error_when_the_method_is_built():
  from adjax.errors import ConfigError
  config = rsad_config.get_config("")
  config.model.focal_on = "pixels"
  with pytest.raises(ConfigError, match="model.focal_on"):
    rsad.RSAD(config)


def test_aligner_has_eq_10s_two_monas():
  # eq. 10 with m = 1536, n = 64: 2 x ((2n + 3)m + n^2 + 84n + 2) = 421,380 (the paper's 0.42 M, Table 5's
  # 1.65% of WideResNet50's 25.5 M). The reference implementation's Mona has per-channel LayerNorm
  # scales gamma and gammax (2m where eq. 10 counts 2 scalars) and biases on its three depth-wise
  # convolutions and its 1x1 projector (4n that eq. 10 leaves out).
  m, n = 1536, 64
  config = rsad_config.get_config("mpdd")
  params = rsad.RSAD(config).aligner.init(jax.random.key(0), np.zeros((1, 3, 3, m), np.float32), train=False)
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["params"]))
  eq10 = 2 * ((2 * n + 3) * m + n ** 2 + 84 * n + 2)
  assert eq10 == 421_380
  assert count == eq10 + 2 * (2 * m - 2 + 4 * n)
  assert sorted(params["params"]) == ["mona0", "mona1"]
  assert 0.0160 < count / 25.5e6 < 0.0170  # Table 5: 1.65% of the backbone

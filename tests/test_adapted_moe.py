"""Adapted-MoE: vmapped experts, center updates, routing, TTA, ablation switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adjax.methods import adapted_moe as am
from adjax.methods import common
from configs import adapted_moe as moe_config


def small_config(row="all"):
  c = moe_config.get_config(f"row={row}")
  c.model.target_embed_dim = c.model.pretrain_embed_dim = 16
  c.model.dsc_hidden = (24,)
  c.model.routing_width = 8
  return c


def data(n=6, size=5, channels=16, seed=0):
  rng = np.random.default_rng(seed)
  features = rng.normal(0, 0.3, (n, size, size, channels)).astype(np.float32)
  labels = (np.arange(n) % 3).astype(np.int32)
  return {"features": features, "subclass": labels}


def test_stacked_experts_equal_a_loop_over_experts():
  config = small_config()
  batch = data()
  method = am.AdaptedMoE(config)
  state = method.init(batch, jax.random.key(0), num_subclasses=3)
  expert = common.Discriminator(tuple(config.model.dsc_hidden))
  x = jnp.asarray(batch["features"].reshape(-1, 16))
  stacked = jax.vmap(lambda p, s: am.apply_expert(expert, p, s, x, train=False)[0])(
      state["params"]["experts"], state["batch_stats"])
  for k in range(3):
    params = jax.tree.map(lambda p: p[k], state["params"]["experts"])
    stats = jax.tree.map(lambda s: s[k], state["batch_stats"])
    single = expert.apply({"params": params, "batch_stats": stats}, x, train=False)[:, 0]
    np.testing.assert_allclose(stacked[k], single, rtol=1e-6, atol=1e-6)
  assert not np.allclose(stacked[0], stacked[1])  # experts are initialised independently


def test_training_step_routes_each_image_to_its_own_expert():
  config = small_config()
  batch = data()
  batch["subclass"] = np.array([0, 0, 2, 2, 0, 2], np.int32)  # expert 1 gets no image
  method = am.AdaptedMoE(config)
  state = method.init(batch, jax.random.key(0), num_subclasses=3)
  new_state, _ = method.train_step(state, batch, jax.random.key(1))
  before, after = state["params"]["experts"], new_state["params"]["experts"]
  changed = [not np.allclose(jax.tree.leaves(before)[0][k], jax.tree.leaves(after)[0][k]) for k in range(3)]
  assert changed == [True, False, True]
  for leaf_before, leaf_after in zip(jax.tree.leaves(state["batch_stats"]), jax.tree.leaves(new_state["batch_stats"])):
    np.testing.assert_array_equal(leaf_before[1], leaf_after[1])


def test_center_update_follows_wen_et_al():
  centers = jnp.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
  x = jnp.array([[1.0, 0.0], [3.0, 0.0], [1.0, 3.0]])
  labels = jnp.array([0, 0, 1])
  new = np.asarray(am.center_update(centers, x, labels, rate=0.5))
  # c0: delta = (2*c0 - (x0 + x1)) / (1 + 2) = (-4, 0) / 3; c0 - 0.5 * delta = (2/3, 0).
  np.testing.assert_allclose(new[0], [2 / 3, 0.0], rtol=1e-6)
  # c1: delta = (c1 - x2) / 2 = (0, -1); c1 - 0.5 * delta = (1, 1.5).
  np.testing.assert_allclose(new[1], [1.0, 1.5], rtol=1e-6)
  np.testing.assert_array_equal(new[2], [5.0, 5.0])  # no samples: unchanged


def test_routing_picks_the_nearest_center_by_cosine():
  config = small_config()
  batch = data(n=3)
  method = am.AdaptedMoE(config)
  state = method.init(batch, jax.random.key(0), num_subclasses=3)
  routing_net = method.routing_net(3)
  embeddings, _ = routing_net.apply({"params": state["params"]["routing"]}, batch["features"])
  # Centers: each image's embedding (scaled: cosine ignores length) in a permuted order.
  state = {**state, "centers": jnp.stack([3 * embeddings[2], 0.5 * embeddings[0], embeddings[1]])}
  indices, weights = method.route(state, batch["features"])
  assert list(np.asarray(indices[:, 0])) == [1, 2, 0]
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)


def test_tta_output_has_the_experts_statistics_before_normalisation():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(3.0, 2.0, (50, 8)).astype(np.float32))
  mean = jnp.asarray(rng.normal(size=8).astype(np.float32))
  std = jnp.asarray(rng.uniform(0.1, 1.0, 8).astype(np.float32))
  normalised, shifted = am.test_time_adapt(q, mean, std)
  np.testing.assert_allclose(shifted.mean(0), mean, atol=1e-5)
  np.testing.assert_allclose(shifted.std(0, ddof=1), std, rtol=1e-4)
  np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, rtol=1e-5)


def _after_one_step(row):
  config = small_config(row)
  batch = data()
  method = am.AdaptedMoE(config)
  state = method.init(batch, jax.random.key(0), num_subclasses=3)
  state, metrics = method.train_step(state, batch, jax.random.key(1))
  state = method.finalize(state, [batch])
  return method, state, metrics, batch


def test_tta_changes_only_inference():
  method_tta, state_tta, metrics_tta, batch = _after_one_step("moe_tta")
  method_plain, state_plain, metrics_plain, _ = _after_one_step("moe")
  for a, b in zip(jax.tree.leaves(state_tta["params"]), jax.tree.leaves(state_plain["params"])):
    np.testing.assert_array_equal(a, b)
  assert float(metrics_tta["loss"]) == float(metrics_plain["loss"])
  scores_tta = method_tta.score(state_tta, batch, (5, 5))[1]
  scores_plain = method_plain.score(state_plain, batch, (5, 5))[1]
  assert not np.allclose(scores_tta, scores_plain)


def test_moe_switch_controls_experts_and_routing_only():
  _, state, metrics, _ = _after_one_step("baseline")
  assert state["centers"].shape[0] == 1 and "routing_loss" not in metrics
  assert float(metrics["loss"]) == float(metrics["expert_loss"])  # SimpleNet's loss alone
  _, state, metrics, _ = _after_one_step("moe")
  assert state["centers"].shape[0] == 3 and "routing_loss" in metrics


def test_norm_switch_normalises_expert_inputs_only_when_on():
  for row, normalised in (("moe_norm", True), ("moe", False)):
    method, state, _, batch = _after_one_step(row)
    q = np.asarray(method.expert_inputs(state["params"], batch["features"]), np.float64)
    if normalised:
      q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    expert0 = q[batch["subclass"] == 0].reshape(-1, q.shape[-1])
    # The experts' statistics are taken on exactly what the experts see.
    np.testing.assert_allclose(state["expert_mean"][0], expert0.mean(0), rtol=1e-4, atol=1e-6)


def test_softmax_routing_loss_variant_drops_the_center_term():
  config = small_config()
  config.model.routing_loss = "softmax"
  batch = data()
  method = am.AdaptedMoE(config)
  state = method.init(batch, jax.random.key(0), num_subclasses=3)
  new_state, metrics = method.train_step(state, batch, jax.random.key(1))
  assert float(metrics["routing_loss"]) == float(metrics["routing_ce"])
  np.testing.assert_array_equal(new_state["centers"], state["centers"])


def test_kmeans_subclasses_when_the_dataset_has_none():
  config = small_config()
  config.model.subclass_source, config.model.num_experts = "kmeans", 2
  rng = np.random.default_rng(0)
  features = np.concatenate([rng.normal(-2, 0.1, (5, 3, 3, 4)), rng.normal(2, 0.1, (5, 3, 3, 4))]).astype(np.float32)
  labels = am.AdaptedMoE(config).assign_subclasses(features, np.zeros(10, np.int32), jax.random.key(0))
  assert len(set(labels[:5])) == 1 and len(set(labels[5:])) == 1 and labels[0] != labels[5]


def test_both_routing_losses_send_each_subclass_to_its_own_expert():
  # Three subclasses with different feature means; before the softmax row routed by the
  # classifier, its centers stayed at zero and every image went to expert 0.
  rng = np.random.default_rng(3)
  means = rng.normal(0, 1.0, (3, 1, 1, 16))
  labels = np.arange(24) % 3
  features = (means[labels] + rng.normal(0, 0.3, (24, 5, 5, 16))).astype(np.float32)
  for loss in ("center", "softmax"):
    config = small_config()
    config.model.routing_loss, config.model.routing_lr = loss, 1e-2  # a few steps suffice on this toy set
    method = am.AdaptedMoE(config)
    state = method.init({"features": features}, jax.random.key(0), num_subclasses=3)
    step = jax.jit(method.train_step)
    for t in range(60):
      idx = np.arange(8 * (t % 3), 8 * (t % 3) + 8)
      state, _ = step(state, {"features": features[idx], "subclass": labels[idx].astype(np.int32)},
                      jax.random.key(t))
    routed = np.asarray(method.route(state, features)[0][:, 0])
    assert (routed == labels).mean() >= 0.9, (loss, routed, labels)


def test_moe_on_data_without_subclasses_says_so(caplog):
  import logging
  method = am.AdaptedMoE(small_config())
  with caplog.at_level(logging.WARNING):
    method.check_subclasses(1, "bottle")
  assert "bottle: the training images have no subclasses" in caplog.text and "subclass_source=kmeans" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    method.check_subclasses(3, "cloth")
    am.AdaptedMoE(small_config("baseline")).check_subclasses(1, "bottle")  # no MoE asked for: nothing to say
  assert not caplog.text


def test_kmeans_subclasses_need_a_cluster_count():
  from adjax.errors import ConfigError
  config = small_config()
  config.model.subclass_source = "kmeans"  # num_experts keeps its default 0
  with pytest.raises(ConfigError, match="model.num_experts"):
    am.AdaptedMoE(config)


def test_report_has_routing_counts_and_per_subclass_and_table_1_figures(tmp_path, synthetic_root, caplog):
  import json
  import logging

  from adjax import train
  config = small_config()
  config.data.root, config.data.category = synthetic_root, "cloth"
  config.data.image_size = config.data.crop_size = 64
  config.train.epochs, config.eval.num_overlays = 1, 0
  with caplog.at_level(logging.INFO):
    report = train.run(config, str(tmp_path), "train")["cloth"]
  counts = report["diagnostics"]["expert routing counts"]
  assert len(counts) == 3 and sum(counts) == report["num_images"]  # top-1: each test image once
  assert f"cloth: expert routing counts: {counts}" in caplog.text
  subclasses = report["subclasses"]
  unseen = [name for name, m in subclasses.items() if m["unseen"]]
  assert len(subclasses) == 5 and len(unseen) == 2
  expected = np.mean([subclasses[name]["image_auroc"] for name in unseen])
  assert report["unseen_subclass_mean"]["image_auroc"] == pytest.approx(expected)
  assert report["unseen"]["image_auroc"] is not None  # the pooled figure keeps its meaning
  assert set(report["defect_types"]) and all(m["num_anomalous"] > 0 for m in report["defect_types"].values())
  written = json.load(open(tmp_path / "metrics.json"))["metrics"]["cloth"]
  assert written["unseen_subclass_mean"] == report["unseen_subclass_mean"]
  markdown = (tmp_path / "metrics.md").read_text()
  assert "Per subclass" in markdown and "Per defect type" in markdown and "unseen mean I" in markdown

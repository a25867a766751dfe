"""Adapted-MoE (Lei et al., 2024): routing network + one SimpleNet expert per subclass + TTA.

Training (Sec. 2.1): patch features -> shared SimpleNet adaptor -> the expert of the image's
subclass, trained with SimpleNet's noise + truncated-L1 loss; a routing network embeds the
image, x_i = GAP(relu(conv3x3(X_i))) (eq. 1), optionally L2-normalised ("Norm"), trained
with alpha * ||x_i - c_y||^2 + (1 - alpha) * softmax cross-entropy over subclasses (eq. 2;
`routing_loss='softmax'` drops the center term, Table 3). Centers follow Wen et al. (ECCV
2016): c_j <- c_j - center_lr * sum_{y_i=j}(c_j - x_i) / (1 + n_j). Total loss = routing +
expert losses (eq. 3). Experts share one set of stacked parameters (leading expert axis):
each image's patches go through its expert by an index, so E experts cost one batched call.

Inference: cosine similarity of the test embedding to the centers, softmax, top-k experts,
scores averaged with the softmax weights (eq. 4); with `routing_loss='softmax'` (no centers
are learned) the routing classifier's softmax takes the similarities' place. TTA (eq. 5-6): the image's patch features
are shifted and scaled to the chosen expert's training mean and std, then L2-normalised.

Where the paper is silent or ambiguous, the official code (github ray3572/AdaptedMoE) decides:
- TTA acts on the expert's input patch features with per-dimension mean/std over the image's
  patches (unbiased std) and the expert's training statistics (`moe_center_shift`);
  adjax computes those statistics exactly over all training patches after training, where
  the reference samples 100 patches per image during its last epochs.
- "Norm" L2-normalises the expert inputs, real and noised (`pre_proj_norm`), in training
  and testing; here it also normalises the routing embedding, as Sec. 2.1 describes.
- top_k defaults to 1 (`topK=1`); experts are SimpleNet discriminators; each expert's
  BatchNorm sees one image's real + noised patches, as the reference calls each expert per
  image; an expert that gets no image in a batch is not updated (torch Adam skips
  parameters without gradients). optax's Adam keeps one step count for all parameters, so an
  expert's bias corrections use the global step where torch would use its own count: the
  two differ in update size only while 0.999^t is not yet small (the first ~1000 steps).
- The reference routes with a per-patch linear classifier and its center-loss term is a
  no-op (a line break detaches it from the loss); adjax implements the paper's routing.
- alpha = 0.1 (the reference's center-loss weight); center_lr = 0.5 (Wen et al.).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from adjax.errors import ConfigError
from adjax.methods import base, common, simplenet


def _l2(x, axis=-1):
  return x / (jnp.linalg.norm(x, axis=axis, keepdims=True) + 1e-12)


class RoutingNet(nn.Module):
  width: int
  num_experts: int
  normalize: bool

  @nn.compact
  def __call__(self, features):
    x = nn.relu(nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), name="projection")(features))
    x = x.mean(axis=(1, 2))  # eq. 1: GAP
    if self.normalize:
      x = _l2(x)
    logits = nn.Dense(self.num_experts, use_bias=False, name="classifier")(x)  # the matrix w of eq. 2
    return x, logits


def apply_expert(expert, params, stats, x, train):
  """One expert on patch features x (N, C) with its own parameters and BatchNorm statistics."""
  if train:
    out, updates = expert.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return out[:, 0], updates["batch_stats"]
  return expert.apply({"params": params, "batch_stats": stats}, x, train=False)[:, 0], stats


def center_update(centers, embeddings, labels, rate):
  """Wen et al. (2016) eq. 4: c_j -= rate * sum_{y_i=j}(c_j - x_i) / (1 + n_j)."""
  onehot = jax.nn.one_hot(labels, centers.shape[0], dtype=centers.dtype)  # (B, E)
  counts = onehot.sum(axis=0)
  delta = (counts[:, None] * centers - onehot.T @ embeddings) / (1.0 + counts[:, None])
  return centers - rate * delta


def _merge_expert_stats(old, new_per_image, experts, e):
  """Each expert's running statistics become the mean of its images' updates; others stay."""
  onehot = jax.nn.one_hot(experts, e)
  counts = onehot.sum(0)

  def merge(o, n):
    summed = jnp.einsum("be,b...->e...", onehot, n)
    mask = (counts > 0).reshape((e,) + (1,) * (o.ndim - 1))
    return jnp.where(mask, summed / jnp.maximum(counts, 1).reshape(mask.shape), o)
  return jax.tree.map(merge, old, new_per_image), counts > 0


def _keep_untouched_experts(new, old, touched):
  """Leaves under 'experts' (leading expert axis) keep their old value for experts without images."""
  e = touched.shape[0]

  def select(path, n, o):
    if any(getattr(k, "key", None) == "experts" for k in path) and n.ndim >= 1 and n.shape[0] == e:
      return jnp.where(touched.reshape((e,) + (1,) * (n.ndim - 1)), n, o)
    return n
  return jax.tree_util.tree_map_with_path(select, new, old)


def test_time_adapt(q, mean, std):
  """eq. 5-6: (q - mean(q)) * std_k / std(q) + c_k over the image's patches, then L2-normalise."""
  shifted = (q - q.mean(axis=0)) * (std / (q.std(axis=0, ddof=1) + 1e-12)) + mean
  return _l2(shifted), shifted



class AdaptedMoE(common.FeatureScale, base.Method):
  """Shared adaptor, routing network and stacked SimpleNet experts on cached patch features."""

  @classmethod
  def check_config(cls, config):
    super().check_config(config)
    m = config.model
    for key, allowed in (("routing_loss", ("center", "softmax")), ("subclass_source", ("dataset", "kmeans"))):
      cls.check_choice(key, m[key], allowed)
    if m.subclass_source == "kmeans" and m.num_experts < 2:
      raise ConfigError(f"model.subclass_source='kmeans' needs model.num_experts >= 2 clusters, not {m.num_experts}: "
                        "set --config.model.num_experts to the number of subclasses to derive (e.g. 3).")
    if m.top_k < 1:
      raise ConfigError(f"model.top_k must be at least 1, not {m.top_k}.")

  def __init__(self, config):
    super().__init__(config)
    m = config.model
    self.adaptor = simplenet.Adaptor(m.adaptor_layers)
    self.expert = common.Discriminator(tuple(m.dsc_hidden))
    self.routing_width = m.routing_width or m.target_embed_dim
    adam = lambda lr, wd: optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))
    self.tx = optax.multi_transform({
        "adaptor": optax.adamw(m.adaptor_lr, weight_decay=m.adaptor_weight_decay),
        "routing": adam(m.routing_lr, m.dsc_weight_decay),
        "experts": adam(m.dsc_lr, m.dsc_weight_decay),
    }, {"adaptor": "adaptor", "routing": "routing", "experts": "experts"})

  def num_experts(self, num_subclasses: int) -> int:
    return max(1, num_subclasses) if self.config.model.moe else 1

  def routing_net(self, experts: int) -> RoutingNet:
    """The routing network for `experts` classes (its classifier's width is the state's expert count)."""
    return RoutingNet(self.routing_width, experts, self.config.model.norm)

  def check_subclasses(self, num_subclasses, label=""):
    """An MoE over one subclass is one SimpleNet expert: said at start-up, not left silent."""
    if self.config.model.moe and num_subclasses < 2:
      from absl import logging
      logging.warning("%s: the training images have no subclasses, so model.moe trains one expert (SimpleNet "
                      "with a routing network that has nothing to route). To derive subclasses, set "
                      "model.subclass_source=kmeans and model.num_experts=<clusters>.", label)

  def derives_subclasses(self) -> bool:
    return self.config.model.subclass_source == "kmeans"

  def assign_subclasses(self, features, subclass, key):
    """Subclass labels for training images. From the dataset when it has subclasses; else,
    with model.subclass_source='kmeans', k-means (model.num_experts clusters) on the images'
    GAP patch features, the routing network's input before it is trained."""
    if not self.derives_subclasses():
      return subclass
    from absl import logging
    from sklearn.cluster import KMeans
    k = self.config.model.num_experts
    logging.info("Deriving %d subclasses by k-means on the training images' pooled patch features "
                 "(model.subclass_source='kmeans').", k)
    pooled = np.asarray(features).mean(axis=(1, 2))
    seed = int(jax.random.randint(key, (), 0, 2 ** 31 - 1))
    return KMeans(k, n_init=10, random_state=seed).fit_predict(pooled).astype(np.int32)

  def init(self, sample, key, num_subclasses=1):
    features = sample["features"]
    e = self.num_experts(num_subclasses)
    c = features.shape[-1]
    k_adaptor, k_routing, k_experts = jax.random.split(key, 3)
    sample = jnp.zeros((1,) + tuple(features.shape[1:]), jnp.float32)
    expert_vars = jax.vmap(lambda k: self.expert.init(k, jnp.zeros((2, c)), train=False))(
        jax.random.split(k_experts, e))
    params = {"adaptor": self.adaptor.init(k_adaptor, jnp.zeros((2, c)))["params"],
              "routing": self.routing_net(e).init(k_routing, sample)["params"],
              "experts": expert_vars["params"]}
    return {"params": params, "batch_stats": expert_vars["batch_stats"], "opt_state": self.tx.init(params),
            "centers": jnp.zeros((e, self.routing_width), jnp.float32),
            "expert_mean": jnp.zeros((e, c), jnp.float32), "expert_std": jnp.ones((e, c), jnp.float32),
            "step": jnp.zeros((), jnp.int32), "feature_scale": self.initial_feature_scale()}

  def expert_inputs(self, params, features):
    """The shared adaptor's output for every patch, (B, HW, C)."""
    b, h, w, c = features.shape
    return self.adaptor.apply({"params": params["adaptor"]}, features.reshape(b, h * w, c))

  def routing_loss(self, embeddings, logits, centers, labels):
    m = self.config.model
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    if m.routing_loss == "softmax":
      return ce, ce, jnp.zeros(())
    center = jnp.mean(jnp.sum((embeddings - centers[labels]) ** 2, axis=-1))
    return m.center_alpha * center + (1 - m.center_alpha) * ce, ce, center

  def loss_fn(self, params, state, features, labels, key):
    m = self.config.model
    e = state["centers"].shape[0]
    q = self.expert_inputs(params, features)
    fake = q + m.noise_std * jax.random.normal(key, q.shape, q.dtype)
    true = q
    if m.norm:  # the reference normalises after adding the noise
      true, fake = _l2(true), _l2(fake)
    experts = labels if m.moe else jnp.zeros_like(labels)
    per_image_params = jax.tree.map(lambda p: p[experts], params["experts"])
    per_image_stats = jax.tree.map(lambda s: s[experts], state["batch_stats"])

    def one_image(p, s, t, f):
      scores, new_stats = apply_expert(self.expert, p, s, jnp.concatenate([t, f]), train=True)
      t_scores, f_scores = jnp.split(scores, 2)
      return common.truncated_l1(t_scores, f_scores, m.th_pos, m.th_neg), new_stats, t_scores, f_scores

    losses, new_stats, t_scores, f_scores = jax.vmap(one_image)(per_image_params, per_image_stats, true, fake)
    expert_loss = losses.mean()  # the reference: sum over images / batch size
    aux = {"expert_loss": expert_loss, "p_true": jnp.mean(t_scores >= m.th_pos),
           "p_fake": jnp.mean(f_scores < m.th_neg)}
    loss = expert_loss
    embeddings = jnp.zeros((features.shape[0], state["centers"].shape[1]))
    if m.moe and e > 1:
      embeddings, logits = self.routing_net(e).apply({"params": params["routing"]}, features)
      r_loss, ce, center = self.routing_loss(embeddings, logits, state["centers"], labels)
      loss = loss + r_loss  # eq. 3
      aux.update(routing_loss=r_loss, routing_ce=ce, center_loss=center,
                 routing_accuracy=jnp.mean(jnp.argmax(logits, -1) == labels))
    aux["loss"] = loss
    return loss, (aux, new_stats, experts, embeddings)

  def train_step(self, state, batch, key):
    e = state["centers"].shape[0]
    labels = batch["subclass"]
    grad_fn = jax.value_and_grad(self.loss_fn, argnums=0, has_aux=True)
    (_, (metrics, new_stats, experts, embeddings)), grads = grad_fn(
        state["params"], state, batch["features"] * state["feature_scale"], labels, key)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    batch_stats, touched = _merge_expert_stats(state["batch_stats"], new_stats, experts, e)
    params = _keep_untouched_experts(params, state["params"], touched)
    opt_state = _keep_untouched_experts(opt_state, state["opt_state"], touched)
    centers = state["centers"]
    if self.config.model.moe and e > 1 and self.config.model.routing_loss == "center":
      centers = center_update(centers, jax.lax.stop_gradient(embeddings), labels, self.config.model.center_lr)
    return {**state, "params": params, "batch_stats": batch_stats, "opt_state": opt_state, "centers": centers,
            "step": state["step"] + 1}, metrics

  def route(self, state, features):
    """(top-k expert indices (B, k), their weights (B, k)): with the center loss, a softmax over
    the cosine similarities to the centers (Sec. 2.1's inference); with the softmax loss
    alone (Table 3), whose centers are never trained, the routing classifier's own softmax
    (Sec. 2.1: routing is "scored by cosine similarity and softmax of the classifier")."""
    e = state["centers"].shape[0]
    b = features.shape[0]
    if not self.config.model.moe or e == 1:
      return jnp.zeros((b, 1), jnp.int32), jnp.ones((b, 1))
    embeddings, logits = self.routing_net(e).apply({"params": state["params"]["routing"]}, features)
    if self.config.model.routing_loss == "softmax":
      probabilities = jax.nn.softmax(logits, axis=-1)
    else:
      probabilities = jax.nn.softmax(_l2(embeddings) @ _l2(state["centers"]).T, axis=-1)
    k = min(self.config.model.top_k, e)
    weights, indices = jax.lax.top_k(probabilities, k)
    return indices, weights / weights.sum(axis=-1, keepdims=True)  # eq. 4's normalisation

  def diagnostics(self, state, inputs):
    """Per image, how many of its top-k routes go to each expert (summed: images per expert)."""
    indices, _ = self.route(state, inputs["features"] * state["feature_scale"])
    return {"expert routing counts": jax.nn.one_hot(indices, state["centers"].shape[0], dtype=jnp.int32).sum(1)}

  def score(self, state, inputs, image_shape):
    m = self.config.model
    features = inputs["features"] * state["feature_scale"]
    b, h, w, _ = features.shape
    q = self.expert_inputs(state["params"], features)
    if m.norm:
      q = _l2(q)
    indices, weights = self.route(state, features)

    def one(q_image, k):
      x = test_time_adapt(q_image, state["expert_mean"][k], state["expert_std"][k])[0] if m.tta else q_image
      params = jax.tree.map(lambda p: p[k], state["params"]["experts"])
      stats = jax.tree.map(lambda s: s[k], state["batch_stats"])
      return -apply_expert(self.expert, params, stats, x, train=False)[0]

    scores = jax.vmap(lambda q_image, ks: jax.vmap(functools.partial(one, q_image))(ks))(q, indices)  # (B, k, HW)
    maps = jnp.einsum("bk,bkn->bn", weights, scores).reshape(b, h, w)
    return maps.max(axis=(1, 2)), maps

  def finalize(self, state, batches):
    """Each expert's per-dimension mean and std of its training patches' inputs (for TTA)."""
    e = state["centers"].shape[0]
    c = state["expert_mean"].shape[1]
    total, total_sq, count = np.zeros((e, c)), np.zeros((e, c)), np.zeros(e)
    norm = self.config.model.norm

    @jax.jit
    def inputs(params, features, scale):
      q = self.expert_inputs(params, features * scale)
      return _l2(q) if norm else q

    for batch in batches:
      q = np.asarray(inputs(state["params"], batch["features"], state["feature_scale"]), np.float64)
      experts = batch["subclass"] if self.config.model.moe else np.zeros_like(batch["subclass"])
      for k in range(e):
        rows = q[experts == k].reshape(-1, c)
        total[k] += rows.sum(0)
        total_sq[k] += (rows ** 2).sum(0)
        count[k] += len(rows)
    mean = total / np.maximum(count, 1)[:, None]
    var = (total_sq - count[:, None] * mean ** 2) / np.maximum(count - 1, 1)[:, None]
    return {**state, "expert_mean": jnp.asarray(mean, jnp.float32),
            "expert_std": jnp.asarray(np.sqrt(np.maximum(var, 0)), jnp.float32)}

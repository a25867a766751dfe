"""Methods. Each module under adjax/methods implements the same small interface:

  init(config, train_features, key, num_subclasses=1) -> state
      state: a pytree (params, optimiser state, statistics...). `train_features` are the
      frozen-backbone patch features of the training set, (N, H, W, C), the only thing a
      method sees of the data.
  score(config, state, features) -> (image_scores (B,), patch_maps (B, H, W))
      pure and jittable; higher = more anomalous.
Methods trained by gradient descent add
  train_step(config, state, batch, key) -> (state, metrics)
      pure; batch = {'features': (B, H, W, C), 'subclass': (B,)}; train.py jits it over a
      data-parallel device mesh, feeds cached features and checkpoints `state`.
`init` then receives only a sample of the features (for shapes). Optional hooks:
  assign_subclasses(config, features, subclass, key) -> subclass   before training
  finalize(config, state, batches) -> state                        after training
Methods know nothing about files, datasets or reports.
"""

import importlib

from adjax.errors import ConfigError

METHODS = ("patch_knn", "simplenet", "rsad", "adapted_moe", "pfm")


def get(name: str):
  if name not in METHODS:
    raise ConfigError(f"Unknown method '{name}' in model.name. Available: {', '.join(METHODS)}.")
  return importlib.import_module(f"adjax.methods.{name}")

"""Methods: one module per method, each a `base.Method` subclass (the protocol is documented
in adjax/methods/base.py). The loop finds them here by `model.name`."""

import importlib

from adjax.errors import ConfigError

# model.name -> "module:Class" under adjax.methods; `register` adds others (e.g. tests' toy methods).
_REGISTRY = {
    "patch_knn": "patch_knn:PatchKNN",
    "simplenet": "simplenet:SimpleNet",
    "rsad": "rsad:RSAD",
    "adapted_moe": "adapted_moe:AdaptedMoE",
    "pfm": "pfm:PFM",
    "fegan": "fegan:FEGAN",
    "triplet": "triplet:Triplet",
}
METHODS = tuple(_REGISTRY)


def register(name: str, cls) -> None:
  """Makes `cls` (a base.Method subclass) available as model.name=`name`."""
  _REGISTRY[name] = cls


def get(name: str):
  """The method class registered as `name`."""
  if name not in _REGISTRY:
    raise ConfigError(f"Unknown method '{name}' in model.name. Available: {', '.join(_REGISTRY)}.")
  entry = _REGISTRY[name]
  if isinstance(entry, str):
    module, _, cls = entry.partition(":")
    entry = getattr(importlib.import_module(f"adjax.methods.{module}"), cls)
  return entry


def build(config):
  """The method of config.model.name, built from `config` (its keys checked first)."""
  return get(config.model.name)(config)

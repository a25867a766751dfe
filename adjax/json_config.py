"""A trained workdir's config.json as a config file: `--config=<workdir>/config.json`.

adjax.main rewrites that flag to `--config=<this file>:<path>`, so ml_collections loads the
JSON through `get_config` and `--config.<key>=<value>` overrides work as for any config file.
"""

import json
import os

import ml_collections
from absl import logging

from adjax import configlib
from adjax.errors import ConfigError


def _tuples(value):
  """JSON has no tuples: lists of plain values come back as the tuples the config files use."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def get_config(path: str = ""):
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ConfigError(f"The config file {path!r} does not exist. Give a workdir's config.json, e.g. "
                      "--config=runs/demo/config.json.")
  try:
    values = json.load(open(path))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}); restore it from the run that wrote it.") from None
  config = ml_collections.ConfigDict(_tuples(values))
  _add_missing(config, configlib.base(), ("data", "train", "eval"), path)
  return config


def _add_missing(config, defaults, sections, path) -> None:
  """A config.json written before a shared key existed gets that key's default (never a changed value)."""
  added = []
  for section in sections:
    if section in config:
      for key, value in defaults[section].items():
        if key not in config[section]:
          config[section][key] = value
          added.append(f"{section}.{key}={value!r}")
  if added:
    logging.warning("%s was written before these keys existed; using their defaults: %s.", path, ", ".join(added))

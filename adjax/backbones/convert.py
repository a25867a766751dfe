"""torch state dict (numpy arrays) -> Flax variables, by one rule for every architecture.

A torch key `layer1.0.downsample.1.running_mean` names module path `layer1.0.downsample.1`;
numeric parts join the part before them (`layer1_0/downsample_1`) and leading underscores
go (`_blocks.3._bn0` -> `blocks_3/bn0`), which is how adjax's Flax modules are named.
Convolutions OIHW -> HWIO, linear (out, in) -> (in, out), BatchNorm weight/bias ->
scale/bias in `params` and running statistics -> mean/var in `batch_stats`.
"""

from collections.abc import Iterable

import numpy as np
from flax import traverse_util

from adjax.errors import WeightsError


def flax_module_path(torch_module_path: str) -> tuple[str, ...]:
  parts = []
  for part in torch_module_path.split("."):
    if part.isdigit() and parts:
      parts[-1] = f"{parts[-1]}_{part}"
    else:
      parts.append(part.lstrip("_"))
  return tuple(parts)


def torch_to_flax(state_dict: dict, ignored_prefixes: Iterable[str] = ()) -> dict:
  ignored_prefixes = tuple(ignored_prefixes)
  params, stats = {}, {}
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked") or (ignored_prefixes and key.startswith(ignored_prefixes)):
      continue
    module, leaf = key.rsplit(".", 1)
    path = flax_module_path(module)
    value = np.asarray(value, dtype=np.float32)
    if f"{module}.running_mean" in state_dict:  # BatchNorm
      target, name = {"weight": (params, "scale"), "bias": (params, "bias"),
                      "running_mean": (stats, "mean"), "running_var": (stats, "var")}[leaf]
      target[path + (name,)] = value
    elif leaf == "weight" and value.ndim == 4:
      params[path + ("kernel",)] = np.transpose(value, (2, 3, 1, 0))
    elif leaf == "weight" and value.ndim == 2:
      params[path + ("kernel",)] = value.T
    elif leaf == "bias":
      params[path + ("bias",)] = value
    else:
      raise WeightsError(f"cannot convert weight {key} of shape {value.shape}")
  variables = {"params": traverse_util.unflatten_dict(params)}
  if stats:
    variables["batch_stats"] = traverse_util.unflatten_dict(stats)
  return variables


def check_matches(variables: dict, expected_shapes: dict, source: str) -> None:
  """Raises WeightsError unless `variables` has exactly the expected leaves and shapes."""
  got = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected_shapes, sep="/").items()}
  missing = sorted(set(want) - set(got))
  unexpected = sorted(set(got) - set(want))
  wrong = sorted(k for k in set(got) & set(want) if got[k] != want[k])
  if missing or unexpected or wrong:
    details = []
    if missing:
      details.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
    if unexpected:
      details.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    if wrong:
      details.append(f"wrong shape for {[(k, got[k], want[k]) for k in wrong[:3]]}")
    raise WeightsError(f"Weights from {source} do not fit this architecture: {'; '.join(details)}. "
                       "Check that model.backbone names the architecture the file was saved from.")

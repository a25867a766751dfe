"""adjax: JAX/Flax industrial visual anomaly detection."""

import os

__version__ = "0.1.0"

# XLA:CPU compiles convolutions through YNNPACK by default in jaxlib 0.10.2, and that path is
# slower than its older Eigen one on 2-core CPUs (benchmarks/README.md). XLA reads XLA_FLAGS
# when its first backend starts, so this must run before any computation; a user's own setting
# of the flag wins. The flag is experimental and XLA aborts on flags it does not know, so it is
# set only for the jaxlib versions measured.
_YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def with_cpu_flags(xla_flags: str, jaxlib_version: tuple) -> str:
  """XLA_FLAGS with adjax's CPU default added, when that jaxlib was measured and the user has
  not set the flag."""
  if (0, 10, 2) <= tuple(jaxlib_version) < (0, 11) and _YNN_FLAG not in xla_flags:
    return f"{xla_flags} {_YNN_FLAG}=-individual_convolution".strip()
  return xla_flags


def _jaxlib_version() -> tuple:
  from importlib.metadata import version
  try:
    return tuple(int(p) for p in version("jaxlib").split(".")[:3])
  except Exception:  # not installed, or a development version: leave XLA's defaults
    return ()


os.environ["XLA_FLAGS"] = with_cpu_flags(os.environ.get("XLA_FLAGS", ""), _jaxlib_version())

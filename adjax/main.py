r"""adjax command line: train, evaluate or predict with one config file.

  python -m adjax.main --config=configs/adapted_moe.py --workdir=runs/demo
  python -m adjax.main --config=configs/simplenet.py:mvtec_ad --config.data.root=/data/mvtec \
      --config.data.category=bottle --workdir=runs/bottle --mode=eval
  python -m adjax.main --config=configs/patch_knn.py --workdir=runs/demo --mode=predict \
      --predict_dir=/path/to/images --config.data.category=cloth

Any config key can be overridden with --config.<key>=<value>. Errors in the input
(missing files, unknown keys, bad values) end the run with a one-paragraph message and
exit status 2; --verbose shows the Python traceback too.
"""

import logging as pylogging
import os
import runpy
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from adjax import io_utils
from adjax.errors import AdjaxError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and overlays go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"],
                          "train (then evaluate), eval (a trained workdir), predict (score --predict_dir).")
_PREDICT_DIR = flags.DEFINE_string("predict_dir", "", "Folder of images to score in --mode=predict.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show tracebacks on errors.")


def _fail(message: str, code: int = 2):
  sys.stderr.write(f"adjax: error: {message}\n")
  sys.exit(code)


def _config_error(argv, error: Exception) -> str:
  """Names the config file, variant or key behind a failure to build the config."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  path, _, variant = spec.partition(":")
  if not os.path.exists(path):
    return f"Config file {path!r} does not exist. Give --config=configs/<method>.py[:variant]."
  try:
    base = runpy.run_path(path)["get_config"](*([variant] if variant else []))
  except Exception as e:  # the config file's own message names the variant
    return f"{path} could not build a config for variant {variant!r}: {e}"
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    node = base
    for i, part in enumerate(key.split(".")):
      if not hasattr(node, "keys") or part not in node:
        parent = ".".join(key.split(".")[:i]) or "the config"
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none (it is a value)"
        return (f"Unknown config key '{key}' (from {arg}). Keys under {parent}: {known}. "
                "Fix the spelling; new keys cannot be added on the command line.")
      node = node[part]
  if isinstance(error, flags.Error):  # e.g. a value of the wrong type: absl names the flag
    return (f"{error}. Check the value's type against the config file "
            "(python -m adjax.main --config=<file> --helpfull lists every key).")
  if isinstance(error, AdjaxError):  # e.g. an unknown variant: the config file's own message
    return str(error)
  return f"The config could not be built: {type(error).__name__}: {error}"


def main(argv):
  if len(argv) > 1:
    _fail(f"Unexpected arguments {argv[1:]}: every option is a --flag (see --help).")
  if not any(a.startswith("--config=") for a in sys.argv):
    _fail("No config given. Run with --config=configs/<method>.py, e.g. --config=configs/adapted_moe.py.")
  try:
    config = _CONFIG.value
    config.keys()  # a file that failed to load gives a placeholder that raises only when used
  except Exception as e:  # ml_collections loads the file and applies overrides lazily
    if _VERBOSE.value:
      raise
    _fail(_config_error(sys.argv, e))
  _quiet_library_logs()
  io_utils.enable_compilation_cache()  # a warm cache skips most of a run's compilation
  try:
    from adjax import parallel
    parallel.maybe_initialize_distributed()  # no-op for a single process
    if _MODE.value == "predict":
      from adjax import predict
      predict.run(config, _WORKDIR.value, _PREDICT_DIR.value)
    else:
      from adjax import train
      report = train.run(config, _WORKDIR.value, _MODE.value)
      mean = report["mean"]
      print(f"mean image AUROC {mean['image_auroc']}, pixel AUROC {mean['pixel_auroc']}; "
            f"report in {os.path.join(_WORKDIR.value, 'metrics.md')}")
  except AdjaxError as e:
    if _VERBOSE.value:
      raise
    _fail(str(e))


class _DropLibraryInfo(pylogging.Filter):
  """Keeps orbax's and grain's INFO chatter out of the run log; their warnings still show."""

  def filter(self, record):
    noisy = ("/orbax/" in record.pathname or "/grain/" in record.pathname)
    return record.levelno >= pylogging.WARNING or not noisy


def _quiet_library_logs():
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_DropLibraryInfo())


def _flags_parser(argv):
  """absl's parser, with config errors turned into one clear paragraph."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # config_flags raises KeyError/AttributeError/ValueError here too
    if "--verbose" in argv:
      raise
    _fail(_config_error(argv, e))


def run():
  app.run(main, flags_parser=_flags_parser)


if __name__ == "__main__":
  run()

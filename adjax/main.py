r"""adjax command line: train, evaluate or predict with one config file.

  python -m adjax.main --config=configs/adapted_moe.py --workdir=runs/demo
  python -m adjax.main --config=configs/simplenet.py:mvtec_ad --config.data.root=/data/mvtec \
      --config.data.category=bottle --workdir=runs/bottle --mode=eval
  python -m adjax.main --config=configs/patch_knn.py --workdir=runs/demo --mode=predict \
      --predict_dir=/path/to/images --config.data.category=cloth

Any config key can be overridden with --config.<key>=<value>; --config=<workdir>/config.json
reuses a trained run's config (eval and predict then need no retyped overrides). Errors in the input
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
from adjax.errors import AdjaxError, Interrupted

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant'.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Where checkpoints, metrics and overlays go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "predict", "export"],
                          "train (then evaluate), eval (a trained workdir), predict (score --predict_dir), "
                          "export (a self-contained scorer of one category, adjax/export.py).")
_PREDICT_DIR = flags.DEFINE_string("predict_dir", "", "Folder of images (or one image file) to score in "
                                   "--mode=predict.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "", "--mode=predict: where its results go (default: a new "
                                  "folder <workdir>/predictions/<date-time> per run); --mode=export: where the "
                                  "scorer goes (default <workdir>/export/<category>).")
_THRESHOLD = flags.DEFINE_float("threshold", None, "--mode=predict: the score above which an image is anomalous "
                                "(default: the one stored at training).")
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
  workdir = os.path.expanduser(_WORKDIR.value)
  try:
    from adjax import parallel
    parallel.maybe_initialize_distributed()  # no-op for a single process
    if _MODE.value == "export":
      from adjax import export, predict
      export.run(config, workdir, predict.one_category(config, workdir), os.path.expanduser(_OUTPUT_DIR.value))
    elif _MODE.value == "predict":
      from adjax import predict
      predict.run(config, workdir, os.path.expanduser(_PREDICT_DIR.value), os.path.expanduser(_OUTPUT_DIR.value),
                  _THRESHOLD.value)
    else:
      from adjax import train
      report = train.run(config, workdir, _MODE.value)
      percent = lambda v: "n/a" if v is None else f"{100 * v:.2f}"
      means = "; ".join(f"{name.replace('_', ' ')} image AUROC {percent(report[name]['image_auroc'])}, pixel AUROC "
                        f"{percent(report[name]['pixel_auroc'])}" for name in ("mean", "mean_known", "mean_novel")
                        if name in report)
      print(f"{means} (%); report in {os.path.join(workdir, 'metrics.md')}")
  except AdjaxError as e:
    if _VERBOSE.value:
      raise
    _fail(str(e))
  except KeyboardInterrupt as e:
    if _VERBOSE.value:
      raise
    if isinstance(e, Interrupted):
      saved = "no checkpoint yet" if e.saved_epoch is None else f"last checkpoint after epoch {e.saved_epoch + 1}"
      _fail(f"interrupted in epoch {e.epoch + 1} of {e.category} ({saved}); rerun the same command to resume.",
            code=130)
    _fail("interrupted; rerun the same command to resume training from its last checkpoint.", code=130)


class _DropLibraryInfo(pylogging.Filter):
  """Keeps orbax's and grain's INFO chatter, and JAX's note that it found no TPU, out of the run
  log; their warnings still show."""

  def filter(self, record):
    noisy = "/orbax/" in record.pathname or "/grain/" in record.pathname or (
        "xla_bridge" in record.pathname and "libtpu" in record.getMessage())
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


def _json_config(argv):
  """--config=<path>.json (a trained workdir's config.json) loads through adjax/json_config.py."""
  loader = os.path.join(os.path.dirname(os.path.abspath(__file__)), "json_config.py")
  return [f"--config={loader}:{a.split('=', 1)[1]}" if a.startswith("--config=") and a.endswith(".json") else a
          for a in argv]


def run():
  sys.argv = _json_config(sys.argv)
  app.run(main, flags_parser=_flags_parser)


if __name__ == "__main__":
  run()

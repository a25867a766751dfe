"""--mode=export: one trained category as a self-contained scorer for production use.

Writes into --output_dir (default <workdir>/export/<category>):
  scorer.jaxexport  the scoring program, serialized StableHLO (jax.export) with the trained
                    state and the frozen backbone's weights inside: uint8 images (B, S, S, 3),
                    any B, -> (image scores (B,), anomaly maps (B, S, S)); normalisation,
                    the method's scoring, upsampling and smoothing included; lowered for the
                    CPU and for the accelerator it was exported on
  scorer.json       how images become its input (data.resize, sizes) and the stored decision
                    (threshold, normalisation of scores), from the workdir
  scorer.py, geometry.py  the loader (adjax/scorer_runtime.py) and the image geometry it uses
                    (adjax/data/geometry.py): they need only jax, numpy and pillow
"""

import os
import shutil

import jax
import jax.numpy as jnp
from absl import logging

from adjax import checkpoints, configlib, evaluate, io_utils, methods
from adjax.data import geometry

FILES = ("scorer.jaxexport", "scorer.json", "scorer.py", "geometry.py")


def platforms() -> tuple:
  """The CPU, and the accelerator this process runs on, so a GPU-trained model also scores on CPUs."""
  backend = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
  return tuple(sorted({"cpu", backend}))


def run(config, workdir: str, category: str, output_dir: str = "") -> dict:
  configlib.validate(config)
  method = methods.build(config)
  checkpoints.check_run_config(workdir, config)
  output_dir = output_dir or os.path.join(workdir, "export", category or "default")
  checkpoints.check_writable(output_dir)
  state = checkpoints.restore_trained(workdir, category, config, method.trains)
  extractor = method.make_extractor()
  score_batch = evaluate.make_scorer(config, method, extractor)
  mean, std = method.normalisation(extractor)
  variables = None if extractor is None else extractor.variables

  def adjax_exported_scorer(pixels):
    images = geometry.normalise_uint8(pixels, mean, std, xp=jnp)
    scores, maps, _ = score_batch(state, variables, images)
    return scores, maps

  side = configlib.input_size(config)
  (batch,) = jax.export.symbolic_shape("b")
  exported = jax.export.export(jax.jit(adjax_exported_scorer), platforms=platforms())(
      jax.ShapeDtypeStruct((batch, side, side, 3), jnp.uint8))
  serialized = exported.serialize()
  io_utils.atomic_write(os.path.join(output_dir, "scorer.jaxexport"), lambda f: f.write(serialized))
  decision_file = evaluate.decision_path(workdir, category)
  decision = io_utils.read_json(decision_file) if os.path.exists(decision_file) else None
  meta = {"method": config.model.name, "category": category, "resize": config.data.resize,
          "image_size": config.data.image_size, "crop_size": config.data.crop_size, "input_side": side,
          "decision": decision, "platforms": list(platforms()), "jax": jax.__version__}
  io_utils.write_json(os.path.join(output_dir, "scorer.json"), meta)
  here = os.path.dirname(os.path.abspath(__file__))
  for source, name in ((os.path.join(here, "scorer_runtime.py"), "scorer.py"),
                       (os.path.join(here, "data", "geometry.py"), "geometry.py")):
    io_utils.atomic_write(os.path.join(output_dir, name), lambda f, source=source: shutil.copyfileobj(
        open(source, "rb"), f))
  logging.info("Exported %s's scorer (%.1f MB, platforms %s%s) to %s; score images with: python %s %s <images>",
               category, len(serialized) / 2 ** 20, ", ".join(platforms()),
               "" if decision else "; no stored threshold, so no decisions", output_dir,
               os.path.join(output_dir, "scorer.py"), output_dir)
  return {"output_dir": output_dir, "bytes": len(serialized), "decision": decision}

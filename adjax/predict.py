"""--mode=predict: score a folder of images with a trained workdir.

Writes <output>/scores.json (image -> anomaly score, ranked), <output>/maps/<name>.npy
(the anomaly map at crop resolution) and <output>/overlays/<name>.png.
"""

import os

import numpy as np
from absl import logging
from PIL import Image

from adjax import checkpoints, configlib, evaluate, io_utils, methods
from adjax.data import datasets, transforms
from adjax.errors import ConfigError, DataError


def run(config, workdir: str, input_dir: str, output_dir: str = "") -> dict:
  if not input_dir or not os.path.isdir(input_dir):
    raise DataError(f"--predict_dir {input_dir!r} is not a folder. Give the folder of images to score.")
  paths = datasets.images_in(input_dir)
  if not paths:
    raise DataError(f"The folder {input_dir} holds no images ({', '.join(transforms.IMAGE_EXTENSIONS)}).")
  categories = [c.strip() for c in config.data.category.split(",") if c.strip()]
  if len(categories) != 1:
    raise ConfigError(f"Predict scores with one category's model; data.category is '{config.data.category}'. "
                      "Set --config.data.category=<one trained category>.")
  configlib.validate(config)
  method = methods.build(config)
  checkpoints.check_run_config(workdir, config)
  for p in paths:
    transforms.image_size_of(p)
  records = [datasets.Record(p, 0, "unknown", None) for p in paths]
  state = checkpoints.restore(workdir, categories[0])["state"]
  extractor = method.make_extractor()
  scored = evaluate.score_dataset(config, method, state, extractor, records, "predicting")
  output_dir = output_dir or os.path.join(workdir, "predictions")
  lo, hi = np.percentile(scored["maps"], 1), np.percentile(scored["maps"], 99.9)
  results = []
  for i, record in enumerate(records):
    stem = os.path.splitext(os.path.basename(record.path))[0]
    amap = scored["maps"][i]
    io_utils.atomic_write(os.path.join(output_dir, "maps", stem + ".npy"), lambda f: np.save(f, amap))
    rgb = transforms.denormalise(scored["images"][i], *method.normalisation(extractor))
    panel = evaluate.overlay_panel(rgb, None, amap, lo, hi)
    panel = np.concatenate([panel[:, :rgb.shape[1]], panel[:, 2 * rgb.shape[1]:]], axis=1)
    io_utils.atomic_write(os.path.join(output_dir, "overlays", stem + ".png"),
                          lambda f: Image.fromarray(panel).save(f, format="PNG"))
    results.append({"image": record.path, "score": float(scored["scores"][i])})
  results.sort(key=lambda r: -r["score"])
  io_utils.write_json(os.path.join(output_dir, "scores.json"), results)
  logging.info("Scored %d images; results in %s", len(results), output_dir)
  return {"scores": results, "output_dir": output_dir}

"""--mode=predict: score a folder of images (or one image) with a trained workdir and decide normal or anomalous.

Writes into --output_dir (default: a new folder <workdir>/predictions/<date-time> per run, so
runs never mix): predictions.csv and predictions.json (per image, ranked by score: path,
score, normalised score (empty where the threshold is not above the held-out median), anomalous),
maps/<name>.npy (the anomaly map: at the image's own resolution in the whole-image modes,
data.resize squash or pad, capped by eval.metric_max_side; at the centre crop's in 'crop' mode)
and overlays/<name>.png, coloured on the fixed scale of the model's held-out normal images
(without a stored decision, on the first eval.predict_chunk images' own scale);
where the stored decision has a pixel threshold, defects/<name>.png (white where the map exceeds
it, at the map's resolution) and each image's defect_fraction (the share of such pixels).
<name> is the file name's stem, with its extension added where two inputs share a stem
(img.png, img.jpg -> img_png, img_jpg).
The decision uses the threshold stored at training (evaluate.decision_rule) or --threshold.
Only --predict_dir's own images are scored (or the one image it names); its subfolders and other
files are named in the log, and so are images shaped unlike every training image.
Images are scored and written eval.predict_chunk at a time, so memory does not grow with the folder;
predictions.csv and .json are rewritten after each chunk, so a run stopped by an image that cannot be
decoded keeps the results before it.
"""

import concurrent.futures
import csv
import io
import json
import os
import time

import numpy as np
from absl import logging

from adjax import checkpoints, configlib, evaluate, io_utils, methods
from adjax.data import datasets, transforms
from adjax.errors import ConfigError, DataError


def output_names(paths) -> list:
  """A unique file name (without extension) per input path: its stem, or stem_ext where stems repeat."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  names = []
  for path, stem in zip(paths, stems):
    name = stem if stems.count(stem) == 1 else f"{stem}_{os.path.splitext(path)[1].lstrip('.').lower()}"
    base, k = name, 1
    while name in names:  # the same stem and extension in different letter case
      name, k = f"{base}_{k}", k + 1
    names.append(name)
  return names


def new_output_dir(workdir: str) -> str:
  base = os.path.join(workdir, "predictions", time.strftime("%Y%m%d-%H%M%S"))
  path, k = base, 1
  while os.path.exists(path):
    path, k = f"{base}_{k}", k + 1
  return path


def run(config, workdir: str, input_dir: str, output_dir: str = "", threshold: float | None = None) -> dict:
  if os.path.isfile(input_dir) and input_dir.lower().endswith(transforms.IMAGE_EXTENSIONS):
    paths = [input_dir]  # one image
  elif not input_dir or not os.path.isdir(input_dir):
    raise DataError(f"--predict_dir {input_dir!r} is neither a folder nor an image file "
                    f"({', '.join(transforms.IMAGE_EXTENSIONS)}). Give the folder of images to score, or one image.")
  else:
    paths = datasets.images_in(input_dir)
    if not paths:
      raise DataError(f"The folder {input_dir} holds no images ({', '.join(transforms.IMAGE_EXTENSIONS)}).")
    _say_what_is_not_scored(input_dir, paths)
  category = one_category(config, workdir)
  configlib.validate(config)
  method = methods.build(config)
  checkpoints.check_run_config(workdir, config)
  output_dir = output_dir or new_output_dir(workdir)
  if os.path.isdir(output_dir) and os.listdir(output_dir):
    raise ConfigError(f"--output_dir {output_dir} already holds files; give an empty or new folder (without "
                      "--output_dir each run gets a new one under <workdir>/predictions).")
  checkpoints.check_writable(output_dir)
  _say_what_differs_from_training(workdir, category, config, paths, [transforms.image_size_of(p) for p in paths])
  decision = _decision(workdir, category, threshold)
  state = checkpoints.restore_trained(workdir, category, config, method.trains)
  extractor = method.make_extractor()
  scorer = evaluate.make_scorer(config, method, extractor)  # compiled once for every chunk
  names, chunk, scale, results = output_names(paths), config.eval.predict_chunk, None, []
  threshold = None if decision is None else decision["threshold"]
  pending = []  # the last chunk's file writes, done on background threads while the next chunk is scored

  def collect():  # its rows into the results, rewritten after every chunk so that a later stop keeps them
    results.extend(f.result() for f in pending)
    pending.clear()
    results.sort(key=lambda r: -r["score"])
    _write_results(output_dir, threshold, results)

  # Two writers at least: PNG encoding and fsync leave the interpreter lock, so they overlap even on 2 cores.
  with concurrent.futures.ThreadPoolExecutor(max(2, io_utils.background_threads())) as writer:
    for start in range(0, len(paths), chunk):
      records = [datasets.Record(p, 0, "unknown", None) for p in paths[start:start + chunk]]
      desc = "predicting" if len(paths) <= chunk else f"predicting {start + 1}-{start + len(records)} of {len(paths)}"
      try:
        scored = evaluate.score_dataset(config, method, state, extractor, records, desc, scorer)
      except DataError as e:  # a file that passed the header check but not decoding (a truncated JPEG)
        collect()
        raise DataError(f"{e} The {len(results)} images scored before it are in {output_dir} "
                        "(predictions.csv).") from None
      # Without a stored decision the overlays' colours come from the first chunk's maps.
      scale = scale or evaluate.colour_scale(scored, decision)
      collect()
      pending.extend(writer.submit(_write_outputs, output_dir, record, name, scored, i, scale, decision, config)
                     for i, (record, name) in enumerate(zip(records, names[start:start + chunk])))
      del scored  # held by the writes alone, so freed once they are done
    collect()
  flagged = sum(r.get("anomalous", False) for r in results)
  logging.info("Scored %d images%s; results in %s", len(results),
               "" if threshold is None else f", {flagged} anomalous at threshold {threshold:.4g}", output_dir)
  return {"predictions": results, "output_dir": output_dir, "threshold": threshold}


def _write_outputs(output_dir, record, name, scored, i, scale, decision, config) -> dict:
  """Image i of a scored chunk: its map, overlay and defect mask files, and its row of the results."""
  amap = scored["maps"][i]
  io_utils.atomic_write(os.path.join(output_dir, "maps", name + ".npy"), lambda f: np.save(f, amap))
  rgb = evaluate.overlay_image(record, amap, config)
  panel = evaluate.overlay_panel(rgb, None, amap, *scale)
  panel = np.concatenate([panel[:, :rgb.shape[1]], panel[:, 2 * rgb.shape[1]:]], axis=1)
  io_utils.write_png(os.path.join(output_dir, "overlays", name + ".png"), panel)
  score = float(scored["scores"][i])
  row = {"image": record.path, "name": name, "score": score}
  if decision is not None:
    row["normalised_score"] = evaluate.normalised_scores(decision, [score])[0]
    row["anomalous"] = bool(score > decision["threshold"])
  defects = evaluate.defect_pixels(decision, amap)
  if defects is not None:
    row["defect_fraction"] = float(defects.mean())
    io_utils.write_png(os.path.join(output_dir, "defects", name + ".png"), defects.astype(np.uint8) * 255)
  return row


def _say_what_differs_from_training(workdir, category, config, paths, sizes) -> None:
  """A warning for images shaped unlike every training image: data.resize turns them into inputs of
  proportions the model never saw (squash stretches them differently, pad and crop frame them
  differently), which raises their scores whether or not they hold a defect."""
  recorded = checkpoints.recorded_training_sets(workdir).get(category, {})
  if not recorded.get("aspect_ratios"):  # recorded before aspect ratios were
    return
  outliers = datasets.aspect_outliers(sizes, recorded["aspect_ratios"])
  if outliers:
    (w, h), (lo, hi) = sizes[outliers[0]], recorded["aspect_ratios"]
    logging.warning("%d of %d images are shaped unlike the training images of %s (width / height %.2f..%.2f), "
                    "e.g. %s (%dx%d, %.2f); data.resize=%s makes them inputs of proportions the model never saw, so "
                    "expect higher scores. Crop them as the training images were.", len(outliers), len(paths),
                    category, lo, hi, paths[outliers[0]], w, h, w / h, config.data.resize)


def _say_what_is_not_scored(input_dir, paths) -> None:
  """Names the entries of input_dir that are not scored: subfolders (not searched) and other files."""
  taken = {os.path.basename(p) for p in paths}
  others = sorted(f for f in os.listdir(input_dir) if f not in taken and not f.startswith("."))
  folders = [f for f in others if os.path.isdir(os.path.join(input_dir, f))]
  files = [f for f in others if f not in folders]
  if folders:
    logging.warning("Subfolders of %s are not searched, so %s %s not scored; give each as --predict_dir to score "
                    "its images.", input_dir, ", ".join(folders[:5]) + (", ..." if len(folders) > 5 else ""),
                    "is" if len(folders) == 1 else "are")
  if files:
    logging.info("Not images (by extension), not scored: %s", ", ".join(files[:5]) + (
        f" and {len(files) - 5} more" if len(files) > 5 else ""))


def one_category(config, workdir: str = "") -> str:
  """The one trained category predict and export use: data.category's, or a folder root's own."""
  categories = configlib.names(config.data.category)
  root = os.path.expanduser(config.data.root)
  if config.data.name == "folder" and root and os.path.isdir(os.path.join(root, "train")):
    categories = [datasets.root_category(root)]  # one folder: one category
  if len(categories) != 1 or categories == ["all"]:
    trained = checkpoints.trained_categories(workdir) if workdir else []
    raise ConfigError(f"Predict and export use one category's model; data.category is '{config.data.category}'. "
                      "Set --config.data.category=<one trained category>" +
                      (f" ({workdir} holds {', '.join(trained)})." if trained else "."))
  return categories[0]


def _decision(workdir, category, threshold):
  path = evaluate.decision_path(workdir, category)
  decision = json.load(open(path)) if os.path.exists(path) else None
  if threshold is not None:  # without a stored decision, normalised scores are score / threshold
    decision = dict(decision or {"normal_median": 0.0}, threshold=float(threshold))
    logging.info("Decisions at --threshold %.4g", threshold)
  elif decision is None:
    logging.warning("%s holds no stored threshold (trained with data.threshold_fraction=0): scores only, no "
                    "anomalous/normal decision. Pass --threshold=<score> to decide.", workdir)
  else:
    logging.info("Decisions at the stored threshold %.4g (%s)", decision["threshold"], path)
  if decision is not None and "pixel_threshold" not in decision and os.path.exists(path):
    logging.info("%s holds no pixel threshold (stored before there was one), so no defect masks; run --mode=eval "
                 "once to store it.", path)
  if decision is not None and not decision["threshold"] > decision["normal_median"]:
    logging.warning("The threshold %.4g is not above the held-out normal images' median score %.4g (%s), so "
                    "normalised scores are left empty; decisions are unaffected.", decision["threshold"],
                    decision["normal_median"], "a --threshold at or below it" if threshold is not None else
                    "one held-out image, or tied scores: train with more normal images or a larger "
                    "data.threshold_fraction")
  return decision


def _write_results(output_dir, threshold, results) -> None:
  io_utils.write_json(os.path.join(output_dir, "predictions.json"), {"threshold": threshold, "predictions": results})
  _write_csv(os.path.join(output_dir, "predictions.csv"), results)


def _write_csv(path, rows):
  columns = ["image", "name", "score", "normalised_score", "anomalous", "defect_fraction"]
  buffer = io.StringIO()
  writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
  writer.writeheader()
  writer.writerows(rows)
  io_utils.write_text(path, buffer.getvalue())

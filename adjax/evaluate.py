"""Shared evaluation: anomaly maps at image resolution, metrics, reports and overlays."""

import concurrent.futures
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from adjax import configlib, io_utils, linear_svm, metrics, parallel, progress
from adjax.data import pipeline, transforms
from adjax.errors import ConfigError


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
  """scipy.ndimage.gaussian_filter's kernel (radius int(truncate * sigma + 0.5))."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return (k / k.sum()).astype(np.float32)


def gaussian_smooth(maps: jax.Array, sigma: float) -> jax.Array:
  """scipy.ndimage.gaussian_filter(map, sigma) per map of (B, H, W), mode 'reflect'."""
  if sigma <= 0:
    return maps
  k = jnp.asarray(gaussian_kernel1d(sigma))
  r = (k.shape[0] - 1) // 2

  def along(x, axis):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    # scipy's 'reflect' repeats the edge sample (d c b a | a b c d), numpy's 'symmetric'.
    x = jnp.pad(x, pad, mode="symmetric")
    n = x.shape[axis] - 2 * r
    return sum(k[i] * jax.lax.slice_in_dim(x, i, i + n, axis=axis) for i in range(k.shape[0]))

  return along(along(maps, 1), 2)


def anomaly_maps(patch_maps: jax.Array, size: int, sigma: float) -> jax.Array:
  """Patch scores -> (B, size, size): bilinear upsampling, then Gaussian smoothing (SimpleNet)."""
  b = patch_maps.shape[0]
  up = jax.image.resize(patch_maps[..., None], (b, size, size, 1), method="linear", antialias=False)[..., 0]
  return gaussian_smooth(up, sigma)


def make_scorer(config, method, extractor):
  """The jitted scoring program: (state, extractor variables or None, normalised images
  (B, S, S, 3)) -> (image scores (B,), anomaly maps (B, S, S), the method's per-image
  diagnostics {name: (B, ...)}); the method gets the inputs it
  declared (`score_inputs`). The frozen variables are an argument, never closed over: XLA
  would embed them in the program as constants (benchmarks/README.md)."""
  @jax.jit
  def score_batch(state, variables, images):
    inputs = {}
    if "features" in method.score_inputs:
      inputs["features"] = extractor.fn(variables, images)
    if "images" in method.score_inputs:
      inputs["images"] = images
    image_scores, patch_maps = method.score(state, inputs, images.shape[1:3])
    maps = anomaly_maps(patch_maps, images.shape[1], config.eval.smoothing_sigma)
    return image_scores, maps, method.diagnostics(state, inputs)
  return score_batch


def score_dataset(config, method, state, extractor, records, desc, scorer=None, keep_images=False):
  """Runs the pipeline over `records`, in record order: 'scores' (N,), 'labels' (N,), with
  keep_images 'images' (the model inputs: a method's calibration reads them; overlays re-read the
  files), 'input_maps' and 'input_masks' (N, S, S) at the model's input, and 'maps'
  and 'masks' as the metrics compare them: in the whole-image modes (data.resize squash, pad)
  a list of per-image arrays at each image's own resolution (at most eval.metric_max_side on
  the longer side), the masks read from their files; in 'crop' mode the input arrays, which
  cover the centre crop only. `scorer`: make_scorer's program, shared across calls (categories)
  so that it compiles once."""
  mean, std = method.normalisation(extractor)
  index, shards = parallel.record_shard(len(records))  # a multi-process run: each process scores its share
  dataset = pipeline.make_dataset(
      records, image_size=config.data.image_size, crop_size=config.data.crop_size, mean=mean,
      std=std, batch_size=config.eval.batch_size, worker_count=config.data.workers,
      shard_index=index, shard_count=shards, resize=config.data.resize)
  score_batch = scorer or make_scorer(config, method, extractor)
  variables = None if extractor is None else extractor.variables
  state = parallel.local_copy(state) if shards > 1 else state  # its share alone, on its own device
  scores, maps, masks, labels, images, sizes, diagnostics = [], [], [], [], [], [], []
  with progress.bar(parallel.shard_size(len(records)), desc) as bar:
    for batch in dataset:
      count = len(batch["label"])
      s, m, d = score_batch(state, variables, pipeline.pad_batch(batch["image"], config.eval.batch_size))
      scores.append(np.asarray(s[:count]))
      maps.append(np.asarray(m[:count]))
      diagnostics.append({k: np.asarray(v[:count]) for k, v in d.items()})
      masks.append(batch["mask"])
      labels.append(batch["label"])
      if keep_images:
        images.append(batch["image"])
      sizes.append(batch["size"])
      bar.update(len(batch["label"]))
  names = diagnostics[0] if diagnostics else {}
  arrays = {"scores": np.concatenate(scores), "input_maps": np.concatenate(maps),
            "input_masks": np.concatenate(masks), "labels": np.concatenate(labels), "sizes": np.concatenate(sizes),
            "diagnostics": {k: np.concatenate([d[k] for d in diagnostics]) for k in names}}
  if keep_images:
    arrays["images"] = np.concatenate(images)
  scored = parallel.gather_shards(arrays, len(records), "scored images")
  scored["maps"], scored["masks"] = scored["input_maps"], scored["input_masks"]
  if config.data.resize in transforms.WHOLE_IMAGE:
    scored["maps"], scored["masks"] = [], []
    for record, amap, (width, height) in zip(records, scored["input_maps"], scored["sizes"]):
      full = transforms.to_original(amap, int(width), int(height), config.data.resize, config.eval.metric_max_side)
      scored["maps"].append(full)
      mask = transforms.load_mask(record.mask_path) if record.mask_path else np.zeros((height, width), bool)
      scored["masks"].append(transforms.mask_at(mask, full.shape[1], full.shape[0]))
  return scored


def _evaluate(scored, pixels, config, sel=None) -> dict:
  """metrics.evaluate over the images `sel` selects (all by default), the pixel figures from the
  category's sorted PixelSet (None without masks)."""
  sel = np.ones(len(scored["labels"]), bool) if sel is None else sel
  result = metrics.evaluate(scored["labels"][sel], scored["scores"][sel])
  if pixels is not None:
    result.update(pixels.metrics(config.eval.pro_fpr_limit, sel))
  return result


def _subset(scored, pixels, sel, config) -> dict:
  sub = _evaluate(scored, pixels, config, sel)
  return {k: sub[k] for k in ("image_auroc", "pixel_auroc", "aupro", "num_images", "num_anomalous")}


def _mean_of(groups: dict, key: str):
  values = [g[key] for g in groups.values() if g[key] is not None]
  return float(np.mean(values)) if values else None


def category_metrics(split, scored, config) -> dict:
  """metrics.evaluate over the whole test set, then per defect type (its anomalous images
  against every normal test image) and, where the data has subclasses, per subclass (seen
  and unseen), pooled over the seen and over the unseen ones, and Adapted-MoE's Table 1
  figure: the mean over unseen subclasses of each subclass's own AUROC."""
  pixels = metrics.PixelSet(scored["masks"], scored["maps"]) if split.has_masks else None
  result = _evaluate(scored, pixels, config)
  defect_types = np.array([r.defect_type for r in split.test])
  normal = scored["labels"] == 0
  result["defect_types"] = {d: _subset(scored, pixels, normal | (defect_types == d), config)
                            for d in sorted(set(defect_types[~normal]))}
  if split.unseen_subclasses:
    subclass = np.array([r.subclass for r in split.test])
    unseen = np.isin(subclass, split.unseen_subclasses)
    for name, sel in (("seen", ~unseen), ("unseen", unseen)):
      result[name] = _subset(scored, pixels, sel, config)  # pooled over that group's images
    result["subclasses"] = {c: {**_subset(scored, pixels, subclass == c, config),
                                "unseen": c in split.unseen_subclasses} for c in sorted(set(subclass))}
    per_unseen = {c: v for c, v in result["subclasses"].items() if v["unseen"]}
    result["unseen_subclass_mean"] = {k: _mean_of(per_unseen, k) for k in ("image_auroc", "pixel_auroc")}
  return result


ALTERNATIVE_SCORE = "image_score_"  # a diagnostic so named is another image score (B, 1), reported by its AUROC


def log_diagnostics(category, diagnostics, labels, config=None) -> dict:
  """The method's per-image diagnostic vectors summed over the test set, logged one line each;
  those named image_score_<name> are alternative image scores: their image AUROC instead.
  eval.paper_kfold_svm (a comma list of such names; '' off) adds the image AUROC of a linear
  SVM on them fitted on the test labels by eval.paper_kfold_folds-fold cross-validation,
  out-of-fold scores only: a paper's protocol, reported under its own key, never the model's."""
  report = {}
  names = configlib.paper_kfold_svm(config) if config else []
  if names:
    missing = [n for n in names if ALTERNATIVE_SCORE + n not in diagnostics]
    if missing:
      reported = sorted(k[len(ALTERNATIVE_SCORE):] for k in diagnostics if k.startswith(ALTERNATIVE_SCORE))
      raise ConfigError(f"eval.paper_kfold_svm names {missing}, which the method does not report; it reports "
                        f"{reported}.")
    x = np.concatenate([np.asarray(diagnostics[ALTERNATIVE_SCORE + n])[:, :1] for n in names], axis=1)
    scores = linear_svm.out_of_fold_scores(x, np.asarray(labels), config.eval.paper_kfold_folds, config.seed)
    value = None if scores is None else metrics.auroc(labels, scores)
    report["image_auroc_paper_kfold_svm"] = value
    logging.info("%s: image AUROC of a linear SVM on (%s) fitted on the TEST labels, %d-fold, out-of-fold scores "
                 "(the paper's protocol, not adjax's model): %s", category, ", ".join(names),
                 config.eval.paper_kfold_folds, "undefined" if value is None else f"{100 * value:.2f}")
  for name, values in diagnostics.items():
    values = np.asarray(values)
    if name.startswith(ALTERNATIVE_SCORE):
      value = metrics.auroc(labels, values[:, 0])
      report[f"image_auroc_by_{name[len(ALTERNATIVE_SCORE):]}"] = value
      logging.info("%s: image AUROC by %s: %s", category, name[len(ALTERNATIVE_SCORE):],
                   "undefined (one class)" if value is None else f"{100 * value:.2f}")
    else:
      report[name] = values.sum(axis=0).astype(int).tolist()
      logging.info("%s: %s: %s", category, name, report[name])
  return report


def _colormap(x: np.ndarray) -> np.ndarray:
  """Jet-like colours for x in [0, 1] -> uint8 RGB."""
  r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
  g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
  b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
  return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay_panel(image_rgb: np.ndarray, mask, amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """[image | ground truth outline | heatmap blended over the image], one uint8 strip."""
  norm = np.clip((amap - lo) / max(hi - lo, 1e-12), 0, 1)
  heat = (0.5 * image_rgb + 0.5 * _colormap(norm)).astype(np.uint8)
  truth = image_rgb.copy()
  if mask is not None and mask.any():
    truth[mask > 0.5] = (0.5 * truth[mask > 0.5] + 0.5 * np.array([255, 0, 0])).astype(np.uint8)
  return np.concatenate([image_rgb, truth, heat], axis=1)


def decision_path(workdir, category) -> str:
  return os.path.join(workdir, "thresholds", f"{category or 'default'}.json")


def decision_rule(held, count) -> dict:
  """The stored decision of a category from its held-out normal training images' scores: an
  image is anomalous when its score exceeds the largest of theirs (on n unseen normal images
  that leaves about 1 / (n + 1) of normal images above it); normalised scores are 0 at their
  median and 1 at the threshold; a pixel is a defect pixel when its map value exceeds the largest
  of their maps' values (the same rule per pixel); overlays colour maps from their 1st to their
  99.9th pixel percentile, so a normal image looks normal in every run."""
  scores = np.asarray(held["scores"], np.float64)
  median, threshold = float(np.median(scores)), float(scores.max())
  lo, hi = np.percentile(held["input_maps"], [1, 99.9])
  return {"threshold": threshold, "normal_median": median, "map_low": float(lo), "map_high": float(hi),
          "pixel_threshold": float(np.max(held["input_maps"])), "held_out_images": int(count),
          "rule": "anomalous when the image score exceeds the largest score of the normal training images held "
                  "out of training (data.threshold_fraction); normalised score = (score - their median) / "
                  "(threshold - their median); a defect pixel where the map exceeds the largest value of "
                  "their maps (pixel_threshold)"}


def normalised_scores(decision, scores) -> list:
  """(score - median) / (threshold - median) per score; None for every score when the threshold is
  not above the median (one held-out image, tied held-out scores, or a --threshold at or below the
  median): there is then no scale to normalise by, and a tiny one would give meaningless huge values."""
  spread = decision["threshold"] - decision["normal_median"]
  if not spread > 0:
    return [None] * len(scores)
  return [float(s) for s in (np.asarray(scores, np.float64) - decision["normal_median"]) / spread]


def decision_report(category, decision, scored, has_masks: bool) -> dict:
  """The stored thresholds and how the test images fall at them (describes, never selects): images
  flagged, and, with masks, the IoU of the defect pixels with the ground truth."""
  flagged = np.asarray(scored["scores"]) > decision["threshold"]
  labels = np.asarray(scored["labels"]).astype(bool)
  report = {"threshold": decision["threshold"], "held_out_images": decision["held_out_images"],
            "normal_flagged": int(flagged[~labels].sum()), "normal": int((~labels).sum()),
            "anomalous_flagged": int(flagged[labels].sum()), "anomalous": int(labels.sum())}
  logging.info("%s: at the stored threshold %.4g: %d of %d normal and %d of %d anomalous test images flagged",
               category, report["threshold"], report["normal_flagged"], report["normal"],
               report["anomalous_flagged"], report["anomalous"])
  if "pixel_threshold" in decision:  # absent from thresholds stored before it was
    report["pixel_threshold"] = decision["pixel_threshold"]
    above = np.nextafter(decision["pixel_threshold"], np.inf)  # metrics.iou takes maps >= its threshold
    report["pixel_iou"] = metrics.iou(scored["masks"], scored["maps"], above) if has_masks else None
  return report


def defect_pixels(decision, amap):
  """The defect pixels of a map at the stored pixel threshold, or None where none is stored."""
  if decision is None or "pixel_threshold" not in decision:
    return None
  return np.asarray(amap) > decision["pixel_threshold"]


def overlay_image(record, amap, config) -> np.ndarray:
  """The uint8 RGB picture under a map, from the image file: at the map's resolution in the
  whole-image modes (the image's own, capped), the centre crop the model saw in 'crop' mode."""
  image = transforms.load_image(record.path)
  if config.data.resize in transforms.WHOLE_IMAGE:
    return np.asarray(image.resize((amap.shape[1], amap.shape[0]), Image.BILINEAR), np.uint8)
  return transforms.preprocess_image(image, config.data.image_size, config.data.crop_size, None, None, "crop")


def colour_scale(scored, decision):
  """The maps' colour range: the stored one of the model's normal images, else this set's own."""
  if decision is not None and "map_low" in decision:
    return decision["map_low"], decision["map_high"]
  return tuple(np.percentile(metrics.ravel(scored["maps"]), [1, 99.9]))


def write_overlays(directory, split, scored, config, count, decision=None):
  """PNG overlays for up to `count` test images, anomalous ones first, one colour scale per
  category (the held-out normal images' when there are some)."""
  if count <= 0:
    return
  os.makedirs(directory, exist_ok=True)
  order = np.argsort(-scored["labels"], kind="stable")
  picks = np.r_[order[: count - count // 4], order[::-1][: count // 4]][:count]
  lo, hi = colour_scale(scored, decision)
  for i in picks:
    record = split.test[int(i)]
    rgb = overlay_image(record, scored["maps"][i], config)
    panel = overlay_panel(rgb, scored["masks"][i] if split.has_masks else None, scored["maps"][i], lo, hi)
    name = f"{record.defect_type}_{record.subclass + '_' if record.subclass else ''}" \
           f"{os.path.splitext(os.path.basename(record.path))[0]}.png"
    io_utils.write_png(os.path.join(directory, name), panel)


def category_report(split, scored, config, decision, overlay_dir) -> dict:
  """One category's entry of the report from its scored test set: category_metrics, the decision
  rule's counts, the method's diagnostics; and, on the main process, its overlays."""
  report = category_metrics(split, scored, config)
  if decision is not None:
    report["decision"] = decision_report(split.category, decision, scored, split.has_masks)
  if scored["diagnostics"]:
    report["diagnostics"] = log_diagnostics(split.category, scored["diagnostics"], scored["labels"], config)
  if parallel.is_main_process():
    write_overlays(overlay_dir, split, scored, config, config.eval.num_overlays, decision)
  return report


class Reports:
  """category_report of each submitted category on background threads while the caller scores
  the next one (numpy's sorts and cumulative sums and PIL's encoder release the GIL); at most
  `threads` reports in flight (io_utils.background_threads() by default; each holds a category's
  scored test set and its sorted pixels); results() in submission order. A failed report is
  raised at the next submit, not after the last category."""

  def __init__(self, threads: int = 0):
    self.threads = threads or io_utils.background_threads()
    self.pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="adjax-report")
    self.futures = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.pool.shutdown(wait=True, cancel_futures=True)

  def submit(self, split, scored, config, decision, overlay_dir):
    running = [f for f in self.futures.values() if not f.done()]
    if len(running) >= self.threads:
      concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
    for future in self.futures.values():
      if future.done():
        future.result()
    self.futures[split.category] = self.pool.submit(category_report, split, scored, config, decision, overlay_dir)

  def results(self) -> dict:
    return {category: future.result() for category, future in self.futures.items()}


def _fmt(value):
  return "n/a" if value is None else f"{100 * value:.2f}"


SUMMARY_ROWS = ("mean", "mean_known", "mean_novel")


def summarise(per_category: dict, novel=()) -> dict:
  """The report: one entry per category plus 'mean' and, when some categories are novel (never
  trained on: data.novel_categories), 'mean_known' and 'mean_novel'; novel entries say so."""
  report = {name: {**values, "novel": True} if name in novel else values for name, values in per_category.items()}
  report["mean"] = metrics.mean_over_categories(per_category)
  present = [n for n in per_category if n in novel]
  if present:
    report["mean_known"] = metrics.mean_over_categories({n: v for n, v in per_category.items() if n not in novel})
    report["mean_novel"] = metrics.mean_over_categories({n: per_category[n] for n in present})
  return report


def write_reports(workdir: str, report: dict, config) -> dict:
  """metrics.json and metrics.md (atomically) from `summarise`'s report."""
  per_category = {name: values for name, values in report.items() if name not in SUMMARY_ROWS}
  io_utils.write_json(os.path.join(workdir, "metrics.json"),
                      {"metrics": report, "config": json.loads(config.to_json_best_effort())})
  columns = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "pixel_iou")
  lines = [f"# {config.model.name} on {config.data.name} ({config.model.get('backbone') or 'no backbone'})", "",
           "| category | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name, values in report.items():
    lines.append(f"| {name}{' (novel)' if values.get('novel') else ''} | "
                 + " | ".join(_fmt(values.get(c)) for c in columns) + " |")
  sub_rows = [(n, v) for n, v in per_category.items() if "unseen" in v]
  if sub_rows:
    lines += ["", "Seen / unseen subclasses, pooled over each group's images (image AUROC, pixel AUROC), and the "
              "mean over unseen subclasses of each one's own AUROC (Adapted-MoE's Table 1 'Average'):", "",
              "| category | seen I | seen P | unseen I | unseen P | unseen mean I | unseen mean P |",
              "|---|---|---|---|---|---|---|"]
    for n, v in sub_rows:
      lines.append(f"| {n} | {_fmt(v['seen']['image_auroc'])} | {_fmt(v['seen']['pixel_auroc'])} | "
                   f"{_fmt(v['unseen']['image_auroc'])} | {_fmt(v['unseen']['pixel_auroc'])} | "
                   f"{_fmt(v['unseen_subclass_mean']['image_auroc'])} | "
                   f"{_fmt(v['unseen_subclass_mean']['pixel_auroc'])} |")
    lines += ["", "Per subclass (image AUROC, pixel AUROC):", "", "| category | subclass | unseen | I | P |",
              "|---|---|---|---|---|"]
    for n, v in sub_rows:
      for c, m in v["subclasses"].items():
        lines.append(f"| {n} | {c} | {'yes' if m['unseen'] else ''} | {_fmt(m['image_auroc'])} | "
                     f"{_fmt(m['pixel_auroc'])} |")
  type_rows = [(n, d, m) for n, v in per_category.items() for d, m in v.get("defect_types", {}).items()]
  if type_rows:
    lines += ["", "Per defect type, its images against every normal test image (image AUROC, pixel AUROC):", "",
              "| category | defect type | images | I | P |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {d} | {m['num_anomalous']} | {_fmt(m['image_auroc'])} | {_fmt(m['pixel_auroc'])} |"
              for n, d, m in type_rows]
  decided = [(n, v["decision"]) for n, v in per_category.items() if "decision" in v]
  if decided:
    lines += ["", "Decisions at the thresholds stored from held-out normal training images (no test label): test "
              "images flagged anomalous, and the IoU of the defect pixels with the ground truth:", "",
              "| category | threshold | normal flagged | anomalous flagged | pixel threshold | pixel IoU |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {n} | {d['threshold']:.4g} | {d['normal_flagged']} / {d['normal']} | "
              f"{d['anomalous_flagged']} / {d['anomalous']} | "
              f"{'n/a' if d.get('pixel_threshold') is None else format(d['pixel_threshold'], '.4g')} | "
              f"{_fmt(d.get('pixel_iou'))} |" for n, d in decided]
  lines += ["", "Values in %. f1_max thresholds are read off the test set (they describe, not select); "
            "pixel_iou binarises the maps at the pixel F1-max threshold.", ""]
  io_utils.write_text(os.path.join(workdir, "metrics.md"), "\n".join(lines))
  logging.info("Metrics:\n%s", "\n".join(lines))
  return report

"""Shared evaluation: anomaly maps at image resolution, metrics, reports and overlays."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from adjax import io_utils, metrics, progress
from adjax.data import pipeline, transforms


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


def score_dataset(config, method, state, extractor, records, desc, scorer=None):
  """Runs the pipeline over `records`: image scores, maps, masks, labels, in record order.
  `scorer`: make_scorer's program, shared across calls (categories) so it compiles once."""
  mean, std = method.normalisation(extractor)
  dataset = pipeline.make_dataset(
      records, image_size=config.data.image_size, crop_size=config.data.crop_size, mean=mean,
      std=std, batch_size=config.eval.batch_size, worker_count=config.data.workers,
      shard_index=0, shard_count=1)
  score_batch = scorer or make_scorer(config, method, extractor)
  variables = None if extractor is None else extractor.variables
  scores, maps, masks, labels, images, diagnostics = [], [], [], [], [], []
  with progress.bar(len(records), desc) as bar:
    for batch in dataset:
      count = len(batch["label"])
      s, m, d = score_batch(state, variables, pipeline.pad_batch(batch["image"], config.eval.batch_size))
      scores.append(np.asarray(s[:count]))
      maps.append(np.asarray(m[:count]))
      diagnostics.append({k: np.asarray(v[:count]) for k, v in d.items()})
      masks.append(batch["mask"])
      labels.append(batch["label"])
      images.append(batch["image"])
      bar.update(len(batch["label"]))
  names = diagnostics[0] if diagnostics else {}
  return {"scores": np.concatenate(scores), "maps": np.concatenate(maps), "masks": np.concatenate(masks),
          "labels": np.concatenate(labels), "images": np.concatenate(images),
          "diagnostics": {k: np.concatenate([d[k] for d in diagnostics]) for k in names}}


def _subset(scored, masks, sel, config) -> dict:
  sub = metrics.evaluate(scored["labels"][sel], scored["scores"][sel], masks[sel] if masks is not None else None,
                         scored["maps"][sel] if masks is not None else None, config.eval.pro_fpr_limit)
  return {k: sub[k] for k in ("image_auroc", "pixel_auroc", "aupro", "num_images", "num_anomalous")}


def _mean_of(groups: dict, key: str):
  values = [g[key] for g in groups.values() if g[key] is not None]
  return float(np.mean(values)) if values else None


def category_metrics(split, scored, config) -> dict:
  """metrics.evaluate over the whole test set, then per defect type (its anomalous images
  against every normal test image) and, where the data has subclasses, per subclass (seen
  and unseen), pooled over the seen and over the unseen ones, and Adapted-MoE's Table 1
  figure: the mean over unseen subclasses of each subclass's own AUROC."""
  masks = scored["masks"] if split.has_masks else None
  result = metrics.evaluate(scored["labels"], scored["scores"], masks, scored["maps"] if split.has_masks else None,
                            config.eval.pro_fpr_limit)
  defect_types = np.array([r.defect_type for r in split.test])
  normal = scored["labels"] == 0
  result["defect_types"] = {d: _subset(scored, masks, normal | (defect_types == d), config)
                            for d in sorted(set(defect_types[~normal]))}
  if split.unseen_subclasses:
    subclass = np.array([r.subclass for r in split.test])
    unseen = np.isin(subclass, split.unseen_subclasses)
    for name, sel in (("seen", ~unseen), ("unseen", unseen)):
      result[name] = _subset(scored, masks, sel, config)  # pooled over that group's images
    result["subclasses"] = {c: {**_subset(scored, masks, subclass == c, config), "unseen": c in split.unseen_subclasses}
                            for c in sorted(set(subclass))}
    per_unseen = {c: v for c, v in result["subclasses"].items() if v["unseen"]}
    result["unseen_subclass_mean"] = {k: _mean_of(per_unseen, k) for k in ("image_auroc", "pixel_auroc")}
  return result


def log_diagnostics(category, diagnostics) -> dict:
  """The method's per-image diagnostic vectors summed over the test set, logged one line each."""
  totals = {name: np.asarray(values).sum(axis=0).astype(int).tolist() for name, values in diagnostics.items()}
  for name, total in totals.items():
    logging.info("%s: %s: %s", category, name, total)
  return totals


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


def write_overlays(directory, split, scored, normalisation, count):
  """PNG overlays for up to `count` test images, anomalous ones first, one colour scale per category."""
  if count <= 0:
    return
  os.makedirs(directory, exist_ok=True)
  order = np.argsort(-scored["labels"], kind="stable")
  picks = np.r_[order[: count - count // 4], order[::-1][: count // 4]][:count]
  lo, hi = np.percentile(scored["maps"], 1), np.percentile(scored["maps"], 99.9)
  for i in picks:
    record = split.test[int(i)]
    rgb = transforms.denormalise(scored["images"][i], *normalisation)
    panel = overlay_panel(rgb, scored["masks"][i] if split.has_masks else None, scored["maps"][i], lo, hi)
    name = f"{record.defect_type}_{record.subclass + '_' if record.subclass else ''}" \
           f"{os.path.splitext(os.path.basename(record.path))[0]}.png"
    io_utils.atomic_write(os.path.join(directory, name), lambda f: Image.fromarray(panel).save(f, format="PNG"))


def _fmt(value):
  return "n/a" if value is None else f"{100 * value:.2f}"


def summarise(per_category: dict) -> dict:
  """The report: one entry per category plus 'mean'."""
  report = dict(per_category)
  report["mean"] = metrics.mean_over_categories(per_category)
  return report


def write_reports(workdir: str, report: dict, config) -> dict:
  """metrics.json and metrics.md (atomically) from `summarise`'s report."""
  per_category = {name: values for name, values in report.items() if name != "mean"}
  io_utils.write_json(os.path.join(workdir, "metrics.json"),
                      {"metrics": report, "config": json.loads(config.to_json_best_effort())})
  columns = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "pixel_iou")
  lines = [f"# {config.model.name} on {config.data.name} ({config.model.get('backbone') or 'no backbone'})", "",
           "| category | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
  for name, values in report.items():
    lines.append(f"| {name} | " + " | ".join(_fmt(values.get(c)) for c in columns) + " |")
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
  lines += ["", "Values in %. f1_max thresholds are read off the test set (they describe, not select); "
            "pixel_iou binarises the maps at the pixel F1-max threshold.", ""]
  io_utils.write_text(os.path.join(workdir, "metrics.md"), "\n".join(lines))
  logging.info("Metrics:\n%s", "\n".join(lines))
  return report

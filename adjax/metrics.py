"""Anomaly-detection metrics: I-AUROC, P-AUROC, AUPRO@0.3, F1-max, IoU.

All functions take numpy arrays: `labels`/`masks` are 0/1 ground truth, `scores`/`maps`
are anomaly scores (higher = more anomalous); masks and maps may also be lists of per-image
2-D arrays of different sizes (images scored at their own resolution). A metric that is
undefined for the data (e.g. AUROC with only one class present) returns None, which reports
write as null.
"""


import numpy as np
import scipy.ndimage
import scipy.stats


def ravel(values, dtype=None) -> np.ndarray:
  """One flat array of an array, or of a list of per-image arrays of any sizes."""
  if isinstance(values, (list, tuple)) and values and np.ndim(values[0]) >= 2:
    return np.concatenate([np.asarray(v, dtype=dtype).ravel() for v in values])
  return np.asarray(values, dtype=dtype).ravel()


def _flat(labels, scores):
  labels = ravel(labels).astype(bool)
  scores = ravel(scores, np.float64)
  if labels.shape != scores.shape:
    raise ValueError(f"labels and scores differ in size: {labels.shape} vs {scores.shape}")
  return labels, scores


def auroc(labels, scores) -> float | None:
  """Area under the ROC curve, ties counted as half (Mann-Whitney U / (n_pos * n_neg))."""
  labels, scores = _flat(labels, scores)
  n_pos = int(labels.sum())
  n_neg = labels.size - n_pos
  if n_pos == 0 or n_neg == 0:
    return None
  ranks = scipy.stats.rankdata(scores)  # average ranks for ties
  u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def _descending_counts(labels, scores, *weights):
  """At each distinct threshold, descending: the threshold, the positives and the negatives at or
  above it, and the sum there of each of `weights` (per-element arrays)."""
  order = np.argsort(-scores, kind="stable")
  return _counts_of_sorted(scores[order], labels[order], *(w[order] for w in weights))


def _counts_of_sorted(sorted_scores, sorted_labels, *sorted_weights):
  """_descending_counts of elements already in descending order of score."""
  # Keep the last index of each run of equal scores: a threshold admits all tied pixels.
  last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
  return (sorted_scores[last_of_run], np.cumsum(sorted_labels, dtype=np.int64)[last_of_run],
          np.cumsum(~sorted_labels, dtype=np.int64)[last_of_run],
          *(np.cumsum(w)[last_of_run] for w in sorted_weights))


def _best_f1(tp, fp, n_pos) -> tuple:
  """(index of the largest, F1 at each) along cumulative counts; F1 is 0 where precision and recall are."""
  precision, recall = tp / (tp + fp), tp / n_pos
  with np.errstate(invalid="ignore", divide="ignore"):
    f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
  return int(np.argmax(f1)), f1


def f1_max(labels, scores) -> tuple[float | None, float | None]:
  """Best F1 over all thresholds `score >= t`, and that threshold t."""
  labels, scores = _flat(labels, scores)
  n_pos = labels.sum()
  if n_pos == 0:
    return None, None
  thresholds, tp, fp = _descending_counts(labels, scores)
  best, f1 = _best_f1(tp, fp, n_pos)
  return float(f1[best]), float(thresholds[best])


def iou(masks, maps, threshold: float) -> float | None:
  """Intersection over union of `maps >= threshold` with the ground-truth masks."""
  masks, maps = _flat(masks, maps)
  predicted = maps >= threshold
  union = np.logical_or(predicted, masks).sum()
  if union == 0:
    return None
  return float(np.logical_and(predicted, masks).sum() / union)


def _as_images(masks, maps):
  """masks, maps as sequences of per-image 2-D arrays of equal shapes."""
  if not isinstance(masks, (list, tuple)):
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.shape != maps.shape:
      raise ValueError(f"masks and maps differ in shape: {masks.shape} vs {maps.shape}")
    if masks.ndim == 2:
      masks, maps = masks[None], maps[None]
  for i, mask in enumerate(masks):
    if np.shape(mask) != np.shape(maps[i]):
      raise ValueError(f"mask {i} and its map differ in shape: {np.shape(mask)} vs {np.shape(maps[i])}")
  return masks, maps


def _region_weights(masks):
  """(per-pixel weight 1 / its ground-truth region's area (0 off regions), flat; regions per image)."""
  weights, regions = [], []
  for mask in masks:
    components, n = scipy.ndimage.label(np.asarray(mask).astype(bool))  # 4-connectivity, as the MVTec code
    areas = np.bincount(components.ravel())
    weight = np.zeros_like(areas, dtype=np.float64)
    weight[1:] = 1.0 / areas[1:]
    weights.append(weight[components].ravel())
    regions.append(n)
  return np.concatenate(weights), np.asarray(regions, np.int64)


def _pro_area(fpr, pro, fpr_limit):
  """The trapezoid area of the PRO curve (from (0, 0)) up to fpr_limit, interpolated there, / fpr_limit."""
  fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]
  k = int(np.searchsorted(fpr, fpr_limit, side="right"))
  if k < fpr.size:
    x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
    y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
    fpr = np.r_[fpr[:k], fpr_limit]
    pro = np.r_[pro[:k], y_limit]
  return float(np.trapezoid(pro, fpr) / fpr_limit)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float | None:
  """Area under the per-region-overlap curve up to `fpr_limit`, divided by `fpr_limit`.

  The MVTec AD protocol (Bergmann et al., IJCV 2021): every connected ground-truth
  region counts equally; PRO(t) is the mean over regions of the fraction of the
  region at or above t; FPR(t) is measured on normal pixels. Computed exactly over
  all thresholds by sorting, the curve is integrated with the trapezoid rule and
  linearly interpolated at `fpr_limit`.
  """
  return pixel_metrics(masks, maps, fpr_limit)["aupro"]


def pixel_metrics(masks, maps, fpr_limit: float = 0.3) -> dict:
  """pixel_auroc, aupro (to fpr_limit), pixel_f1_max, pixel_f1_max_threshold and pixel_iou (at
  that threshold) from one sort of the pixels: the same values as auroc, aupro, f1_max and iou
  (AUROC as the trapezoid under the ROC over distinct thresholds, which counts ties as half;
  IoU at a threshold t is TP(t) / (FP(t) + positives))."""
  return PixelSet(masks, maps).metrics(fpr_limit)


class PixelSet:
  """A test set's pixels sorted once by descending score; `metrics` of the whole set or of any
  subset of its images, whose pixels a stable filter of that order keeps in descending order
  (one sort for a category's report and all its per-defect-type rows)."""

  def __init__(self, masks, maps):
    masks, maps = _as_images(masks, maps)
    weights, self.regions = _region_weights(masks)
    scores = ravel(list(maps))
    if not np.issubdtype(scores.dtype, np.floating):
      scores = scores.astype(np.float64)
    # The scores' own dtype: float32 maps sort as float64 would, in half the memory.
    order = np.argsort(-scores, kind="stable")
    self.scores, self.weights = scores[order], weights[order]
    self.labels = ravel(list(masks)).astype(bool)[order]
    self.image = np.repeat(np.arange(len(masks), dtype=np.int32), [np.size(m) for m in masks])[order]

  def metrics(self, fpr_limit: float = 0.3, images=None) -> dict:
    """pixel_metrics' values over the images selected by `images` (a boolean mask over the
    images), or over all of them."""
    scores, labels, weights, num_regions = self.scores, self.labels, self.weights, int(self.regions.sum())
    if images is not None:
      images = np.asarray(images, bool)
      keep = images[self.image]
      scores, labels, weights, num_regions = scores[keep], labels[keep], weights[keep], int(self.regions[images].sum())
    thresholds, tp, fp, region_cover = _counts_of_sorted(scores, labels, weights)
    n_pos, n_neg = int(labels.sum()), int(labels.size - labels.sum())
    out = {"pixel_auroc": None, "aupro": None, "pixel_f1_max": None, "pixel_f1_max_threshold": None,
           "pixel_iou": None}
    if n_pos and n_neg:
      out["pixel_auroc"] = float(np.trapezoid(np.r_[0, tp] / n_pos, np.r_[0, fp] / n_neg))
    if num_regions and n_neg:
      out["aupro"] = _pro_area(fp / n_neg, region_cover / num_regions, fpr_limit)
    if n_pos:
      best, f1 = _best_f1(tp, fp, n_pos)
      out["pixel_f1_max"], out["pixel_f1_max_threshold"] = float(f1[best]), float(thresholds[best])
      out["pixel_iou"] = float(tp[best] / (fp[best] + n_pos))
    return out


def evaluate(image_labels, image_scores, masks=None, maps=None, pro_fpr_limit: float = 0.3) -> dict:
  """All report metrics for one category. Pixel metrics are None when `masks` is None.

  `f1_max` is the image-level F1-max; pixel F1-max and IoU at the pixel F1-max threshold
  are reported too. Both thresholds are read off the test set, as is standard for
  F1-max: they describe the score distribution, they are not an operating point.
  """
  image_f1, image_threshold = f1_max(image_labels, image_scores)
  result = {
      "image_auroc": auroc(image_labels, image_scores),
      "pixel_auroc": None,
      "aupro": None,
      "f1_max": image_f1,
      "f1_max_threshold": image_threshold,
      "pixel_f1_max": None,
      "pixel_f1_max_threshold": None,
      "pixel_iou": None,
      "num_images": int(np.asarray(image_labels).size),
      "num_anomalous": int(np.asarray(image_labels).astype(bool).sum()),
  }
  if masks is not None:
    result.update(pixel_metrics(masks, maps, pro_fpr_limit))
  return result


REPORT_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "pixel_iou")


def mean_over_categories(per_category: dict) -> dict:
  """Mean of each report metric over the categories where it is defined."""
  mean = {}
  for key in REPORT_KEYS:
    values = [m[key] for m in per_category.values() if m.get(key) is not None]
    mean[key] = float(np.mean(values)) if values else None
  return mean

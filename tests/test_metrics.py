import numpy as np
import pytest
from sklearn import metrics as skm

from adjax import metrics


def test_auroc_matches_sklearn_on_random_data_with_ties():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 5000)
  scores = np.round(rng.normal(size=5000) + labels * 0.7, 1)  # many ties
  assert metrics.auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_hand_cases():
  assert metrics.auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
  assert metrics.auroc([0, 1], [0.5, 0.5]) == 0.5
  # One positive ranked between two negatives: 1 of 2 pairs correct.
  assert metrics.auroc([0, 1, 0], [0.1, 0.5, 0.9]) == 0.5
  assert metrics.auroc([1, 1], [0.1, 0.2]) is None


def test_f1_max_matches_sklearn_precision_recall_curve():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 3000)
  scores = rng.normal(size=3000) + labels
  precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
  f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
  best = np.argmax(f1[:-1])
  value, threshold = metrics.f1_max(labels, scores)
  assert value == pytest.approx(f1[best], abs=1e-12)
  assert threshold == pytest.approx(thresholds[best])


def test_f1_max_hand_case():
  # 0.9 is positive, 0.6 negative, 0.3 positive. t=0.9: P=1, R=.5, F1=2/3;
  # t=0.6: P=.5, R=.5, F1=.5; t=0.3: P=2/3, R=1, F1=0.8 (best).
  value, threshold = metrics.f1_max([1, 0, 1], [0.9, 0.6, 0.3])
  assert value == pytest.approx(0.8)
  assert threshold == 0.3


def test_iou_hand_case():
  masks = np.array([[1, 1, 0, 0]])
  maps = np.array([[0.9, 0.1, 0.8, 0.0]])
  assert metrics.iou(masks, maps, 0.5) == pytest.approx(1 / 3)


def _pro_reference(masks, maps, fpr_limit):
  """Slow reference: PRO and FPR evaluated at every distinct threshold, one at a time."""
  import scipy.ndimage
  thresholds = np.unique(maps)[::-1]
  fprs, pros = [0.0], [0.0]
  normal = ~masks.astype(bool)
  for t in thresholds:
    pred = maps >= t
    fprs.append((pred & normal).sum() / normal.sum())
    overlaps = []
    for i, m in enumerate(masks):
      lab, n = scipy.ndimage.label(m)
      for k in range(1, n + 1):
        region = lab == k
        overlaps.append((pred[i] & region).sum() / region.sum())
    pros.append(np.mean(overlaps))
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs <= fpr_limit
  x = np.r_[fprs[keep], fpr_limit]
  y = np.r_[pros[keep], np.interp(fpr_limit, fprs, pros)]
  return np.trapezoid(y, x) / fpr_limit


def test_aupro_matches_dense_threshold_reference():
  rng = np.random.default_rng(2)
  masks = np.zeros((3, 12, 12), dtype=np.uint8)
  masks[0, 2:5, 2:6] = 1
  masks[0, 8:11, 8:10] = 1  # two regions in one image
  masks[1, 5:9, 1:4] = 1
  maps = rng.random((3, 12, 12)) + masks * 0.5
  maps = np.round(maps, 2)
  assert metrics.aupro(masks, maps) == pytest.approx(_pro_reference(masks, maps, 0.3), abs=1e-9)


def test_aupro_perfect_and_hand_cases():
  masks = np.zeros((1, 10, 10), dtype=bool)
  masks[0, :2, :5] = True
  perfect = masks.astype(float)
  assert metrics.aupro(masks, perfect) == pytest.approx(1.0)
  # A map that ranks all normal pixels above the anomalous ones: PRO stays 0 until FPR=1.
  assert metrics.aupro(masks, 1.0 - perfect) == pytest.approx(0.0)
  assert metrics.aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))) is None


def test_evaluate_without_masks_leaves_pixel_metrics_null():
  result = metrics.evaluate([0, 1, 1], [0.1, 0.9, 0.8])
  assert result["image_auroc"] == 1.0
  assert result["pixel_auroc"] is None and result["aupro"] is None
  mean = metrics.mean_over_categories({"a": result, "b": dict(result, image_auroc=0.5)})
  assert mean["image_auroc"] == 0.75 and mean["pixel_auroc"] is None


def test_one_sort_pixel_metrics_equal_each_metric_computed_alone():
  rng = np.random.default_rng(5)
  masks = [np.zeros((10, 10), np.uint8) for _ in range(3)]
  masks[0][2:5, 3:7] = 1
  masks[1][6:10, 1:3] = 1
  masks[1][0:2, 5:7] = 1  # two regions in one image
  maps = [np.round(rng.random(m.shape) + 0.4 * m, 1).astype(np.float32) for m in masks]  # many ties
  got = metrics.pixel_metrics(masks, maps, 0.3)
  f1, threshold = metrics.f1_max(masks, maps)
  assert got["pixel_auroc"] == pytest.approx(metrics.auroc(masks, maps), abs=1e-12)
  assert got["pixel_f1_max"] == pytest.approx(f1, abs=1e-12) and got["pixel_f1_max_threshold"] == threshold
  assert got["pixel_iou"] == pytest.approx(metrics.iou(masks, maps, threshold), abs=1e-12)
  assert got["aupro"] == pytest.approx(_pro_reference(np.stack(masks), np.stack(maps), 0.3), abs=1e-9)
  none = metrics.pixel_metrics([np.zeros((3, 3))], [rng.random((3, 3))])
  assert none["pixel_auroc"] is None and none["aupro"] is None and none["pixel_f1_max"] is None


def test_a_subset_of_the_sorted_pixels_equals_its_own_pixel_metrics():
  rng = np.random.default_rng(6)
  masks = [np.zeros(shape, np.uint8) for shape in ((8, 12), (10, 10), (6, 9), (10, 10), (7, 7))]  # sizes differ
  masks[1][2:5, 3:7] = 1
  masks[3][6:10, 1:3] = 1
  masks[3][0:2, 5:7] = 1
  masks[4][1:3, 1:3] = 1
  maps = [np.round(rng.random(m.shape) + 0.4 * m, 1).astype(np.float32) for m in masks]  # ties across images
  pixels = metrics.PixelSet(masks, maps)
  assert pixels.metrics(0.3) == metrics.pixel_metrics(masks, maps, 0.3)
  for selected in ([1, 1, 1, 0, 0], [1, 0, 0, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]):
    chosen = np.flatnonzero(selected)
    own = metrics.pixel_metrics([masks[i] for i in chosen], [maps[i] for i in chosen], 0.3)
    got = pixels.metrics(0.3, np.array(selected, bool))
    assert got.keys() == own.keys()
    for key in own:
      assert got[key] == pytest.approx(own[key], abs=1e-12), key
  assert pixels.metrics(0.3, np.array([1, 0, 1, 0, 0], bool))["pixel_auroc"] is None  # no defect pixel there


def test_reports_run_behind_the_caller_in_submission_order_and_fail_at_the_next_submit(monkeypatch):
  import threading
  import time
  import types

  from adjax import evaluate
  live, most = [0], [0]
  lock = threading.Lock()

  def report(split, scored, *rest):
    with lock:
      live[0] += 1
      most[0] = max(most[0], live[0])
    time.sleep(scored["sleep"])
    with lock:
      live[0] -= 1
    if scored.get("fail"):
      raise ValueError(f"{split.category} failed")
    return {"category": split.category}

  monkeypatch.setattr(evaluate, "category_report", report)
  cat = lambda name: types.SimpleNamespace(category=name)
  with evaluate.Reports(threads=2) as reports:
    for name, sleep in (("a", 0.3), ("b", 0.0), ("c", 0.1), ("d", 0.0)):
      reports.submit(cat(name), {"sleep": sleep}, None, None, None)
    assert list(reports.results()) == ["a", "b", "c", "d"]
    assert [r["category"] for r in reports.results().values()] == ["a", "b", "c", "d"]
  assert most[0] == 2  # a slow report runs while the next ones are submitted, never more than `threads`
  with evaluate.Reports(threads=1) as reports:
    reports.submit(cat("bad"), {"sleep": 0.1, "fail": True}, None, None, None)
    with pytest.raises(ValueError, match="bad failed"):
      reports.submit(cat("next"), {"sleep": 0.0}, None, None, None)

r"""Pixel-metric speed at full resolution: metrics.pixel_metrics (one sort for pixel AUROC, AUPRO,
pixel F1-max and IoU) against the same four computed one metric at a time (auroc's rank sort,
f1_max's sort, iou's pass and aupro, itself pixel_metrics now: three sorts, as metrics.evaluate
made before), same arrays, same run. Then a category's report rows (the whole test set and each
defect type's images against every normal image, as `evaluate.category_metrics` makes them):
one metrics.PixelSet sorted once and filtered per row, against a pixel_metrics sort per row.

  python benchmarks/metrics_speed.py [--images 60] [--side 900] [--defect-types 3]

Synthetic maps (uniform noise, raised inside one rectangle per defective image) at MVTec bottle's
900x900; values are checked equal before timing is reported.
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from adjax import metrics  # noqa: E402


def one_at_a_time(masks, maps, fpr_limit):
  f1, threshold = metrics.f1_max(masks, maps)
  return {"pixel_auroc": metrics.auroc(masks, maps), "aupro": metrics.aupro(masks, maps, fpr_limit),
          "pixel_f1_max": f1, "pixel_f1_max_threshold": threshold, "pixel_iou": metrics.iou(masks, maps, threshold)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--images", type=int, default=60)
  parser.add_argument("--side", type=int, default=900)
  parser.add_argument("--defect-types", type=int, default=3, help="defect types the defective images are dealt to")
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  n, side = args.images, args.side
  masks = np.zeros((n, side, side), np.uint8)
  masks[: n // 3, side // 3:side // 2, side // 4:side // 2] = 1
  maps = rng.random((n, side, side), dtype=np.float32) + 0.3 * masks
  masks, maps = list(masks), list(maps)
  print(f"{n} images of {side}x{side} ({n * side * side / 1e6:.1f}M pixels)", flush=True)
  wall = time.perf_counter()
  start = time.perf_counter()
  reference = one_at_a_time(masks, maps, 0.3)
  reference_s = time.perf_counter() - start
  start = time.perf_counter()
  shared = metrics.pixel_metrics(masks, maps, 0.3)
  shared_s = time.perf_counter() - start
  for key, value in reference.items():
    assert abs(shared[key] - value) <= 1e-9 * max(1.0, abs(value)), (key, shared[key], value)
  print(f"{'one metric at a time':<22} {n / reference_s:7.2f} img/s  {reference_s:7.1f} s")
  print(f"{'one sort (adjax)':<22} {n / shared_s:7.2f} img/s  {shared_s:7.1f} s  {reference_s / shared_s:5.2f}x")
  # The report: the whole set, then each defect type's images with every normal one.
  defective = np.arange(n // 3)
  rows = [np.ones(n, bool)]
  for t in range(args.defect_types):
    row = np.zeros(n, bool)
    row[n // 3:] = True  # the normal images
    row[defective[t::args.defect_types]] = True
    rows.append(row)
  start = time.perf_counter()
  per_row = [metrics.pixel_metrics([masks[i] for i in np.flatnonzero(r)], [maps[i] for i in np.flatnonzero(r)], 0.3)
             for r in rows]
  per_row_s = time.perf_counter() - start
  start = time.perf_counter()
  pixels = metrics.PixelSet(masks, maps)
  filtered = [pixels.metrics(0.3, r) for r in rows]
  filtered_s = time.perf_counter() - start
  for own, got in zip(per_row, filtered):
    for key, value in own.items():
      assert abs(got[key] - value) <= 1e-9 * max(1.0, abs(value)), (key, got[key], value)
  print(f"report: the whole set and {args.defect_types} defect types ({len(rows)} rows)")
  print(f"{'a sort per row':<22} {per_row_s:7.1f} s")
  print(f"{'one sort, filtered':<22} {filtered_s:7.1f} s  {per_row_s / filtered_s:5.2f}x")
  print(f"wall {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
  main()

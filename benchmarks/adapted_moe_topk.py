r"""Adapted-MoE's top-k sweep (the paper's Figs. 5 and 6) on the built-in dataset: per-subclass AUROC
against the number of experts each test image is routed to.

  python benchmarks/adapted_moe_topk.py [--variant ''] [--category cloth,wood,metal]
      [--workdir runs/adapted_moe_topk/<time>] [--set train.epochs=16 ...]

Trains configs/adapted_moe.py:<variant> once (`adjax.main --mode=train`, top-1 as configured),
then, with the same trained state, scores the test images with top_k = 1 .. K (K = the number
of experts; top-k acts only at inference, eq. 4) and prints, per category and k, the image and
pixel AUROC of every subclass, the mean over unseen subclasses (Table 1's figure) and the
pooled AUROC, as a Markdown table; `topk.png` in the workdir plots the per-subclass image
AUROC against k. Nothing is selected on the test set.
"""

import json
import os
import sys
import time

import ml_collections
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import accuracy_runs as runs  # noqa: E402

from adjax import checkpoints, evaluate, methods, train  # noqa: E402

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def plot(path, series, ks, title):
  """A line chart of {label: [AUROC per k]} (dashed: unseen subclasses), written as a PNG with PIL."""
  w, h, left, bottom, top, right = 760, 440, 60, 50, 40, 230
  image = Image.new("RGB", (w, h), "white")
  d = ImageDraw.Draw(image)
  lo = min(0.5, min(v for vals in series.values() for v in vals if v is not None) - 0.02)
  x_of = lambda k: left + (k - ks[0]) * (w - left - right) / max(1, ks[-1] - ks[0])
  y_of = lambda v: top + (1.0 - v) * (h - top - bottom) / (1.0 - lo)
  d.rectangle([left, top, w - right, h - bottom], outline="black")
  for k in ks:
    d.text((x_of(k) - 3, h - bottom + 8), str(k), fill="black")
  for i in range(6):
    v = lo + i * (1.0 - lo) / 5
    d.line([left - 4, y_of(v), left, y_of(v)], fill="black")
    d.text((8, y_of(v) - 6), f"{100 * v:.0f}", fill="black")
  d.text((left, 12), title, fill="black")
  d.text(((w - right) // 2, h - 22), "top k", fill="black")
  for i, (label, values) in enumerate(series.items()):
    colour = COLOURS[i % len(COLOURS)]
    points = [(x_of(k), y_of(v)) for k, v in zip(ks, values) if v is not None]
    dashed = "unseen" in label
    for a, b in zip(points, points[1:]):
      if dashed:
        for t in np.linspace(0, 1, 12)[::2]:
          p = (a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]))
          q = (a[0] + min(1, t + 1 / 11) * (b[0] - a[0]), a[1] + min(1, t + 1 / 11) * (b[1] - a[1]))
          d.line([p, q], fill=colour, width=2)
      else:
        d.line([a, b], fill=colour, width=2)
    for p in points:
      d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
    d.text((w - right + 12, top + 16 * i), label, fill=colour)
  image.save(path)


def main():
  parser = runs.parser("adapted_moe_topk")
  parser.add_argument("--variant", default="", help="configs/adapted_moe.py variant (default: the built-in dataset)")
  args = parser.parse_args()
  runs.check_new(args.workdir)
  start = time.perf_counter()
  runs.train(f"adapted_moe.py:{args.variant}", args.workdir, args.set)
  config = ml_collections.ConfigDict(json.load(open(os.path.join(args.workdir, checkpoints.RUN_CONFIG))))
  method = methods.build(config)
  extractor = method.make_extractor()
  lines = ["| category | k | subclass | unseen | I-AUROC | P-AUROC |", "|---|---|---|---|---|---|"]
  for split in train.load_splits(config, method):
    state = checkpoints.restore(args.workdir, split.category)["state"]
    experts = int(np.asarray(state["centers"]).shape[0])
    ks = list(range(1, experts + 1))
    series = {}
    for k in ks:
      config.model.top_k = k
      method = methods.build(config)
      scored = evaluate.score_dataset(config, method, state, extractor, split.test, f"{split.category} top-{k}")
      result = evaluate.category_metrics(split, scored, config)
      rows = [(name, m["unseen"], m["image_auroc"], m["pixel_auroc"]) for name, m in result["subclasses"].items()]
      rows += [("(unseen mean, Table 1)", True, result["unseen_subclass_mean"]["image_auroc"],
                result["unseen_subclass_mean"]["pixel_auroc"]),
               ("(all test images)", None, result["image_auroc"], result["pixel_auroc"])]
      for name, unseen, i_auroc, p_auroc in rows:
        fmt = lambda v: "n/a" if v is None else f"{100 * v:.2f}"
        lines.append(f"| {split.category} | {k} | {name} | {'' if unseen is None else 'yes' if unseen else ''} | "
                     f"{fmt(i_auroc)} | {fmt(p_auroc)} |")
        if unseen is not None:
          series.setdefault(f"{name}{' (unseen)' if unseen and not name.startswith('(') else ''}", []).append(i_auroc)
    plot(os.path.join(args.workdir, f"topk_{split.category}.png"), series, ks,
         f"Adapted-MoE on {split.category}: image AUROC per subclass vs top k")
  print("\n".join(lines))
  print(f"\nPlots: {args.workdir}/topk_<category>.png; wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()

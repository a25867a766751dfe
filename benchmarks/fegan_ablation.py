r"""FEGAN's ablations (the paper's Tables 5, 6 and 7) on the built-in dataset.

  python benchmarks/fegan_ablation.py [--tables 5,6,7] [--workdir runs/fegan_ablation/<time>]
      [--set train.epochs=10 ...]

Trains and evaluates configs/fegan.py:<variant> for every variant of the chosen tables (one
`adjax.main` run each, all three built-in categories, the default variant's settings:
offline Lite0 FEN, quarter-width generator, 64x64, 10 epochs) and prints, per table, the
means over the categories of image AUROC, pixel AUROC and pixel IoU (at each category's
pixel F1-max threshold, metrics.py). Table 5 varies M-SE's total area, Table 6 the
augmentation, Table 7 the components (generator with L_con alone up to the full model).
Every run starts in a new folder and its final model is evaluated; nothing is selected on the
test set.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy_runs as runs  # noqa: E402

sys.path.insert(0, os.path.join(runs.ROOT, "configs"))
import fegan  # noqa: E402

TABLES = {
    "5": ("Table 5, M-SE area (percent of the image)", [f"area={a}" for a in fegan.AREAS]),
    "6": ("Table 6, augmentation", [f"augment={k}" for k in fegan.AUGMENTS]),
    "7": ("Table 7, components", [f"row={r}" for r in ("con", "con_mse", "con_mse_adv", "con_mse_fea", "full")]),
}


def main():
  parser = runs.parser("fegan_ablation")
  parser.add_argument("--tables", default="5,6,7")
  args = parser.parse_args()
  runs.check_new(args.workdir)
  done_variants = {}
  for table in args.tables.split(","):
    title, variants = TABLES[table]
    rows = []
    for variant in variants:
      if variant not in done_variants:  # area=20, augment=mse and row=full are the same default model
        key = fegan.get_config(variant).model.to_json()
        same = next((v for v, (k, _) in done_variants.items() if k == key), None)
        if same is None:
          metrics, seconds, _ = runs.train(f"fegan.py:{variant}", os.path.join(args.workdir, variant.replace("=", "_")),
                                           args.set)
          result = {k: runs.mean_of(metrics, k) for k in ("image_auroc", "pixel_auroc", "pixel_iou")}
          result["seconds"] = seconds
          print(f"{variant:<20} done in {result['seconds']:.0f} s", flush=True)
        else:
          result = done_variants[same][1]
        done_variants[variant] = (key, result)
      rows.append((variant, done_variants[variant][1]))
    print(f"\n{title}\n\n| variant | I-AUROC | P-AUROC | IoU |\n|---|---|---|---|")
    for variant, r in rows:
      print(f"| {variant} | {100 * r['image_auroc']:.2f} | {100 * r['pixel_auroc']:.2f} | {100 * r['pixel_iou']:.2f} |")
    print(flush=True)
  print("Means over the built-in categories (cloth, wood, metal); each variant trained once (seed 0), final model.")


if __name__ == "__main__":
  main()

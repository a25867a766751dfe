r"""Adapted-MoE ablation (the paper's Table 2) on the built-in dataset, seen vs unseen subclasses.

  python benchmarks/adapted_moe_ablation.py [--rows baseline,moe,tta,norm,all] [--workdir runs/ablation/<time>]
      [--set train.epochs=16 ...]

Trains and evaluates configs/adapted_moe.py:row=<row> for each row (one `adjax.main` run
each, all three categories) and prints mean image / pixel AUROC over the categories, for
seen and unseen subclasses, and each category's automatic feature scale (model.feature_scale,
from the run's log). 'baseline' is SimpleNet. Nothing is selected on the test set: every row
is trained for the config's epochs in a new folder and its final model is evaluated.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy_runs as runs  # noqa: E402

sys.path.insert(0, os.path.join(runs.ROOT, "configs"))
import adapted_moe  # noqa: E402


def main():
  parser = runs.parser("ablation")
  parser.add_argument("--rows", default="baseline,moe,tta,norm,moe_norm,tta_norm,moe_tta,all")
  args = parser.parse_args()
  runs.check_new(args.workdir)
  results = {}
  for row in args.rows.split(","):
    metrics, seconds, stderr = runs.train(f"adapted_moe.py:row={row}", os.path.join(args.workdir, row), args.set)
    results[row] = {group: {k: runs.mean_of(metrics, k, group) for k in ("image_auroc", "pixel_auroc")}
                    for group in ("seen", "unseen", "unseen_subclass_mean")}
    results[row]["seconds"] = seconds
    scales = [line.split("] ", 1)[-1] for line in stderr.splitlines() if ": feature scale" in line]
    print(f"{row:<10} done in {results[row]['seconds']:.0f} s; " + "; ".join(scales), flush=True)
  print("\n| row | +MoE | +TTA | +Norm | seen I-AUROC | seen P-AUROC | unseen I-AUROC | unseen P-AUROC "
        "| Table 1 unseen I | Table 1 unseen P |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for row, r in results.items():
    flags = ["x" if f else "" for f in adapted_moe.ROWS[row]]
    cells = [r[g][k] for g in ("seen", "unseen", "unseen_subclass_mean") for k in ("image_auroc", "pixel_auroc")]
    print(f"| {row} | {' | '.join(flags)} | " + " | ".join(f"{100 * v:.2f}" for v in cells) + " |")
  print("\nMeans over the built-in categories (cloth, wood, metal); each row trained once, final model. seen / "
        "unseen: one AUROC over all images of the group; Table 1: the mean over unseen subclasses of each one's "
        "own AUROC, as the paper's 'Average'.")


if __name__ == "__main__":
  main()

r"""Adapted-MoE ablation (the paper's Table 2) on the built-in dataset, seen vs unseen subclasses.

  python benchmarks/adapted_moe_ablation.py [--rows baseline,moe,tta,norm,all] [--workdir runs/ablation/<time>]
      [--set train.epochs=16 ...]

Trains and evaluates configs/adapted_moe.py:row=<row> for each row (one `adjax.main` run
each, all three categories) and prints mean image / pixel AUROC over the categories, for
seen and unseen subclasses, and each category's automatic feature scale (model.feature_scale,
from the run's log). 'baseline' is SimpleNet. Nothing is selected on the test set: every row
is trained for the config's epochs in a new folder and its final model is evaluated.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "configs"))
import adapted_moe  # noqa: E402


def mean_of(metrics, group, key):
  values = [m[group][key] for name, m in metrics.items() if name != "mean" and m.get(group, {}).get(key) is not None]
  return sum(values) / len(values) if values else float("nan")


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--rows", default="baseline,moe,tta,norm,moe_norm,tta_norm,moe_tta,all")
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "ablation", time.strftime("%Y%m%d-%H%M%S")))
  parser.add_argument("--set", action="append", default=[], help="extra config overrides, e.g. train.epochs=32")
  args = parser.parse_args()
  if os.path.exists(args.workdir):
    sys.exit(f"{args.workdir} exists; give a new --workdir (a finished run there would be evaluated, not retrained).")
  results = {}
  for row in args.rows.split(","):
    workdir = os.path.join(args.workdir, row)
    command = [sys.executable, "-m", "adjax.main", f"--config=configs/adapted_moe.py:row={row}", f"--workdir={workdir}",
               *[f"--config.{s}" for s in args.set]]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
      sys.exit(f"row {row} failed:\n{done.stderr[-3000:]}")
    metrics = json.load(open(os.path.join(workdir, "metrics.json")))["metrics"]
    results[row] = {group: {k: mean_of(metrics, group, k) for k in ("image_auroc", "pixel_auroc")}
                    for group in ("seen", "unseen", "unseen_subclass_mean")}
    results[row]["seconds"] = time.perf_counter() - start
    scales = [line.split("] ", 1)[-1] for line in done.stderr.splitlines() if ": feature scale" in line]
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

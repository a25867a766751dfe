r"""Adapted-MoE ablation (the paper's Table 2) on the built-in dataset, seen vs unseen subclasses.

  python benchmarks/adapted_moe_ablation.py [--rows baseline,moe,tta,norm,all] [--workdir runs/ablation]
      [--set train.epochs=16 ...]

Trains and evaluates configs/adapted_moe.py:row=<row> for each row (one `adjax.main` run
each, all three categories) and prints mean image / pixel AUROC over the categories, for
seen and unseen subclasses. 'baseline' is SimpleNet. Nothing is selected on the test set:
every row is trained for the config's epochs and its final model is evaluated.
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
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "ablation"))
  parser.add_argument("--set", action="append", default=[], help="extra config overrides, e.g. train.epochs=32")
  args = parser.parse_args()
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
                    for group in ("seen", "unseen")}
    results[row]["seconds"] = time.perf_counter() - start
    print(f"{row:<10} done in {results[row]['seconds']:.0f} s", flush=True)
  print("\n| row | +MoE | +TTA | +Norm | seen I-AUROC | seen P-AUROC | unseen I-AUROC | unseen P-AUROC |")
  print("|---|---|---|---|---|---|---|---|")
  for row, r in results.items():
    flags = ["x" if f else "" for f in adapted_moe.ROWS[row]]
    print(f"| {row} | {' | '.join(flags)} | {100 * r['seen']['image_auroc']:.2f} | "
          f"{100 * r['seen']['pixel_auroc']:.2f} "
          f"| {100 * r['unseen']['image_auroc']:.2f} | {100 * r['unseen']['pixel_auroc']:.2f} |")
  print("\nMeans over the built-in categories (cloth, wood, metal); each row trained once, final model.")


if __name__ == "__main__":
  main()

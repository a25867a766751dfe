r"""Accuracy on the real MVTec AD bottle category with offline EfficientNet-Lite weights.

  python benchmarks/bottle_accuracy.py [--configs simplenet.py:mvtec_ad_lite0 pfm.py:lite0_lite2,model=pfm]
      [--root ../shared/data/mvtec_ad] [--workdir runs/bottle] [--set train.epochs=40 ...]

Trains and evaluates each config on bottle (209 train, 83 test images) with `adjax.main`,
then prints image AUROC, pixel AUROC, AUPRO and the wall time. Every model is evaluated
after its last epoch; nothing is selected on the test set. Too slow for CI on 2 CPU cores
(SimpleNet's 160 epochs at 329 -> 288 took 45-60 minutes there); the figures measured so far are in
benchmarks/README.md.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = ["simplenet.py:mvtec_ad_lite0", "rsad.py:mvtec_ad_lite0", "pfm.py:lite0_lite2,model=pfm",
           "pfm.py:lite0_lite2,model=bpfm", "pfm.py:lite0_lite2"]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", nargs="+", default=DEFAULT, help="config file[:variant] per run")
  parser.add_argument("--root", default=os.path.join(ROOT, "..", "shared", "data", "mvtec_ad"))
  parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "bottle"))
  parser.add_argument("--set", action="append", default=[], help="extra config overrides, e.g. train.epochs=40")
  args = parser.parse_args()
  rows = []
  for spec in args.configs:
    workdir = os.path.join(args.workdir, "".join(ch if ch.isalnum() else "_" for ch in spec.replace(".py", "")))
    command = [sys.executable, "-m", "adjax.main", f"--config=configs/{spec}", f"--config.data.root={args.root}",
               "--config.data.category=bottle", f"--workdir={workdir}", *[f"--config.{s}" for s in args.set]]
    start = time.perf_counter()
    print(f"== {spec}: {' '.join(command[1:])}", flush=True)
    done = subprocess.run(command, cwd=ROOT)  # the run's progress bars and epoch log go to the console
    seconds = time.perf_counter() - start
    if done.returncode != 0:
      sys.exit(f"{spec} failed (exit {done.returncode}); its error is printed above.")
    m = json.load(open(os.path.join(workdir, "metrics.json")))["metrics"]["bottle"]
    rows.append((spec, m["image_auroc"], m["pixel_auroc"], m["aupro"], seconds))
    print(f"{spec}: I-AUROC {m['image_auroc']:.4f} P-AUROC {m['pixel_auroc']:.4f} AUPRO {m['aupro']:.4f} "
          f"({seconds / 60:.1f} min)", flush=True)
  print("\n| config | I-AUROC | P-AUROC | AUPRO@0.3 | wall time |\n|---|---|---|---|---|")
  for spec, i, p, a, s in rows:
    print(f"| {spec} | {100 * i:.2f} | {100 * p:.2f} | {100 * a:.2f} | {s / 60:.1f} min |")


if __name__ == "__main__":
  main()

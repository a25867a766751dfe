r"""Every category trained in one compiled program (train.categories_together) against one after
another: the same `adjax.main` run, end to end (caches, training, threshold, scoring, reports).

  python benchmarks/all_categories.py [--config simplenet.py] [--set train.epochs=16 ...]
  python benchmarks/all_categories.py --config simplenet.py:mvtec_ad --bottle-copies 15 \
      --set model.backbone_weights=random        # the GPU figure: 15 bottle-sized categories

Default: the built-in dataset's three categories with configs/simplenet.py (Lite0, 16 epochs).
--bottle-copies N: N categories, each MVTec AD bottle under another name (symbolic links in a
temporary root; timing does not depend on the images being different).

Each mode runs twice in a fresh process with its own empty JAX compilation cache: the first run
compiles everything (cold), the second finds the programs in that cache (warm), as a user's
second run does. Prints, per mode and run, the wall time, the training images processed per
second (images x epochs x categories / wall) and the ratio one after another / together; and
each run's mean image AUROC (the two modes agree up to float rounding).
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accuracy_runs as runs  # noqa: E402

ROOT = runs.ROOT


def bottle_root(copies: int, mvtec: str) -> tuple:
  """(root, categories): `copies` names linked to MVTec AD bottle."""
  source = os.path.join(mvtec, "bottle")
  if not os.path.isdir(source):
    sys.exit(f"{source} does not exist: give --mvtec, the MVTec AD folder that holds bottle/.")
  root = tempfile.mkdtemp(prefix="adjax_bottles_")
  names = [f"bottle_{i:02d}" for i in range(copies)]
  for name in names:
    os.symlink(os.path.abspath(source), os.path.join(root, name))
  return root, names


def run(spec, workdir, overrides, cache_dir):
  """One `adjax.main` training run: (seconds, metrics, stderr)."""
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
  command = [sys.executable, "-m", "adjax.main", f"--config=configs/{spec}", f"--workdir={workdir}",
             *[f"--config.{s}" for s in overrides]]
  start = time.perf_counter()
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
  seconds = time.perf_counter() - start
  if done.returncode != 0:
    sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
  return seconds, json.load(open(os.path.join(workdir, "metrics.json")))["metrics"], done.stderr


def main():
  parser = runs.parser("all_categories")
  parser.add_argument("--config", default="simplenet.py", help="configs/<file>[:variant]")
  parser.add_argument("--bottle-copies", type=int, default=0, help="N categories, each MVTec AD bottle")
  parser.add_argument("--mvtec", default=os.path.join(ROOT, "..", "shared", "data", "mvtec_ad"))
  args = parser.parse_args()
  runs.check_new(args.workdir)
  overrides = list(args.set)
  if args.bottle_copies:
    root, names = bottle_root(args.bottle_copies, args.mvtec)
    overrides += ["data.name=mvtec_ad", f"data.root={root}", f"data.category={','.join(names)}"]
  rows, results = [], {}
  for together in (True, False):
    mode = "together" if together else "one after another"
    cache = os.path.join(args.workdir, f"xla_cache_{'together' if together else 'solo'}")
    for attempt in ("cold", "warm"):
      workdir = os.path.join(args.workdir, f"{'together' if together else 'solo'}_{attempt}")
      seconds, metrics, log = run(args.config, workdir, overrides + [f"train.categories_together={together}"], cache)
      if together and "together in one program" not in log:
        sys.exit(f"train.categories_together did not act in {workdir}: its log says\n{log[-3000:]}")
      config = json.load(open(os.path.join(workdir, "config.json")))
      categories = [c for c in metrics if not c.startswith("mean")]
      train_images = sum(int(n) for n in re.findall(r"Category \S+: (\d+) train", log))
      epochs = config["train"]["epochs"]
      results[(together, attempt)] = seconds
      rows.append((mode, attempt, len(categories), seconds, train_images * epochs / seconds if train_images else None,
                   runs.mean_of(metrics, "image_auroc")))
      print(f"{mode}, {attempt}: {seconds:.1f} s", flush=True)
  print("\n| mode | run | categories | wall (s) | training images x epochs / s | mean image AUROC |")
  print("|---|---|---|---|---|---|")
  for mode, attempt, n, seconds, throughput, auroc in rows:
    print(f"| {mode} | {attempt} | {n} | {seconds:.1f} | {'n/a' if throughput is None else f'{throughput:.1f}'} | "
          f"{100 * auroc:.2f} |")
  for attempt in ("cold", "warm"):
    print(f"{attempt}: one after another / together = {results[(False, attempt)] / results[(True, attempt)]:.2f}x")


if __name__ == "__main__":
  main()

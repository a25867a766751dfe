r"""Every category trained in one compiled program (train.categories_together) against one after
another: the same `adjax.main` run, end to end (caches, training, threshold, scoring, reports).

  python benchmarks/all_categories.py [--config simplenet.py] [--set train.epochs=16 ...]
      [--runs together:cold,together:warm,solo:cold,solo:warm]
  python benchmarks/all_categories.py --config simplenet.py:mvtec_ad --bottle-copies 15 \
      --set model.backbone_weights=random        # the GPU figure: 15 bottle-sized categories

Default: the built-in dataset's three categories with configs/simplenet.py (Lite0, 16 epochs).
--bottle-copies N: N categories, each MVTec AD bottle under another name (symbolic links in a
temporary root; timing does not depend on the images being different).

Each mode runs in a fresh process with its own JAX compilation cache, first empty (cold: it
compiles everything), then filled by that run (warm, as a user's second run); --runs picks
which of the four runs, in order (a warm run without its cold one finds an empty cache). Prints
each run's wall time as it ends, then per run the training images processed per second (images
x epochs x categories / wall), the mean image AUROC (the two modes agree up to float rounding),
the ratio one after another / together where both ran, and the phases read off each run's log
(kept as <workdir>/<mode>_<run>.log): start-up, feature caches, training, and scoring with reports.
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
  """One `adjax.main` training run: (seconds, metrics, stderr, the start as time.time())."""
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir}
  command = [sys.executable, "-m", "adjax.main", f"--config=configs/{spec}", f"--workdir={workdir}",
             *[f"--config.{s}" for s in overrides]]
  began, start = time.time(), time.perf_counter()
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
  seconds = time.perf_counter() - start
  with open(f"{workdir}.log", "w") as f:
    f.write(done.stderr)
  if done.returncode != 0:
    sys.exit(f"{' '.join(command)} failed (log: {workdir}.log):\n{done.stderr[-3000:]}")
  return seconds, json.load(open(os.path.join(workdir, "metrics.json")))["metrics"], done.stderr, began


_STAMP = re.compile(r"^[IWE]\d{4} (\d{2}):(\d{2}):(\d{2}\.\d+) .*?\] (.*)$", re.M)


def phases(log: str, began: float, seconds: float) -> dict:
  """A together run's phases from absl's time stamps (the day's clock: a run over midnight reads
  wrong): start-up (to the last category's listing), feature caches (to the last cache's line),
  training (to the last epoch line) and scoring with reports (the rest); {} if a mark is missing."""
  marks = {}
  for match in _STAMP.finditer(log):
    t, text = int(match[1]) * 3600 + int(match[2]) * 60 + float(match[3]), match[4]
    for name, pattern in (("listed", r"^Category \S+: \d+ train"), ("cached", r"^Features cache"),
                          ("trained", r" epoch \d+/\d+: ")):
      if re.search(pattern, text):
        marks[name] = t
  if set(marks) != {"listed", "cached", "trained"}:
    return {}
  local = time.localtime(began)
  out = {"start-up": marks["listed"] - (local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec + began % 1),
         "feature caches": marks["cached"] - marks["listed"], "training": marks["trained"] - marks["cached"]}
  out["scoring and reports"] = seconds - sum(out.values())
  return out


RUNS = ("together:cold", "together:warm", "solo:cold", "solo:warm")


def main():
  parser = runs.parser("all_categories")
  parser.add_argument("--config", default="simplenet.py", help="configs/<file>[:variant]")
  parser.add_argument("--bottle-copies", type=int, default=0, help="N categories, each MVTec AD bottle")
  parser.add_argument("--mvtec", default=os.path.join(ROOT, "..", "shared", "data", "mvtec_ad"))
  parser.add_argument("--runs", default=",".join(RUNS), help="which runs, in order, of " + ", ".join(RUNS))
  args = parser.parse_args()
  plan = [r.strip() for r in args.runs.split(",") if r.strip()]
  if not plan or set(plan) - set(RUNS):
    sys.exit(f"--runs takes a comma list of {', '.join(RUNS)}; got '{args.runs}'.")
  runs.check_new(args.workdir)
  overrides = list(args.set)
  if args.bottle_copies:
    root, names = bottle_root(args.bottle_copies, args.mvtec)
    overrides += ["data.name=mvtec_ad", f"data.root={root}", f"data.category={','.join(names)}"]
  rows, results = [], {}
  for name in plan:
    kind, attempt = name.split(":")
    together = kind == "together"
    mode = "together" if together else "one after another"
    workdir = os.path.join(args.workdir, f"{kind}_{attempt}")
    seconds, metrics, log, began = run(args.config, workdir, overrides + [f"train.categories_together={together}"],
                                       os.path.join(args.workdir, f"xla_cache_{kind}"))
    if together and "together in one program" not in log:
      sys.exit(f"train.categories_together did not act in {workdir}: its log says\n{log[-3000:]}")
    config = json.load(open(os.path.join(workdir, "config.json")))
    categories = [c for c in metrics if not c.startswith("mean")]
    train_images = sum(int(n) for n in re.findall(r"Category \S+: (\d+) train", log))
    epochs = config["train"]["epochs"]
    results[(together, attempt)] = seconds
    parts = phases(log, began, seconds) if together else {}
    rows.append((mode, attempt, len(categories), seconds, train_images * epochs / seconds if train_images else None,
                 runs.mean_of(metrics, "image_auroc"), parts))
    print(f"{mode}, {attempt}: {seconds:.1f} s" + "".join(f"; {k} {v:.1f} s" for k, v in parts.items()), flush=True)
  print("\n| mode | run | categories | wall (s) | training images x epochs / s | mean image AUROC | phases (s) |")
  print("|---|---|---|---|---|---|---|")
  for mode, attempt, n, seconds, throughput, auroc, parts in rows:
    print(f"| {mode} | {attempt} | {n} | {seconds:.1f} | {'n/a' if throughput is None else f'{throughput:.1f}'} | "
          f"{100 * auroc:.2f} | {', '.join(f'{k} {v:.1f}' for k, v in parts.items()) or '-'} |")
  for attempt in ("cold", "warm"):
    if (False, attempt) in results and (True, attempt) in results:
      print(f"{attempt}: one after another / together = {results[(False, attempt)] / results[(True, attempt)]:.2f}x")


if __name__ == "__main__":
  main()

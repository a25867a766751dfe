"""What the accuracy benchmarks share: a fresh workdir per invocation, one `adjax.main` run per
config, and means over a report's categories."""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parser(name: str, description: str = "") -> argparse.ArgumentParser:
  """--workdir (default runs/<name>/<date-time>, refused if it exists) and --set overrides."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", name, time.strftime("%Y%m%d-%H%M%S")))
  p.add_argument("--set", action="append", default=[], help="extra config overrides, e.g. train.epochs=20")
  return p


def check_new(workdir: str) -> None:
  if os.path.exists(workdir):
    sys.exit(f"{workdir} exists; give a new --workdir (a finished run there would be evaluated, not retrained).")


def train(spec: str, workdir: str, overrides=()) -> tuple:
  """Trains and evaluates configs/<spec> into workdir: (metrics.json's metrics, seconds, stderr)."""
  command = [sys.executable, "-m", "adjax.main", f"--config=configs/{spec}", f"--workdir={workdir}",
             *[f"--config.{s}" for s in overrides]]
  start = time.perf_counter()
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  if done.returncode != 0:
    sys.exit(f"{spec} failed:\n{done.stderr[-3000:]}")
  metrics = json.load(open(os.path.join(workdir, "metrics.json")))["metrics"]
  return metrics, time.perf_counter() - start, done.stderr


def mean_of(metrics: dict, key: str, group: str = "") -> float:
  """The mean over categories of metrics[category][group][key] (or [key]), where defined."""
  values = [(m.get(group, {}) if group else m).get(key) for name, m in metrics.items() if not name.startswith("mean")]
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else float("nan")

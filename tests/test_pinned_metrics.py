"""Every built-in method's metrics on the built-in dataset at a fixed small setting, pinned.

Wood, 64x64, seed 0, two epochs for gradient-trained methods (PFM's, SimpleNet's, ...):
a refactoring of the shared loop, the caches or a method must leave these numbers unchanged.
Values were recorded before the method protocol (adjax/methods/base.py) and reproduced to
every printed digit after it. A deliberate change of results updates them in the same commit,
saying why; the tolerance only absorbs float reassociation across XLA versions.
"""

import pytest

from adjax import train
from configs import adapted_moe, patch_knn, pfm, rsad, simplenet

PINNED = {  # (image AUROC, pixel AUROC, AUPRO)
    "patch_knn": (patch_knn, 0.9225, 0.9179253838947132, 0.7983487398753014),
    "simplenet": (simplenet, 0.9125, 0.7850779953928236, 0.6451854568235357),
    "rsad": (rsad, 0.78, 0.7139518969032775, 0.22601984993612717),
    "adapted_moe": (adapted_moe, 0.5258333333333334, 0.5025148133694207, 0.09394889108468914),
    "pfm": (pfm, 0.9341666666666667, 0.9461724843481734, 0.8668808319040818),
}


@pytest.mark.parametrize("name", list(PINNED))
def test_metrics_on_the_built_in_dataset_are_unchanged(name, tmp_path, synthetic_root):
  module, image_auroc, pixel_auroc, aupro = PINNED[name]
  config = module.get_config("")
  config.data.root, config.data.category = synthetic_root, "wood"
  config.data.image_size = config.data.crop_size = 64
  config.eval.num_overlays = 0
  if config.train.epochs > 1:
    config.train.epochs = 2
  metrics = train.run(config, str(tmp_path), "train")["wood"]
  assert metrics["image_auroc"] == pytest.approx(image_auroc, abs=5e-4)
  assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc, abs=2e-4)
  assert metrics["aupro"] == pytest.approx(aupro, abs=5e-4)

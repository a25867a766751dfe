r"""Nearest-neighbour patch distance (adjax's reference scorer; see adjax/methods/patch_knn.py).

Usage:
  python -m adjax.main --config=configs/patch_knn.py --workdir=runs/knn
  python -m adjax.main --config=configs/patch_knn.py:mvtec_ad --config.data.root=/data/mvtec_ad \
      --config.data.category=bottle --workdir=runs/knn_bottle

Variant: '<dataset>' (configlib.parse_arg's grammar; no further keys).
  dataset: '' (built-in dataset, EfficientNet-Lite0, offline), 'mvtec_ad' (WideResNet50
           layer2+3 as SimpleNet), 'mvtec_ad_lite0' (MVTec AD with the offline Lite0 backbone).
"""

from adjax import configlib

DATASETS = ("", "mvtec_ad", "mvtec_ad_lite0")
VARIANTS = DATASETS


def get_config(arg: str = ""):
  arg = configlib.parse_arg(arg, "patch_knn.py", DATASETS).dataset
  c = configlib.base()
  c.model.name = "patch_knn"
  c.model.memory_size = 16384  # training patches kept in the bank (random subsample, seeded)
  if arg == "":
    configlib.lite0_demo(c)
  elif arg == "mvtec_ad":
    configlib.wrn50_paper(c, "mvtec_ad")
  else:  # mvtec_ad_lite0
    configlib.lite0_real_data(c, "mvtec_ad")
  return c

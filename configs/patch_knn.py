r"""Nearest-neighbour patch distance (adjax's reference scorer; see adjax/methods/patch_knn.py).

Usage:
  python -m adjax.main --config=configs/patch_knn.py --workdir=runs/knn
  python -m adjax.main --config=configs/patch_knn.py:mvtec_ad --config.data.root=/data/mvtec_ad \
      --config.data.category=bottle --workdir=runs/knn_bottle

Variants: '' (built-in dataset, EfficientNet-Lite0, offline), 'mvtec_ad' (WideResNet50
layer2+3 as SimpleNet), 'mvtec_ad_lite0' (MVTec AD with the offline Lite0 backbone).
"""

from adjax import configlib


def get_config(arg: str = ""):
  c = configlib.base()
  c.model.name = "patch_knn"
  c.model.memory_size = 16384  # training patches kept in the bank (random subsample, seeded)
  if arg in ("", "synthetic"):
    configlib.lite0_demo(c)
  elif arg == "mvtec_ad":
    configlib.wrn50_paper(c, "mvtec_ad")
  elif arg == "mvtec_ad_lite0":
    configlib.lite0_real_data(c, "mvtec_ad")
  else:
    raise ValueError(f"unknown variant '{arg}' of configs/patch_knn.py: use '', 'mvtec_ad' or 'mvtec_ad_lite0'")
  return c

r"""SimpleNet (Liu et al., CVPR 2023), the baseline of RSAD and Adapted-MoE.

Usage:
  python -m adjax.main --config=configs/simplenet.py --workdir=runs/simplenet
  python -m adjax.main --config=configs/simplenet.py:mvtec_ad --config.data.root=/data/mvtec_ad \
      --workdir=runs/simplenet_mvtec

Variant: '<dataset>' (configlib.parse_arg's grammar; no further keys).
  dataset: '' (built-in dataset, offline EfficientNet-Lite0, a few minutes on 2 CPU cores),
           'mvtec_ad' (the official protocol: WideResNet50 layer2+3, 1536-d, resize 329 crop
           288, batch 8, 160 epochs), 'mvtec_ad_lite0' (the same protocol, 329 -> 288
           included, on the offline Lite0 backbone), 'visa', 'mpdd'.
"""

from adjax import configlib

DATASETS = ("", "mvtec_ad", "mvtec_ad_lite0", "visa", "mpdd")
VARIANTS = DATASETS  # every variant, for the test that builds them all


def get_config(arg: str = ""):
  arg = configlib.parse_arg(arg, "simplenet.py", DATASETS).dataset
  c = configlib.base()
  m = c.model
  m.name = "simplenet"
  # Values from the official implementation's run script and defaults (the paper gives
  # sigma, the thresholds and the architecture, not the optimiser details).
  m.noise_std = 0.015         # Sec. 3.3, sigma of the Gaussian feature noise
  m.th_pos = 0.5              # Sec. 3.4, truncated-L1 thresholds th+ / th- (dsc_margin 0.5)
  m.th_neg = -0.5
  m.adaptor_layers = 1        # pre_proj=1: one linear layer
  m.adaptor_lr = 1e-4         # lr 1e-3 * 0.1, AdamW
  m.adaptor_weight_decay = 0.01  # torch AdamW default, which the reference does not change
  m.dsc_hidden = (1024,)      # dsc_layers=2, dsc_hidden=1024
  m.dsc_lr = 2e-4
  m.dsc_weight_decay = 1e-5
  c.train.epochs = 160        # meta_epochs 40 x gan_epochs 4
  c.train.batch_size = 8
  c.eval.smoothing_sigma = 4.0  # RescaleSegmentor: bilinear upsampling + Gaussian sigma 4
  if arg == "":
    configlib.lite0_demo(c)
    c.train.epochs = 16       # demo length; the paper protocol is the mvtec_ad variant
  elif arg in ("mvtec_ad", "visa", "mpdd"):
    configlib.wrn50_paper(c, arg)
    configlib.centre_crop(c, 329, 288)  # the official run script's --resize/--imagesize (not 256 -> 224)
  else:  # mvtec_ad_lite0
    configlib.lite0_real_data(c, "mvtec_ad")
    configlib.centre_crop(c, 329, 288)  # as the mvtec_ad variant: only the backbone differs
  configlib.feature_scale(c)  # after the backbone is chosen: 'auto' unless it is the paper's
  return c

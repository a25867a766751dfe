r"""RSAD (Li et al., Pattern Recognition Letters 2025): SimpleNet + Mona feature aligner + focal loss.

Usage:
  python -m adjax.main --config=configs/rsad.py --workdir=runs/rsad
  python -m adjax.main --config=configs/rsad.py:mpdd --config.data.root=/data/mpdd --workdir=runs/rsad_mpdd

Variants: '' (built-in dataset, offline EfficientNet-Lite0), 'mpdd' (the paper's main table),
'mvtec_ad', 'visa' (WideResNet50 layer2+3, 256 -> 224, batch 4, 160 epochs), 'mvtec_ad_lite0';
Table 5 ablation: append '_no_adapter' or '_fc' to any variant (e.g. 'mpdd_fc').
"""

from adjax import configlib


def get_config(arg: str = ""):
  c = configlib.base()
  m = c.model
  m.name = "rsad"
  aligner = "mona"
  for suffix, name in (("_no_adapter", "none"), ("_fc", "fc")):
    if arg.endswith(suffix):
      arg, aligner = arg[: -len(suffix)], name
  if arg in ("no_adapter", "fc"):
    arg, aligner = "", {"no_adapter": "none", "fc": "fc"}[arg]
  m.aligner = aligner          # Table 5: 'mona' (RSAD), 'fc' (bias-free FC layer), 'none'
  m.mona_bottleneck = 64       # Sec. 3.2 down-projection width (Mona's reference value)
  m.mona_dropout = 0.1         # Mona reference implementation
  m.noise_std = 0.015          # Sec. 3.3 sigma (as SimpleNet)
  m.th_pos = 0.5               # eq. 7
  m.th_neg = -0.5
  m.hinge_on_logits = True     # eq. 7 on the pre-sigmoid output (adjax/methods/rsad.py explains why)
  m.dsc_hidden = (1024, 1024)  # three-layer MLP (Sec. 3.4); widths as SimpleNet's discriminator
  m.focal_alpha = 0.25         # torchvision sigmoid_focal_loss defaults (the paper gives none)
  m.focal_gamma = 2.0
  m.focal_on = "locations"     # Algorithm 1's "focal loss_loc" per location; 'image': eq. 8's text (rsad.py explains)
  m.focal_weight = 1.0         # eq. 9: L = L_seg + L_cls (0 switches the focal term off, a diagnostic)
  m.aligner_lr = 1e-4          # Sec. 3.5 / 4: Adam 1e-4 (aligner), 2e-4 (discriminator), wd 1e-5
  m.dsc_lr = 2e-4
  m.weight_decay = 1e-5
  c.train.epochs = 160         # Sec. 4: 160 epochs, batch 4, 256 -> 224
  c.train.batch_size = 4
  c.data.image_size, c.data.crop_size = 256, 224
  if arg in ("", "synthetic"):
    configlib.lite0_demo(c)
    c.train.epochs = 16
  elif arg in ("mpdd", "mvtec_ad", "visa"):
    configlib.wrn50_paper(c, arg)
  elif arg == "mvtec_ad_lite0":
    configlib.lite0_real_data(c, "mvtec_ad")
  else:
    raise ValueError(f"unknown variant '{arg}' of configs/rsad.py: use '', 'mpdd', 'mvtec_ad', 'visa' or "
                     "'mvtec_ad_lite0', optionally with '_no_adapter' or '_fc'")
  return c

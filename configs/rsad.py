r"""RSAD (Li et al., Pattern Recognition Letters 2025): SimpleNet + Mona feature aligner + focal loss.

Usage:
  python -m adjax.main --config=configs/rsad.py --workdir=runs/rsad
  python -m adjax.main --config=configs/rsad.py:mpdd --config.data.root=/data/mpdd --workdir=runs/rsad_mpdd

Variant: '<dataset>[,aligner=<aligner>]' (configlib.parse_arg's grammar), e.g. 'mpdd,aligner=fc'.
  dataset: '' (built-in dataset, offline EfficientNet-Lite0), 'mpdd' (the paper's main table),
           'mvtec_ad', 'visa', 'pcb_bank' (Table 4's three benchmarks: WideResNet50 layer2+3,
           256 -> 224, batch 4, 160 epochs), 'mvtec_ad_lite0'.
  aligner: Table 5's ablation: 'mona' (default, RSAD), 'fc' (bias-free FC layer), 'none'.
"""

from adjax import configlib

DATASETS = ("", "mpdd", "mvtec_ad", "visa", "pcb_bank", "mvtec_ad_lite0")
VARIANTS = DATASETS + ("mpdd,aligner=fc", ",aligner=none")
_OLD_SUFFIXES = {"_no_adapter": "none", "_fc": "fc", "no_adapter": "none", "fc": "fc"}


def _old_form(arg):
  """The retired '<dataset>_fc' / '<dataset>_no_adapter' spelling's new form."""
  suffix = next(s for s in _OLD_SUFFIXES if arg.endswith(s))
  dataset = arg[: -len(suffix)].rstrip("_")
  return f"{dataset},aligner={_OLD_SUFFIXES[suffix]}" if dataset else f"aligner={_OLD_SUFFIXES[suffix]}"


def get_config(arg: str = ""):
  v = configlib.parse_arg(arg, "rsad.py", DATASETS, aligner=("mona", "fc", "none"), old_forms=[
      (lambda a: "=" not in a and any(a.endswith(s) for s in _OLD_SUFFIXES), _old_form)])
  arg = v.dataset
  c = configlib.base()
  m = c.model
  m.name = "rsad"
  m.aligner = v.aligner        # Table 5: 'mona' (RSAD), 'fc' (bias-free FC layer), 'none'
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
  configlib.centre_crop(c, 256, 224)
  c.eval.smoothing_sigma = 4.0  # not in the paper: SimpleNet's Gaussian (sigma 4), the code RSAD builds on [32]
  if arg == "":
    configlib.lite0_demo(c)
    c.train.epochs = 16
  elif arg in ("mpdd", "mvtec_ad", "visa", "pcb_bank"):
    configlib.wrn50_paper(c, arg)
  else:  # mvtec_ad_lite0
    configlib.lite0_real_data(c, "mvtec_ad")
  configlib.feature_scale(c)  # after the backbone is chosen: 'auto' unless it is the paper's
  return c

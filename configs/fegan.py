r"""FEGAN (Fan, Zhang, Dai; IEEE Access): frozen feature extraction network + adversarially trained
average-pooling encoder-decoder on M-SE-augmented images; combined feature/image anomaly score.

Usage:
  python -m adjax.main --config=configs/fegan.py --workdir=runs/fegan
  python -m adjax.main --config=configs/fegan.py:mvtec_ad_lite0 --config.data.root=../shared/data/mvtec_ad \
      --config.data.category=bottle --workdir=runs/fegan_bottle

Variant: '<dataset>[,area=<percent>][,augment=<kind>][,row=<row>]' (configlib.parse_arg's grammar).
  dataset: '' (built-in dataset, offline EfficientNet-Lite0 FEN, a quarter-width generator at
           64x64: a few minutes on 2 CPU cores), 'mvtec_ad' (the paper's protocol: VGG19 FEN
           'stage5', full-width encoder from VGG19's ImageNet weights, 256x256, batch 16, 200
           epochs), 'mvtec_ad_lite0' (offline real weights: EfficientNet-Lite0 'stage5' as
           the FEN at 1/16, a from-scratch quarter-width encoder projected to its 112 channels,
           256x256, sized to train bottle in under an hour on 2 CPU cores).
  area:    Table 5: M-SE's total area in percent of the image (1, 5, 10, 20 (default), 30, 50, 70, 100).
  augment: Table 6: 'mse' (default), 'cutout', 'cutout_colour', 'riad', 'scadn'.
  row:     Table 7: 'con' (generator, L_con only), 'con_mse' (+ M-SE), 'con_mse_adv' (+ the
           discriminator), 'con_mse_fea' (+ the FEN, no discriminator), 'full' (default: all).
"""

from adjax import configlib

DATASETS = ("", "mvtec_ad", "mvtec_ad_lite0")
AREAS = (1, 5, 10, 20, 30, 50, 70, 100)
AUGMENTS = ("mse", "cutout", "cutout_colour", "riad", "scadn")
ROWS = {  # Table 7: (M-SE, discriminator and L_adv, FEN and L_fea)
    "con": (False, False, False), "con_mse": (True, False, False), "con_mse_adv": (True, True, False),
    "con_mse_fea": (True, False, True), "full": (True, True, True),
}
VARIANTS = DATASETS + tuple(f"area={a}" for a in AREAS) + tuple(f"augment={k}" for k in AUGMENTS) + tuple(
    f"row={r}" for r in ROWS)


def get_config(arg: str = ""):
  rows = ("full",) + tuple(r for r in ROWS if r != "full")  # the first is the default
  v = configlib.parse_arg(arg, "fegan.py", DATASETS, area=20, augment=AUGMENTS, row=rows)
  if v.area not in AREAS:
    raise configlib.ConfigError(f"configs/fegan.py: area must be one of Table 5's {AREAS} (percent), not {v.area}.")
  c = configlib.base()
  m = c.model
  m.name = "fegan"
  # FEN (Sec. III-B): VGG19's fifth convolution block, after its last ReLU, at 1/16 of the input.
  m.backbone, m.backbone_weights, m.layers = "vgg19", "imagenet", ("stage5",)
  m.encoder_init = "vgg19"     # the generator's encoder starts from VGG19's ImageNet weights (see fegan.py)
  m.width = 1.0                # channel multiplier of the generator and discriminator (1 = VGG19's widths)
  m.use_mse, m.use_discriminator, m.use_fen = ROWS[v.row]
  m.augment = v.augment        # Table 6
  m.augment_area = v.area / 100.0   # Sec. III-D: the patches' total area, 20% of the image (Table 5)
  m.max_patch_area = 0.01      # Sec. III-D: a single patch covers at most 1% of the image
  m.lambda_fea, m.lambda_con, m.lambda_adv = 30.0, 30.0, 1.0  # Sec. IV-C, eq. 5
  m.score_lambda = 0.6         # eq. 8's lambda (Sec. IV-C, Fig. 10)
  m.score_scale = "image_max"  # F and R each divided by its mean training-image maximum before eq. 8 (see fegan.py)
  m.lr, m.weight_decay = 2e-4, 1e-5  # Sec. IV-C: Adam
  m.adam_b1, m.adam_b2, m.adam_eps = 0.9, 0.999, 1e-8  # not given in the paper: torch Adam's defaults
  c.data.name, c.data.category = "mvtec_ad", "all"
  configlib.whole_image(c, 256)  # Sec. IV-C: scaled to 256x256 RGB
  c.train.epochs, c.train.batch_size = 200, 16
  c.eval.smoothing_sigma = 0.0  # the paper smooths no map
  configlib.paper_data(c)  # the MVTec variants train on every image (the default variant overrides)
  if v.dataset in ("", "mvtec_ad_lite0"):
    m.backbone, m.layers = "efficientnet_lite0", ("stage5",)  # stride 16, 112 channels
    m.encoder_init, m.width = "scratch", 0.25
  if v.dataset == "":
    c.data.name, c.data.category = "synthetic", "cloth,wood,metal"
    c.data.threshold_fraction = 0.1
    configlib.whole_image(c, 64)
    c.train.epochs = 10        # demo length
  elif v.dataset == "mvtec_ad_lite0":
    c.train.epochs = 90        # as many as fit an hour on 2 idle CPU cores for bottle (the paper: 200)
  return c

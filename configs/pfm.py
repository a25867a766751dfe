r"""PFM / B-PFM / MB-PFM: pre-trained feature mapping between two frozen backbones.

Usage:
  python -m adjax.main --config=configs/pfm.py --workdir=runs/pfm
  python -m adjax.main --config=configs/pfm.py:lite0_lite2 --config.data.root=../shared/data/mvtec_ad \
      --config.data.category=bottle --workdir=runs/pfm_bottle

Variant: '<pair>[+<model>][+random]'.
  pair:  '' (built-in dataset, Lite0 -> Lite2, offline), 'lite0_lite2' (MVTec AD with the offline
         EfficientNet-Lite pair), 'r34_r50' (the paper's best, MVTec AD), 'r18_r34', 'r18_r50', 'vgg16_vgg19'.
  model: 'mbpfm' (default: bidirectional, three hierarchies), 'bpfm' (bidirectional, the middle
         hierarchy), 'pfm' (one direction, the middle hierarchy); with the suffix '_h<k>' for
         another single hierarchy (e.g. 'bpfm_h0'). '+random' initialises both backbones randomly.
  These reproduce the ablation cases of Table VII.
"""

from adjax import configlib

# (source, target, source taps, target taps, latent c per hierarchy from Table II)
PAIRS = {
    # ResNets: conv2_x, conv3_x, conv4_x = layer1..layer3. Table II's extracted cells are partly
    # illegible; the values below are its readable entries, completed consistently.
    "r34_r50": ("resnet34", "resnet50", ("layer1", "layer2", "layer3"), ("layer1", "layer2", "layer3"), (200, 400, 900)),
    "r18_r34": ("resnet18", "resnet34", ("layer1", "layer2", "layer3"), ("layer1", "layer2", "layer3"), (50, 100, 200)),
    "r18_r50": ("resnet18", "resnet50", ("layer1", "layer2", "layer3"), ("layer1", "layer2", "layer3"), (20, 400, 900)),
    # VGG: the last three down-sampling stages.
    "vgg16_vgg19": ("vgg16", "vgg19", ("pool2", "pool3", "pool4"), ("pool2", "pool3", "pool4"), (400, 400, 400)),
    # EfficientNet-Lite: block stages at strides 4 / 8 / 16 (24/40/112 -> 24/48/120 channels);
    # latent widths chosen in proportion to the channel counts (not in the paper).
    "lite0_lite2": ("efficientnet_lite0", "efficientnet_lite2", ("stage2", "stage3", "stage5"),
                    ("stage2", "stage3", "stage5"), (32, 64, 128)),
}


def get_config(arg: str = ""):
  parts = arg.split("+")
  pair_name, options = parts[0], parts[1:]
  random = "random" in options
  options = [o for o in options if o != "random"]
  model = options[0] if options else "mbpfm"
  c = configlib.base()
  m = c.model
  m.name = "pfm"
  dataset = "synthetic" if pair_name == "" else "mvtec_ad"
  source, target, source_layers, target_layers, latent = PAIRS[pair_name or "lite0_lite2"]
  m.source_backbone, m.backbone = source, target
  m.source_layers, m.layers = source_layers, target_layers
  m.source_weights = ""       # '' = the same as model.backbone_weights
  m.backbone_weights = "random" if random else "imagenet"
  m.latent = latent           # Table II: latent width c per hierarchy
  kind, _, hierarchy = model.partition("_h")
  if kind not in ("mbpfm", "bpfm", "pfm"):
    raise ValueError(f"unknown model '{model}' in configs/pfm.py: use mbpfm, bpfm or pfm (optionally _h0/_h1/_h2)")
  m.bidirectional = kind != "pfm"
  m.hierarchies = (0, 1, 2) if kind == "mbpfm" and not hierarchy else (int(hierarchy or 1),)
  m.lr = 3e-4                 # Sec. IV-A: Adam, lr 0.0003, batch 8, weight decay 1e-5, 200 epochs, 256x256
  m.weight_decay = 1e-5
  c.train.epochs = 200
  c.train.batch_size = 8
  c.data.name, c.data.category = dataset, "all" if dataset == "mvtec_ad" else c.data.category
  c.data.image_size = c.data.crop_size = 256  # resized to 256x256, no crop
  c.eval.smoothing_sigma = 0.0
  if dataset == "synthetic":
    c.data.image_size = c.data.crop_size = 128
    c.train.epochs = 20       # demo length
  if pair_name not in PAIRS and pair_name != "":
    raise ValueError(f"unknown pair '{pair_name}' in configs/pfm.py: use '', {', '.join(PAIRS)}")
  return c

r"""PFM / B-PFM / MB-PFM: pre-trained feature mapping between two frozen backbones.

Usage:
  python -m adjax.main --config=configs/pfm.py --workdir=runs/pfm
  python -m adjax.main --config=configs/pfm.py:lite0_lite2 --config.data.root=../shared/data/mvtec_ad \
      --config.data.category=bottle --workdir=runs/pfm_bottle

Variant: '<pair>[,model=<model>][,hierarchy=<k>][,random=true]' (configlib.parse_arg's grammar),
e.g. 'r34_r50,model=bpfm,hierarchy=0'.
  pair:      '' (built-in dataset, Lite0 -> Lite2, offline), 'lite0_lite2' (MVTec AD with the
             offline EfficientNet-Lite pair), 'r34_r50' (the paper's best, MVTec AD), 'r18_r34',
             'r18_r50', 'vgg16_vgg19'.
  model:     'mbpfm' (default: bidirectional, all three hierarchies), 'bpfm' (bidirectional,
             one hierarchy), 'pfm' (one direction, one hierarchy).
  hierarchy: the single hierarchy of 'bpfm' / 'pfm' (0, 1 or 2; default 1, the middle one).
  random:    initialise both backbones randomly.
  These reproduce the ablation cases of Table VII.
"""

from adjax import configlib

# (source, target, source taps, target taps, latent c per hierarchy from Table II)
PAIRS = {
    # ResNets: conv2_x, conv3_x, conv4_x = layer1..layer3. Table II's extracted cells are partly
    # illegible; the values below are its readable entries, completed consistently.
    "r34_r50": ("resnet34", "resnet50", ("layer1", "layer2", "layer3"), ("layer1", "layer2", "layer3"),
                (200, 400, 900)),
    "r18_r34": ("resnet18", "resnet34", ("layer1", "layer2", "layer3"), ("layer1", "layer2", "layer3"), (50, 100, 200)),
    "r18_r50": ("resnet18", "resnet50", ("layer1", "layer2", "layer3"), ("layer1", "layer2", "layer3"), (20, 400, 900)),
    # VGG: the last three down-sampling stages.
    "vgg16_vgg19": ("vgg16", "vgg19", ("pool2", "pool3", "pool4"), ("pool2", "pool3", "pool4"), (400, 400, 400)),
    # EfficientNet-Lite: block stages at strides 4 / 8 / 16 (24/40/112 -> 24/48/120 channels);
    # latent widths chosen in proportion to the channel counts (not in the paper).
    "lite0_lite2": ("efficientnet_lite0", "efficientnet_lite2", ("stage2", "stage3", "stage5"),
                    ("stage2", "stage3", "stage5"), (32, 64, 128)),
}


VARIANTS = ("", "lite0_lite2", "r34_r50", "r18_r34", "r18_r50", "vgg16_vgg19", "lite0_lite2,model=bpfm",
            "lite0_lite2,model=pfm,hierarchy=0", "r34_r50,random=true")


def _old_form(arg):
  """The retired '<pair>+<model>[_h<k>][+random]' spelling's new form."""
  pair, *options = arg.split("+")
  fields = [pair]
  for option in options:
    if option == "random":
      fields.append("random=true")
    else:
      kind, _, hierarchy = option.partition("_h")
      fields.append(f"model={kind}" + (f",hierarchy={hierarchy}" if hierarchy else ""))
  return ",".join(fields)


def get_config(arg: str = ""):
  v = configlib.parse_arg(arg, "pfm.py", ("",) + tuple(PAIRS), model=("mbpfm", "bpfm", "pfm"), hierarchy=1,
                          random=False, old_forms=[(lambda a: "+" in a, _old_form)])
  pair_name, random = v.dataset, v.random
  if v.model == "mbpfm" and "hierarchy=" in arg:
    raise configlib.ConfigError("configs/pfm.py: hierarchy= picks the single hierarchy of model=bpfm or model=pfm; "
                                "MB-PFM (the default model) uses all three.")
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
  m.bidirectional = v.model != "pfm"
  m.hierarchies = (0, 1, 2) if v.model == "mbpfm" else (v.hierarchy,)
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
  return c

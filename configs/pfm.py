r"""PFM / B-PFM / MB-PFM: pre-trained feature mapping between two frozen backbones.

Usage:
  python -m adjax.main --config=configs/pfm.py --workdir=runs/pfm
  python -m adjax.main --config=configs/pfm.py:lite0_lite2 --config.data.root=../shared/data/mvtec_ad \
      --config.data.category=bottle --workdir=runs/pfm_bottle

Variant: '<pair>[,model=<model>][,hierarchy=<k>][,hierarchies=<ks>][,random=true]'
(configlib.parse_arg's grammar), e.g. 'r34_r50,model=bpfm,hierarchy=0'.
  pair:      '' (built-in dataset, Lite0 -> Lite2, offline), 'lite0_lite2' (MVTec AD with the
             offline EfficientNet-Lite pair), 'r34_r50' (the paper's best, MVTec AD), 'r18_r34',
             'r18_r50', 'vgg16_vgg19'.
  model:     'mbpfm' (default: bidirectional, all three hierarchies), 'bpfm' (bidirectional,
             one hierarchy), 'pfm' (one direction, one hierarchy).
  hierarchy: the single hierarchy of 'bpfm' / 'pfm' (0, 1 or 2; default 2, the third: Table VII's
             cases 1-2 map "the third hierarchical feature only").
  hierarchies: MB-PFM over a subset of the hierarchies, as digits (e.g. '12'); default all three.
  random:    initialise both backbones randomly.
Table VII's cases (ResNet18 -> ResNet34 unless named):
  1 'r18_r34,model=pfm'                     7 'r18_r34,hierarchies=<ij>' (cases 5-7: the three pairs of
  2 'r18_r34,model=bpfm'                       hierarchies, '01', '02', '12'; which case is which pair
  3 'r18_r34,model=bpfm,hierarchy=1'           is illegible in the table)
  4 'r18_r34,model=bpfm,hierarchy=0'        8 'r18_r34'           9 'r18_r34,random=true'
  10 'r18_r50'    11 'r34_r50'    12 'vgg16_vgg19'
(cases 3 and 4: "the performance increases as the hierarchy goes deeper", case 2 > 3 > 4.)
"""

from adjax import configlib

# (source, target, source taps, target taps, latent c per hierarchy from Table II)
PAIRS = {
    # ResNets: conv2_x, conv3_x, conv4_x = layer1..layer3. Table II's extracted cells are partly
    # illegible; the values below are its readable entries, completed consistently.
    "r34_r50": ("resnet34", "resnet50", ("layer1", "layer2", "layer3"), ("layer1", "layer2", "layer3"),
                (200, 400, 900)),
    "r18_r34": ("resnet18", "resnet34", ("layer1", "layer2", "layer3"), ("layer1", "layer2", "layer3"), (50, 100, 200)),
    # R18-50's extracted cells read '20' and '90': ResNet18 has ResNet34's widths (64/128/256), so
    # R18-50 is taken to have R34-50's latents, the cells truncated from 200 and 900.
    "r18_r50": ("resnet18", "resnet50", ("layer1", "layer2", "layer3"), ("layer1", "layer2", "layer3"),
                (200, 400, 900)),
    # VGG (Sec. IV-A): "the last three downsampling layers", pool3-pool5 (strides 8, 16, 32).
    "vgg16_vgg19": ("vgg16", "vgg19", ("pool3", "pool4", "pool5"), ("pool3", "pool4", "pool5"), (400, 400, 400)),
    # EfficientNet-Lite: block stages at strides 4 / 8 / 16 (24/40/112 -> 24/48/120 channels);
    # latent widths chosen in proportion to the channel counts (not in the paper).
    "lite0_lite2": ("efficientnet_lite0", "efficientnet_lite2", ("stage2", "stage3", "stage5"),
                    ("stage2", "stage3", "stage5"), (32, 64, 128)),
}


TABLE_VII = {1: "r18_r34,model=pfm", 2: "r18_r34,model=bpfm", 3: "r18_r34,model=bpfm,hierarchy=1",
             4: "r18_r34,model=bpfm,hierarchy=0", "5-7": ("r18_r34,hierarchies=01", "r18_r34,hierarchies=02",
                                                        "r18_r34,hierarchies=12"),
             8: "r18_r34", 9: "r18_r34,random=true", 10: "r18_r50", 11: "r34_r50", 12: "vgg16_vgg19"}
VARIANTS = ("", "lite0_lite2", "r34_r50", "r18_r34", "r18_r50", "vgg16_vgg19", "lite0_lite2,model=bpfm",
            "lite0_lite2,model=pfm,hierarchy=0", "r34_r50,random=true") + tuple(
    v for case in TABLE_VII.values() for v in ((case,) if isinstance(case, str) else case))


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
  v = configlib.parse_arg(arg, "pfm.py", ("",) + tuple(PAIRS), model=("mbpfm", "bpfm", "pfm"), hierarchy=2,
                          hierarchies="012", random=False, old_forms=[(lambda a: "+" in a, _old_form)])
  pair_name, random = v.dataset, v.random
  if v.model == "mbpfm" and "hierarchy=" in arg:
    raise configlib.ConfigError("configs/pfm.py: hierarchy= picks the single hierarchy of model=bpfm or model=pfm; "
                                "MB-PFM (the default model) fuses several: use hierarchies=<digits>.")
  levels = tuple(sorted({int(d) for d in v.hierarchies})) if set(v.hierarchies) <= set("012") else ()
  if v.model != "mbpfm" and "hierarchies=" in arg or len(levels) < 2 or len(levels) != len(v.hierarchies):
    raise configlib.ConfigError(f"configs/pfm.py: hierarchies='{v.hierarchies}' must name two or three of the "
                                "hierarchies 0, 1, 2 once each (e.g. hierarchies=12), with model=mbpfm.")
  if v.hierarchy not in (0, 1, 2):
    raise configlib.ConfigError(f"configs/pfm.py: hierarchy must be 0, 1 or 2, not {v.hierarchy}.")
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
  m.hierarchies = levels if v.model == "mbpfm" else (v.hierarchy,)
  m.lr = 3e-4                 # Sec. IV-A: Adam, lr 0.0003, batch 8, weight decay 1e-5, 200 epochs, 256x256
  m.weight_decay = 1e-5
  c.train.epochs = 200
  c.train.batch_size = 8
  c.data.name, c.data.category = dataset, "all" if dataset == "mvtec_ad" else c.data.category
  configlib.whole_image(c, 256)  # Sec. IV-A: resized to 256x256, no crop
  c.eval.smoothing_sigma = 0.0
  if dataset == "synthetic":
    configlib.whole_image(c, 128)
    c.train.epochs = 20       # demo length
  else:
    configlib.paper_data(c)
  return c

r"""Adapted-MoE (Lei et al., 2024): routing network, one SimpleNet expert per subclass, test-time adaptation.

Usage (the README's main command):
  python -m adjax.main --config=configs/adapted_moe.py --workdir=runs/demo
  python -m adjax.main --config=configs/adapted_moe.py:texture_ad_cloth --config.data.root=/data/texture_ad \
      --workdir=runs/moe_cloth

Variant: '<dataset>[,row=<row>]' (configlib.parse_arg's grammar), e.g. 'texture_ad_cloth,row=tta_norm'.
  dataset: '' (built-in synthetic textures, offline EfficientNet-Lite0, a few minutes on 2 CPU
           cores), 'texture_ad_cloth', 'texture_ad_wafer', 'texture_ad_metal' (the paper's
           protocol: WideResNet50 layer2+3, 160 epochs, batch 8, lr 1e-4..2e-4, sigma 0.015).
  row:     Table 2's ablation: 'baseline' (SimpleNet), 'moe', 'tta', 'moe_norm', 'tta_norm',
           'moe_tta', 'all' (default), plus 'norm'. E.g. configs/adapted_moe.py:row=tta_norm.
"""

from adjax import configlib

ROWS = {  # Table 2: (+MoE, +TTA, +Norm)
    "baseline": (False, False, False), "moe": (True, False, False), "tta": (False, True, False),
    "norm": (False, False, True),  # not a row of Table 2; completes the single-switch rows
    "moe_norm": (True, False, True), "tta_norm": (False, True, True), "moe_tta": (True, True, False),
    "all": (True, True, True),
}


DATASETS = ("", "texture_ad_cloth", "texture_ad_wafer", "texture_ad_metal")
VARIANTS = DATASETS + tuple(f"row={row}" for row in ROWS)


def _old_form(arg):
  """The retired '<dataset>+<row>' spelling's new form."""
  dataset, _, row = arg.partition("+")
  return f"{dataset},row={row}" if dataset else f"row={row}"


def get_config(arg: str = ""):
  v = configlib.parse_arg(arg, "adapted_moe.py", DATASETS, row=("all",) + tuple(r for r in ROWS if r != "all"),
                          old_forms=[(lambda a: "+" in a, _old_form)])
  dataset, row = v.dataset, v.row
  c = configlib.base()
  m = c.model
  m.name = "adapted_moe"
  m.moe, m.tta, m.norm = ROWS[row]
  # Routing network (Sec. 2.1).
  m.routing_loss = "center"   # 'center' (eq. 2) or 'softmax' (Table 3)
  m.center_alpha = 0.1        # alpha of eq. 2 (the reference code's center-loss weight)
  m.center_lr = 0.5           # center update rate (Wen et al. 2016)
  m.routing_width = 0         # conv3x3 output channels of eq. 1; 0 = the feature width C
  m.routing_lr = 2e-4         # the reference's moe_lr
  m.top_k = 1                 # experts per image (the reference's topK; Fig. 6 finds 4 best on cloth)
  m.subclass_source = "dataset"  # 'dataset' (record subclasses) or 'kmeans'
  m.num_experts = 0           # clusters for subclass_source='kmeans'
  # Experts = SimpleNet (Sec. 3.2: SimpleNet is the baseline; sigma 0.015, lr 1e-4..2e-4).
  m.noise_std = 0.015
  m.th_pos, m.th_neg = 0.5, -0.5
  m.adaptor_layers = 1
  m.adaptor_lr = 1e-4
  m.adaptor_weight_decay = 0.01
  m.dsc_hidden = (1024,)
  m.dsc_lr = 2e-4
  m.dsc_weight_decay = 1e-5
  c.train.epochs = 160        # Sec. 3.2: 160 epochs, batch 8
  c.train.batch_size = 8
  if dataset == "":
    configlib.lite0_demo(c)
    # Sized for a few minutes on 2 CPU cores, not for the paper's accuracy.
    configlib.whole_image(c, 128)
    m.pretrain_embed_dim = m.target_embed_dim = 256
    m.dsc_hidden = (512,)     # the reference's MVTec config uses 512
    m.routing_width = 64
    c.train.epochs = 16
  else:  # texture_ad_<category>
    configlib.wrn50_paper(c, "texture_ad")
    c.data.category = dataset.removeprefix("texture_ad_")
  configlib.feature_scale(c)  # after the backbone is chosen: 'auto' unless it is the paper's
  return c

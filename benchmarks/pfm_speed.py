r"""MB-PFM inference speed (ResNet34 -> ResNet50, 256x256): adjax vs the same model in plain PyTorch.

  python benchmarks/pfm_speed.py [--batch 8] [--repeats 5] [--pair r34_r50]

Both sides: the two frozen backbones to layer3, per-position L2 normalisation, the
bidirectional mapping networks of three hierarchies (Table I widths, Table II latents),
the per-hierarchy maps (eq. 14), bilinear resizing to 256x256 and their mean (eq. 15), the
image score (eq. 9). Random weights (timing does not depend on them). Prints images/s and
ms per batch for each and their ratio. The paper reports 14.5 fps on a GTX 1660.
"""

import argparse
import os
import sys

import jax
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from timing import measure, row  # noqa: E402

from adjax import configlib  # noqa: E402
from adjax.methods import pfm  # noqa: E402
from configs import pfm as pfm_config  # noqa: E402


def torch_mapping(cs, ct, c, bidirectional=True):
  block = lambda i, o: torch.nn.Sequential(torch.nn.Conv2d(i, o, 1), torch.nn.BatchNorm2d(o), torch.nn.ReLU())
  smu = block(2 * c, c)
  forward = torch.nn.Sequential(block(cs, cs // 2 + c), block(cs // 2 + c, 2 * c), smu, block(c, 2 * c),
                                block(2 * c, ct // 2 + c), torch.nn.Conv2d(ct // 2 + c, ct, 1))
  reverse = torch.nn.Sequential(block(ct, ct // 2 + c), block(ct // 2 + c, 2 * c), smu, block(c, 2 * c),
                                block(2 * c, cs // 2 + c), torch.nn.Conv2d(cs // 2 + c, cs, 1))
  return forward.eval(), reverse.eval()


def torch_taps(model, x):
  x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  l1 = model.layer1(x)
  l2 = model.layer2(l1)
  return [l1, l2, model.layer3(l2)]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--pair", default="r34_r50")
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  config = pfm_config.get_config(args.pair)
  config.model.backbone_weights = "random"
  size = configlib.input_size(config)
  method = pfm.PFM(config)
  feature_fn = method.make_extractor()
  x = np.random.default_rng(0).normal(size=(args.batch, size, size, 3)).astype(np.float32)
  sample = jax.tree.map(np.asarray, feature_fn(x[:1]))
  state = method.init({"features": sample}, jax.random.key(0))

  @jax.jit
  def adjax_infer(state, variables, images):  # weights as arguments, as evaluate.make_scorer passes them
    return method.score(state, {"features": feature_fn.fn(variables, images)}, (size, size))

  xj = jax.device_put(x)
  adjax_s = measure(lambda: adjax_infer(state, feature_fn.variables, xj), repeats=args.repeats,
                    sync=jax.block_until_ready)

  src_name, tgt_name = config.model.source_backbone, config.model.backbone
  source = getattr(torchvision.models, src_name)(weights=None).eval()
  target = getattr(torchvision.models, tgt_name)(weights=None).eval()
  mappers = [torch_mapping(s.shape[-1], t.shape[-1], c) for s, t, c in
             zip(sample["source"], sample["target"], config.model.latent)]
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  def torch_infer():
    with torch.inference_mode():
      maps = []
      for fs, ft, (fwd, rev) in zip(torch_taps(source, xt), torch_taps(target, xt), mappers):
        fs, ft = F.normalize(fs, dim=1), F.normalize(ft, dim=1)
        a = ((F.normalize(fwd(fs), dim=1) - ft) ** 2).sum(1) + ((F.normalize(rev(ft), dim=1) - fs) ** 2).sum(1)
        maps.append(F.interpolate((0.5 * a)[:, None], size=(size, size), mode="bilinear", align_corners=False))
      fused = torch.stack(maps).mean(0)
      return fused.amax(dim=(1, 2, 3)), fused

  torch_s = measure(torch_infer, repeats=args.repeats)
  print(f"MB-PFM {src_name} -> {tgt_name}, {size}x{size}, batch {args.batch}; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(row("torch eager (inference_mode)", args.batch, torch_s))
  print(row("adjax (jit)", args.batch, adjax_s, torch_s))


if __name__ == "__main__":
  main()

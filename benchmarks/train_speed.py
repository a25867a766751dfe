r"""SimpleNet training and inference speed: adjax vs a plain PyTorch loop, same shapes, same run.

  python benchmarks/train_speed.py [--resize 329 --crop 288] [--measure-epochs 1] [--protocol-epochs 160]

The official protocol on MVTec AD bottle: 209 training images, WideResNet50 layer2+3
(random weights: timing does not depend on them), 1536-d patch features, batch 8, 160
epochs. PyTorch, as the reference code does, recomputes the frozen backbone every epoch;
adjax computes it once (train.cache_features) and trains the head from the cache. Both
start from the same decoded, resized images in memory (decoding is excluded, which
favours the PyTorch loop whose reference re-decodes every epoch).

Each side is timed for --measure-epochs epochs after a warm-up step and extrapolated
linearly to --protocol-epochs (the cost per epoch is constant), plus adjax's one-off
feature pass and compilation. Prints images/s, wall times and the ratio. Also times
inference (features -> scores -> upsampled, smoothed map) for one batch.
"""

import argparse
import os
import sys
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))
import simplenet as simplenet_config  # noqa: E402

from adjax import evaluate, train  # noqa: E402
from adjax.backbones.patch_features import make_feature_fn  # noqa: E402
from adjax.data import datasets, transforms  # noqa: E402
from adjax.methods import simplenet  # noqa: E402


# ---- the plain PyTorch SimpleNet (official architecture and optimisers) ----

class TorchSimpleNet(torch.nn.Module):
  def __init__(self, dim=1536, hidden=1024):
    super().__init__()
    self.backbone = torchvision.models.wide_resnet50_2(weights=None).eval()
    self.adaptor = torch.nn.Linear(dim, dim)
    self.discriminator = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.BatchNorm1d(hidden),
                                             torch.nn.LeakyReLU(0.2), torch.nn.Linear(hidden, 1, bias=False))
    self.dim = dim

  @torch.no_grad()
  def features(self, x):
    b = self.backbone
    x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
    l2 = b.layer2(b.layer1(x))
    maps = [l2, b.layer3(l2)]
    unfold = torch.nn.Unfold(3, padding=1)
    h, w = maps[0].shape[-2:]
    pooled = []
    for m in maps:
      n, c = m.shape[:2]
      patches = unfold(m).reshape(n, c * 9, *m.shape[-2:])
      patches = F.interpolate(patches, size=(h, w), mode="bilinear", align_corners=False)
      patches = patches.permute(0, 2, 3, 1).reshape(-1, 1, c * 9)
      pooled.append(F.adaptive_avg_pool1d(patches, self.dim))
    stacked = torch.cat(pooled, dim=-1)
    return F.adaptive_avg_pool1d(stacked, self.dim).reshape(-1, self.dim), (h, w)


def torch_epoch(model, images, batch, proj_opt, dsc_opt, noise_std=0.015, th=0.5):
  order = torch.randperm(len(images))
  model.discriminator.train()
  for start in range(0, len(images), batch):
    feats, _ = model.features(images[order[start:start + batch]])
    proj_opt.zero_grad()
    dsc_opt.zero_grad()
    true = model.adaptor(feats)
    fake = true + torch.randn_like(true) * noise_std
    scores = model.discriminator(torch.cat([true, fake]))
    t, f = scores[:len(true)], scores[len(true):]
    loss = torch.clip(-t + th, min=0).mean() + torch.clip(f + th, min=0).mean()
    loss.backward()
    proj_opt.step()
    dsc_opt.step()


@torch.no_grad()
def torch_infer(model, images, crop):
  model.discriminator.eval()
  feats, (h, w) = model.features(images)
  scores = -model.discriminator(model.adaptor(feats)).reshape(len(images), 1, h, w)
  up = F.interpolate(scores, size=(crop, crop), mode="bilinear", align_corners=False)
  return torchvision.transforms.functional.gaussian_blur(up, kernel_size=33, sigma=4.0)


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  parser = argparse.ArgumentParser()
  parser.add_argument("--root", default=os.path.join(here, "..", "..", "shared", "data", "mvtec_ad"))
  parser.add_argument("--resize", type=int, default=329)
  parser.add_argument("--crop", type=int, default=288)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--images", type=int, default=0, help="use only the first N training images (0: all)")
  parser.add_argument("--measure-epochs", type=int, default=1)
  parser.add_argument("--protocol-epochs", type=int, default=160)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  records = datasets.read_split("mvtec_ad", args.root, "bottle").train
  records = records[: args.images] if args.images else records
  config = simplenet_config.get_config("mvtec_ad")
  config.model.backbone_weights = "random"
  config.data.image_size, config.data.crop_size = args.resize, args.crop
  config.train.batch_size = args.batch
  feature_fn = make_feature_fn(config.model)
  images = np.stack([transforms.preprocess_image(transforms.load_image(r.path), args.resize, args.crop,
                                                 feature_fn.spec.mean, feature_fn.spec.std) for r in records])
  n, steps = len(images), -(-len(images) // args.batch)
  print(f"{n} images {args.crop}x{args.crop}, batch {args.batch}, {steps} steps/epoch; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} ({torch.get_num_threads()} threads)")

  # adjax: one feature pass (the cache), then epochs of the jitted step on cached features.
  start = time.perf_counter()
  cached = np.concatenate([np.asarray(feature_fn(images[i:i + args.batch])) for i in range(0, n, args.batch)])
  feature_pass = time.perf_counter() - start
  state = simplenet.init(config, cached[:1], jax.random.key(0))
  step = jax.jit(lambda s, b, k: simplenet.train_step(config, s, b, k), donate_argnums=0)
  cached = jax.device_put(cached)
  start = time.perf_counter()
  state, _ = step(state, {"features": cached[: args.batch]}, jax.random.key(1))
  jax.block_until_ready(state)
  compile_and_first = time.perf_counter() - start
  start = time.perf_counter()
  for epoch in range(args.measure_epochs):
    order = train.epoch_order(0, epoch, n)
    for i in range(0, n, args.batch):
      state, _ = step(state, {"features": cached[order[i:i + args.batch]]}, jax.random.key(epoch * 1000 + i))
  jax.block_until_ready(state)
  adjax_epoch = (time.perf_counter() - start) / args.measure_epochs
  adjax_total = feature_pass + compile_and_first + args.protocol_epochs * adjax_epoch

  model = TorchSimpleNet()
  proj_opt = torch.optim.AdamW(model.adaptor.parameters(), 1e-4)
  dsc_opt = torch.optim.Adam(model.discriminator.parameters(), 2e-4, weight_decay=1e-5)
  timages = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  torch_epoch(model, timages[: args.batch], args.batch, proj_opt, dsc_opt)  # warm-up
  start = time.perf_counter()
  for _ in range(args.measure_epochs):
    torch_epoch(model, timages, args.batch, proj_opt, dsc_opt)
  torch_epoch_s = (time.perf_counter() - start) / args.measure_epochs
  torch_total = args.protocol_epochs * torch_epoch_s

  print(f"adjax: feature pass {feature_pass:.1f} s ({n / feature_pass:.1f} img/s), compile+first step "
        f"{compile_and_first:.1f} s, {adjax_epoch:.1f} s/epoch ({n / adjax_epoch:.1f} img/s)")
  print(f"torch: {torch_epoch_s:.1f} s/epoch ({n / torch_epoch_s:.1f} img/s), backbone recomputed each epoch")
  print(f"{args.protocol_epochs}-epoch protocol (measured {args.measure_epochs} epoch(s), extrapolated): "
        f"adjax {adjax_total / 60:.1f} min, torch {torch_total / 60:.1f} min, ratio {torch_total / adjax_total:.2f}x")

  # Inference: one batch, features -> scores -> upsampled + smoothed maps.
  @jax.jit
  def adjax_infer(state, x):
    image_scores, patch_maps = simplenet.score(config, state, feature_fn(x))
    return image_scores, evaluate.anomaly_maps(patch_maps, args.crop, 4.0)
  xb = jax.device_put(images[: args.batch])
  jax.block_until_ready(adjax_infer(state, xb))
  start = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(adjax_infer(state, xb))
  adjax_inf = (time.perf_counter() - start) / 3
  torch_infer(model, timages[: args.batch], args.crop)
  start = time.perf_counter()
  for _ in range(3):
    torch_infer(model, timages[: args.batch], args.crop)
  torch_inf = (time.perf_counter() - start) / 3
  print(f"inference, batch {args.batch}: adjax {args.batch / adjax_inf:.1f} img/s ({adjax_inf * 1000:.0f} ms), "
        f"torch {args.batch / torch_inf:.1f} img/s ({torch_inf * 1000:.0f} ms), ratio {torch_inf / adjax_inf:.2f}x")


if __name__ == "__main__":
  main()

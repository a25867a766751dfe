r"""Triplet network speed: adjax's jitted training step and scorer against the same network,
patch sampling, random erasing and loss in plain PyTorch, same machine, same shapes.

  python benchmarks/triplet_speed.py [--variant mvtec_ad] [--batch 16] [--size 1024] [--steps 3]
      [--warmup 1] [--score-images 4]

Training: one step from a batch of uint8 images (configs/triplet.py's variant: 16 images of
1024x1024, each resized to one of 1024/512/256/128 and cut into 16/16/8/8 patches of 64x64;
adjax deals the scales in equal shares, 192 triplets a batch, torch draws each image's scale
independently, 192 on average), anchors, positives (the next image's patch at the same place),
random-erased negatives, the residual network over the three, softmax(d1, d2)[0] averaged,
Adam. Printed as training patches/s (triplets x 3 patches, counted alike on both sides).
Scoring: grayscale + min-max, the network over a whole 1024x1024 image (481x481x16), the
distance to a prototype map, its mean and max; test images/s.
Random weights and pixels: timing does not depend on them. On a GPU both sides run there
(float32; --precision tf32 lets both use TF32).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import timing  # noqa: E402

from adjax import configlib, methods, train  # noqa: E402
from adjax.methods import triplet  # noqa: E402
from configs import triplet as triplet_config  # noqa: E402


class TorchNet(torch.nn.Module):
  """Sec. III-C in PyTorch: the same layers as adjax.methods.triplet.Embedding (NCHW)."""

  def __init__(self, filters=16, stem=3, blocks=7):
    super().__init__()
    self.stem = torch.nn.ModuleList(torch.nn.Conv2d(1 if i == 0 else filters, filters, 3) for i in range(stem))
    self.blocks = torch.nn.ModuleList(torch.nn.ModuleList([torch.nn.Conv2d(filters, filters, 3),
                                                           torch.nn.Conv2d(filters, filters, 3)])
                                      for _ in range(blocks))

  def forward(self, x):
    for conv in self.stem:
      x = F.relu(conv(x))
    x = F.max_pool2d(x, 2)
    for a, b in self.blocks:
      x = F.relu(b(F.relu(a(x)))) + x[:, :, 2:-2, 2:-2]
    return x


def torch_erase(x, area=(0.02, 0.4), aspect=(0.3, 1 / 0.3)):
  """Random erasing, one rectangle per patch, as torchvision's RandomErasing(p=1, value='random')
  but uniform noise: a slice assignment per patch."""
  n, _, h, w = x.shape
  x = x.clone()
  areas = torch.empty(n).uniform_(*area) * h * w
  ratios = torch.empty(n).uniform_(*aspect)
  for i in range(n):
    eh = int(min(h, max(1, round(float((areas[i] * ratios[i]).sqrt())))))
    ew = int(min(w, max(1, round(float((areas[i] / ratios[i]).sqrt())))))
    y0, x0 = np.random.randint(0, h - eh + 1), np.random.randint(0, w - ew + 1)
    x[i, :, y0:y0 + eh, x0:x0 + ew] = torch.rand(1, eh, ew, device=x.device)
  return x


def time_torch(config, images, steps, warmup, device):
  m = config.model
  net = TorchNet(m.filters, m.stem, m.blocks).to(device)
  opt = torch.optim.Adam(net.parameters(), lr=m.lr, betas=(m.adam_b1, m.adam_b2), eps=m.adam_eps)
  pixels = torch.from_numpy(images).to(device)
  b, side, p = len(images), images.shape[1], m.patch_size
  luma = torch.tensor([0.299, 0.587, 0.114], device=device)

  def step():
    gray = (pixels.float() / 255.0 @ luma)[:, None]  # (B, 1, S, S)
    lo, hi = gray.amin(dim=(1, 2, 3), keepdim=True), gray.amax(dim=(1, 2, 3), keepdim=True)
    gray = (gray - lo) / (hi - lo).clamp_min(1e-6)
    anchors, positives = [], []
    scale = np.random.randint(0, len(m.scales), b)
    for i in range(b):
      s = int(round(side * m.scales[scale[i]]))
      pair = gray[[i, (i + 1) % b]]
      pair = pair if s == side else F.interpolate(pair, size=(s, s), mode="bilinear", antialias=True)
      for _ in range(m.patches_per_scale[scale[i]]):
        y, x = np.random.randint(0, s - p + 1, 2)
        anchors.append(pair[0, :, y:y + p, x:x + p])
        positives.append(pair[1, :, y:y + p, x:x + p])
    a, pos = torch.stack(anchors), torch.stack(positives)
    neg = torch_erase(a, tuple(m.erase_area), tuple(m.erase_aspect))
    fa, fp, fn = (net(t).flatten(1) for t in (a, pos, neg))
    d1 = torch.sqrt(((fa - fp) ** 2).sum(1) + 1e-12)
    d2 = torch.sqrt(((fa - fn) ** 2).sum(1) + 1e-12)
    loss = torch.softmax(torch.stack([d1, d2], 1), 1)[:, 0].mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return len(anchors)

  patches = []  # each step's valid patches, warm-up steps first
  seconds = timing.mean_seconds(lambda: patches.append(step()), steps, warmup=warmup,
                                sync=timing.torch_sync(device))
  return seconds, sum(patches[warmup:]) / steps


def time_torch_score(config, image, count, device):
  m = config.model
  net = TorchNet(m.filters, m.stem, m.blocks).to(device).eval()
  side = image.shape[1]
  h = triplet.output_side(side, m.stem, m.blocks)
  prototype = torch.zeros(1, m.filters, h, h, device=device)
  pixels = torch.from_numpy(image).to(device)
  luma = torch.tensor([0.299, 0.587, 0.114], device=device)

  @torch.no_grad()
  def score():
    gray = (pixels.float() / 255.0 @ luma)[:, None]
    lo, hi = gray.amin(dim=(1, 2, 3), keepdim=True), gray.amax(dim=(1, 2, 3), keepdim=True)
    dist = torch.sqrt(((net((gray - lo) / (hi - lo).clamp_min(1e-6)) - prototype) ** 2).sum(1) + 1e-12)
    return torch.stack([dist.mean(dim=(1, 2)), dist.amax(dim=(1, 2))], 1).cpu()

  return timing.mean_seconds(score, count, sync=timing.torch_sync(device))


def time_adjax(config, images, steps, warmup):
  method = methods.build(config)
  normalisation = method.normalisation(None)
  step = train.make_train_step(method, normalisation)
  batch = {"images": jax.device_put(images), "subclass": jnp.zeros(len(images), jnp.int32)}
  state = train.make_init(method, normalisation, 1)(jax.tree.map(lambda a: a[:1], batch), jax.random.key(0), None)
  for t in range(warmup):
    state, _ = step(state, batch, jax.random.key(1), t, None)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for t in range(steps):
    state, _ = step(state, batch, jax.random.key(1), warmup + t, None)
  jax.block_until_ready(state)
  seconds = (time.perf_counter() - start) / steps
  valid = sum(g * c for g, c in zip(method.scale_groups(len(images)), config.model.patches_per_scale))
  return seconds, state, valid


def time_adjax_score(config, method, state, image, count):
  from adjax.data import transforms

  @jax.jit
  def score(state, pixels):
    images = transforms.normalise_uint8(pixels, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), xp=jnp)
    return method.statistics(method.distances(state, triplet.grayscale(images)))

  pixels = jax.device_put(image)
  jax.block_until_ready(score(state, pixels))
  start = time.perf_counter()
  for _ in range(count):
    out = score(state, pixels)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / count


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="mvtec_ad", help="configs/triplet.py variant giving the shapes")
  parser.add_argument("--batch", type=int, default=None, help="images per step; default: the variant's")
  parser.add_argument("--size", type=int, default=None, help="default: the variant's input side")
  # torch's first steps are slow (its batch shape changes with its scale draws): short runs flatter adjax.
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--score-images", type=int, default=4, help="timed 1-image scoring calls")
  parser.add_argument("--precision", default="float32", choices=timing.PRECISIONS,
                      help="float32 matmul/conv precision on both sides (timing.set_precision)")
  args = parser.parse_args()
  config = triplet_config.get_config(args.variant)
  if args.size:
    configlib.whole_image(config, args.size)
  batch, size = args.batch or config.train.batch_size, configlib.input_size(config)
  config.train.batch_size = batch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count())
  timing.set_precision(args.precision)
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  m = config.model
  dealt = sum(g * p for g, p in zip(methods.build(config).scale_groups(batch), m.patches_per_scale))
  drawn = batch * sum(m.patches_per_scale) / len(m.patches_per_scale)
  print(f"triplet, variant '{args.variant}': {size}x{size}, batch {batch} images (adjax {dealt} triplets, torch "
        f"{drawn:g} on average); jax "
        f"{jax.__version__} ({jax.default_backend()}), torch {torch.__version__} ({device}, {torch.get_num_threads()} "
        f"threads); {args.steps} timed steps after {args.warmup}, {args.score_images} scored images; "
        f"precision {args.precision}", flush=True)
  wall = time.perf_counter()
  adjax_step, state, adjax_valid = time_adjax(config, images, args.steps, args.warmup)
  torch_step, torch_valid = time_torch(config, images, args.steps, args.warmup, device)
  method = methods.build(config)
  adjax_score = time_adjax_score(config, method, state, images[:1], args.score_images)
  torch_score = time_torch_score(config, images[:1], args.score_images, device)
  # torch draws its scales independently: its patches/s counts the patches it drew.
  adjax_rate, torch_rate = 3 * adjax_valid / adjax_step, 3 * torch_valid / torch_step
  print(f"{'torch, training':<20} {torch_rate:9.1f} patches/s  {torch_step * 1000:9.1f} ms/step")
  print(f"{'adjax, training':<20} {adjax_rate:9.1f} patches/s  {adjax_step * 1000:9.1f} ms/step  "
        f"{adjax_rate / torch_rate:5.2f}x vs torch")
  print(f"{'torch, scoring':<20} {1 / torch_score:9.2f} img/s    {torch_score * 1000:9.1f} ms/img")
  print(f"{'adjax, scoring':<20} {1 / adjax_score:9.2f} img/s    {adjax_score * 1000:9.1f} ms/img  "
        f"{torch_score / adjax_score:5.2f}x vs torch")
  print(f"wall {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
  main()

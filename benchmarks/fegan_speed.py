r"""FEGAN training speed: adjax's jitted step against the same networks, losses and M-SE in plain PyTorch.

  python benchmarks/fegan_speed.py [--variant mvtec_ad_lite0] [--batch 16] [--steps 5] [--warmup 2]
      [--size 256]

One training step on both sides: M-SE (20 self-copied, colour-jittered rectangles of 1% of the
image each), the generator (VGG19-shaped average-pooling encoder, 1x1 projection to the FEN's
width, 4x4 stride-2 transposed-convolution decoder with BatchNorm), eq. 1, 3 and 4's losses
weighted by eq. 5, the generator's Adam update, then the DCGAN-style discriminator's on the
real images and the reconstructions. Shapes and widths come from configs/fegan.py's variant
('mvtec_ad_lite0': EfficientNet-Lite0 FEN, quarter width, 256x256, batch 16; 'mvtec_ad': the
paper's VGG19 and full width, for a GPU). Random weights (timing does not depend on them),
random pixels.

Two rows per side, and the ratios between them:
  FEN every step   the frozen FEN runs on the clean batch inside the step, as the paper's
                   training flow (Fig. 2) and a plain PyTorch implementation do;
  features cached  the FEN's output computed once beforehand and read per batch (what adjax's
                   loop does, caches.TrainingSet): the same work on both sides.
"adjax as it trains vs torch as written" is adjax's cached row against torch's FEN-every-step
row. PyTorch's M-SE is the direct form (per image and patch, a slice copy with jitter), on the
same device as its networks. On a GPU both sides run there (float32; --precision tf32 lets both use TF32).
"""

import argparse
import math
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
from backbone_throughput import torch_lite0_to_stage5  # noqa: E402

from adjax import configlib, methods, train  # noqa: E402
from adjax.backbones.vgg import ARCHS  # noqa: E402
from adjax.data import augment  # noqa: E402
from configs import fegan as fegan_config  # noqa: E402


def torch_generator(width, feature_channels):
  layers, cin = [], 3
  for stage, widths in enumerate(ARCHS["vgg19"], start=1):
    for w in widths:
      layers += [torch.nn.Conv2d(cin, max(1, int(w * width)), 3, padding=1), torch.nn.ReLU()]
      cin = max(1, int(w * width))
    if stage < 5:
      layers.append(torch.nn.AvgPool2d(2))
  encoder = torch.nn.Sequential(*layers)
  project = torch.nn.Identity() if cin == feature_channels else torch.nn.Conv2d(cin, feature_channels, 1)
  decoder = []
  for w in (256, 128, 64):
    decoder += [torch.nn.ConvTranspose2d(cin, max(1, int(w * width)), 4, 2, 1, bias=False),
                torch.nn.BatchNorm2d(max(1, int(w * width)), momentum=0.1, eps=1e-5), torch.nn.ReLU()]
    cin = max(1, int(w * width))
  decoder.append(torch.nn.ConvTranspose2d(cin, 3, 4, 2, 1))
  return encoder, project, torch.nn.Sequential(*decoder)


def torch_discriminator(width):
  layers, cin = [], 3
  for i, w in enumerate((64, 128, 256, 512)):
    layers.append(torch.nn.Conv2d(cin, max(1, int(w * width)), 4, 2, 1, bias=i == 0))
    if i > 0:
      layers.append(torch.nn.BatchNorm2d(max(1, int(w * width)), momentum=0.1, eps=1e-5))
    layers.append(torch.nn.LeakyReLU(0.2))
    cin = max(1, int(w * width))
  layers.append(torch.nn.Conv2d(cin, 1, 4, 1, 1))
  return torch.nn.Sequential(*layers)


def torch_mse(x, total=0.2, cap=0.01, aspect=(1 / 3, 3.0), jitter=0.2):
  """M-SE as a PyTorch implementation writes it: per image and patch, copy a jittered slice."""
  b, c, h, w = x.shape
  count, fraction = augment.patch_budget(total, cap)
  out, area = x.clone(), fraction * h * w
  for i in range(b):
    for _ in range(count):
      a = math.exp(np.random.uniform(math.log(aspect[0]), math.log(aspect[1])))
      ph = int(min(max(round(math.sqrt(area * a)), 1), h))
      pw = int(min(max(round(area / ph), 1), w))
      sy, sx = np.random.randint(0, h - ph + 1), np.random.randint(0, w - pw + 1)
      dy, dx = np.random.randint(0, h - ph + 1), np.random.randint(0, w - pw + 1)
      gain = 1.0 + (torch.rand(c, 1, 1, device=x.device) * 2 - 1) * jitter
      offset = (torch.rand(c, 1, 1, device=x.device) * 2 - 1) * jitter
      out[i, :, dy:dy + ph, dx:dx + pw] = x[i, :, sy:sy + ph, sx:sx + pw] * gain + offset
  return out


def torch_fen(config, device):
  if config.model.backbone == "vgg19":
    import torchvision
    features = torchvision.models.vgg19(weights=None).features[:36]  # through conv5_4's ReLU, before pool5
    return features.eval().to(device)
  from efficientnet_lite_pytorch import EfficientNet
  lite = EfficientNet.from_name("efficientnet-lite0", image_size=None).eval().to(device)
  forward = torch_lite0_to_stage5(lite)
  return lambda x: forward(x)[1]


def time_torch(config, images, features, steps, warmup, device, fen_every_step):
  m = config.model
  fen = torch_fen(config, device)
  encoder, project, decoder = (n.to(device) for n in torch_generator(m.width, features.shape[-1]))
  disc = torch_discriminator(m.width).to(device)
  g_params = [*encoder.parameters(), *project.parameters(), *decoder.parameters()]
  g_opt = torch.optim.Adam(g_params, m.lr, betas=(m.adam_b1, m.adam_b2), eps=m.adam_eps, weight_decay=m.weight_decay)
  d_opt = torch.optim.Adam(disc.parameters(), m.lr, betas=(m.adam_b1, m.adam_b2), eps=m.adam_eps,
                           weight_decay=m.weight_decay)
  mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
  pixels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
  cached = torch.from_numpy(np.array(features)).permute(0, 3, 1, 2).contiguous().to(device)
  bce = F.binary_cross_entropy_with_logits

  def step():
    x = (pixels.float() / 255.0 - mean) / std
    if fen_every_step:
      with torch.no_grad():
        target = fen(x)
    else:
      target = cached
    code = encoder(torch_mse(x, m.augment_area, m.max_patch_area))
    theta, recon = project(code), decoder(code)
    fea = torch.sqrt(((target - theta) ** 2).sum(1) + 1e-12).mean()  # eq. 1
    con = (x - recon).abs().mean()  # eq. 3
    fake = disc(recon).mean(dim=(1, 2, 3))
    adv = bce(fake, torch.ones_like(fake))  # eq. 4, the generator's
    g_opt.zero_grad(set_to_none=True)
    (m.lambda_fea * fea + m.lambda_con * con + m.lambda_adv * adv).backward()  # eq. 5
    g_opt.step()
    real, fake = disc(x).mean(dim=(1, 2, 3)), disc(recon.detach()).mean(dim=(1, 2, 3))
    d_loss = bce(real, torch.ones_like(real)) + bce(fake, torch.zeros_like(fake))
    d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_opt.step()

  return timing.mean_seconds(step, steps, warmup=warmup, sync=timing.torch_sync(device))


def time_adjax(config, images, steps, warmup, fen_every_step):
  method = methods.build(config)
  extractor = method.make_extractor()
  normalisation = method.normalisation(extractor)
  step = train.make_train_step(method, normalisation, extractor)
  pixels = jax.device_put(images)
  frozen = extractor.variables if fen_every_step else None
  batch = {"images": pixels, "subclass": jnp.zeros(len(images), jnp.int32)}
  if not fen_every_step:
    batch["features"] = extractor(train.method_batch({"images": images}, normalisation)["images"])
  sample = jax.tree.map(lambda a: a[:1], batch)
  state = train.make_init(method, normalisation, 1, extractor)(sample, jax.random.key(0), frozen)
  for t in range(warmup):
    state, metrics = step(state, batch, jax.random.key(1), t, frozen)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for t in range(steps):
    state, metrics = step(state, batch, jax.random.key(1), warmup + t, frozen)
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / steps, np.asarray(batch.get("features", extractor(
      train.method_batch({"images": images}, normalisation)["images"])))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--variant", default="mvtec_ad_lite0", help="configs/fegan.py variant giving the shapes")
  parser.add_argument("--batch", type=int, default=None, help="default: the variant's train.batch_size")
  parser.add_argument("--size", type=int, default=None, help="default: the variant's input side")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--precision", default="float32", choices=timing.PRECISIONS,
                      help="float32 matmul/conv precision on both sides (timing.set_precision)")
  args = parser.parse_args()
  config = fegan_config.get_config(args.variant)
  config.model.backbone_weights, config.model.encoder_init = "random", "scratch"
  if args.size:
    configlib.whole_image(config, args.size)
  batch, size = args.batch or config.train.batch_size, configlib.input_size(config)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count())
  timing.set_precision(args.precision)
  images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  print(f"FEGAN step, variant '{args.variant}': FEN {config.model.backbone} {config.model.layers[0]}, width "
        f"{config.model.width}, {size}x{size}, batch {batch}; jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({device}, {torch.get_num_threads()} threads); {args.steps} timed steps after "
        f"{args.warmup}; precision {args.precision}", flush=True)
  wall = time.perf_counter()
  adjax_cached, features = time_adjax(config, images, args.steps, args.warmup, fen_every_step=False)
  adjax_fen = time_adjax(config, images, args.steps, args.warmup, fen_every_step=True)[0]
  torch_cached = time_torch(config, images, features, args.steps, args.warmup, device, fen_every_step=False)
  torch_fen = time_torch(config, images, features, args.steps, args.warmup, device, fen_every_step=True)
  line = lambda name, s: f"{name:<34} {batch / s:8.2f} img/s  {s * 1000:9.1f} ms/step"
  print(line("torch, FEN every step", torch_fen))
  print(line("adjax, FEN every step", adjax_fen) + f"  {torch_fen / adjax_fen:5.2f}x vs torch (same work)")
  print(line("torch, features cached", torch_cached))
  print(line("adjax, features cached", adjax_cached) + f"  {torch_cached / adjax_cached:5.2f}x vs torch (same work)")
  print(f"adjax as it trains (cached) vs torch as written (FEN every step): {torch_fen / adjax_cached:.2f}x; "
        f"wall {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
  main()

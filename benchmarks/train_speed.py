r"""SimpleNet training and inference speed: adjax vs a plain PyTorch loop, same shapes, same run.

  python benchmarks/train_speed.py [--resize 329 --crop 288] [--measure-epochs 1] [--protocol-epochs 160]
      [--official path/to/DonaldRR/SimpleNet]

The official protocol on MVTec AD bottle: 209 training images, WideResNet50 layer2+3
(random weights: timing does not depend on them), 1536-d patch features, batch 8, 160
epochs. PyTorch, as the reference code does, recomputes the frozen backbone every epoch
(eager, on the GPU when there is one, TF32 matmuls allowed as XLA's default does); adjax
runs its real training path, train.fit_category: it decodes the images through the grain
pipeline, caches the backbone features once (train.cache_features) and trains the head
from the cache with checkpoints. The PyTorch loop starts from decoded, resized images in
memory (decoding excluded, which favours it: its reference re-decodes every epoch). Its patch
features follow the official code's operations in their order (PatchMaker, _embed); with
--official it checks that the official implementation gives the same features and times one
step of each, so the reference is shown to be no slower than the code it stands for.

PyTorch is timed for --measure-epochs epochs after a warm-up step and extrapolated
linearly to --protocol-epochs (its cost per epoch is constant). adjax runs the whole
protocol on an accelerator; on CPU it runs --adjax-epochs (default 3) and the remaining
epochs are extrapolated from its steady (post-compilation) epoch time. Prints images/s,
wall times and the ratio. Also times inference (features -> scores -> upsampled,
smoothed map) for one batch.

Compiled programs are cached as `python -m adjax.main` caches them (io_utils.enable_compilation_cache:
<adjax cache>/xla or $JAX_COMPILATION_CACHE_DIR); the script says whether the cache started
empty (a cold start) or not. For a cold start point JAX_COMPILATION_CACHE_DIR at a new folder;
ADJAX_COMPILATION_CACHE=0 turns the cache off.
"""

import argparse
import copy
import dataclasses
import os
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adjax import caches, evaluate, io_utils, train  # noqa: E402
from adjax.data import datasets, transforms  # noqa: E402
from adjax.methods import simplenet  # noqa: E402
from configs import simplenet as simplenet_config  # noqa: E402

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
    """The official PatchMaker + _embed operations, in their order: 3x3 patches of each layer,
    only the deeper layers' patch grids resized to the first's (as (N*C*9, 1, h, w) maps), each
    patch's C*9 values average-pooled to `dim`, the layers' stacked and pooled again."""
    b = self.backbone
    x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
    l2 = b.layer2(b.layer1(x))
    maps = [l2, b.layer3(l2)]
    unfold = torch.nn.Unfold(3, padding=1)
    h, w = maps[0].shape[-2:]
    pooled = []
    for i, m in enumerate(maps):
      n, c, mh, mw = m.shape
      patches = unfold(m).reshape(n, c, 3, 3, mh, mw)
      if i > 0:  # (n, c, 3, 3, mh, mw) -> one bilinear resize of N*C*9 single-channel maps
        patches = F.interpolate(patches.reshape(-1, 1, mh, mw), size=(h, w), mode="bilinear",
                                align_corners=False).reshape(n, c, 3, 3, h, w)
      patches = patches.permute(0, 4, 5, 1, 2, 3).reshape(-1, 1, c * 9)
      pooled.append(F.adaptive_avg_pool1d(patches, self.dim))
    stacked = torch.cat(pooled, dim=-1)
    return F.adaptive_avg_pool1d(stacked, self.dim).reshape(-1, self.dim), (h, w)


def torch_epoch(model, images, batch, proj_opt, dsc_opt, noise_std=0.015, th=0.5):
  order = torch.randperm(len(images), device=images.device)
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


def official_step_check(path, model, images, batch, device, repeats=3):
  """The official implementation (a checkout of DonaldRR/SimpleNet at `path`) on the same
  backbone weights and batch: its `_embed` must give this loop's features, and its own
  `_train_discriminator` step is timed against `torch_epoch`'s (best of `repeats`). Its
  TensorBoard, plotting and metrics imports are stubbed: they do not run in a step."""
  import types
  writer = types.ModuleType("torch.utils.tensorboard")
  writer.SummaryWriter = type("SummaryWriter", (), {"__init__": lambda self, *a, **k: None,
                                                   "add_scalar": lambda self, *a, **k: None})
  plots = types.ModuleType("utils")
  plots.plot_segmentation_images = None
  sys.modules.update({"torch.utils.tensorboard": writer, "utils": plots, "metrics": types.ModuleType("metrics")})
  sys.path.insert(0, path)
  import simplenet as official  # noqa: PLC0415 - the checkout's module, found through sys.path
  x = images[:batch]
  net = official.SimpleNet(device)
  net.load(copy.deepcopy(model.backbone), ["layer2", "layer3"], device, tuple(x.shape[1:]), 1536, 1536, patchsize=3,
           meta_epochs=1, gan_epochs=1, noise_std=0.015, dsc_layers=2, dsc_hidden=1024, dsc_margin=0.5, pre_proj=1)
  net.set_model_dir(tempfile.mkdtemp(), "bottle")
  with torch.no_grad():
    difference = float((net._embed(x, evaluation=True)[0] - model.features(x)[0]).abs().max())
  proj_opt = torch.optim.AdamW(model.adaptor.parameters(), 1e-4)
  dsc_opt = torch.optim.Adam(model.discriminator.parameters(), 2e-4, weight_decay=1e-5)

  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def best(step):  # synchronised: CUDA kernels run after the Python call returns
    step()
    times = []
    for _ in range(repeats):
      sync()
      start = time.perf_counter()
      step()
      sync()
      times.append(time.perf_counter() - start)
    return min(times)
  official_s = best(lambda: net._train_discriminator([{"image": x}]))
  ours_s = best(lambda: torch_epoch(model, x, batch, proj_opt, dsc_opt))
  print(f"official SimpleNet ({path}): features differ by {difference:.2g} at most; one training step of batch "
        f"{batch}: official {official_s:.2f} s, this benchmark's loop {ours_s:.2f} s "
        f"(official / ours {official_s / ours_s:.2f}x)")


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
  parser.add_argument("--official", default="", help="a checkout of DonaldRR/SimpleNet: time its own training "
                      "step against this benchmark's PyTorch loop, same batch and weights, first")
  parser.add_argument("--adjax-epochs", type=int, default=0,
                      help="epochs adjax really runs (0: the whole protocol on an accelerator, 3 on CPU)")
  args = parser.parse_args()
  io_utils.enable_compilation_cache()
  cache = jax.config.jax_compilation_cache_dir
  entries = len(os.listdir(cache)) if cache and os.path.isdir(cache) else 0
  print(f"compilation cache: {cache or 'off'}" + (f" ({entries} entries at start: {'warm' if entries else 'cold'})"
                                                  if cache else ""))
  torch.set_num_threads(os.cpu_count())
  device = "cuda" if torch.cuda.is_available() else "cpu"
  # On a GPU, XLA runs float32 convolutions and matmuls in TF32 by default; let PyTorch do the
  # same for matmuls (its convolutions already do), so the reference is not handicapped.
  torch.backends.cuda.matmul.allow_tf32 = True
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  split = datasets.read_split("mvtec_ad", args.root, "bottle")
  records = split.train[: args.images] if args.images else split.train
  config = simplenet_config.get_config("mvtec_ad")
  config.model.backbone_weights = "random"
  config.data.image_size, config.data.crop_size = args.resize, args.crop
  config.train.batch_size = args.batch
  method = simplenet.SimpleNet(config)
  feature_fn = method.make_extractor()
  images = np.stack([transforms.preprocess_image(transforms.load_image(r.path), args.resize, args.crop,
                                                 feature_fn.spec.mean, feature_fn.spec.std) for r in records])
  n, steps = len(images), -(-len(images) // args.batch)
  print(f"{n} images {args.crop}x{args.crop}, batch {args.batch}, {steps} steps/epoch; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} on {device} ({torch.get_num_threads()} threads)")

  if args.official:
    timages = torch.from_numpy(images[: args.batch].transpose(0, 3, 1, 2).copy()).to(device)
    official_step_check(args.official, TorchSimpleNet().to(device), timages, args.batch, device)

  # adjax: the real training path (train.fit_category: feature cache, init, jitted data-parallel
  # steps, Orbax checkpoints), timed end to end. Epoch boundaries are timestamped so that a
  # shortened run (--adjax-epochs, for slow CPUs) can be extrapolated from its steady epochs.
  split = dataclasses.replace(split, train=records)
  adjax_epochs = args.adjax_epochs or (args.protocol_epochs if jax.default_backend() != "cpu" else 3)
  config.train.epochs = adjax_epochs
  epoch_starts = []
  full_epoch = caches.TrainingSet.epoch

  def timed_epoch(source, order, batch_size):
    if len(order) == n:
      epoch_starts.append(time.perf_counter())
    return full_epoch(source, order, batch_size)

  caches.TrainingSet.epoch = timed_epoch
  full_compute_features = caches.compute_features
  feature_s = []

  def timed_compute_features(*a, **k):
    t = time.perf_counter()
    out = jax.block_until_ready(full_compute_features(*a, **k))  # device arrays when written on the device
    feature_s.append(time.perf_counter() - t)
    return out

  caches.compute_features = timed_compute_features
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    state = train.fit_category(config, method, feature_fn, split, jax.random.key(0), workdir)
    jax.block_until_ready(state)
    fit_s = time.perf_counter() - start
  caches.TrainingSet.epoch, caches.compute_features = full_epoch, full_compute_features
  epoch_s = np.diff(epoch_starts + [start + fit_s])
  steady_epoch = float(np.median(epoch_s[1:])) if len(epoch_s) > 1 else float(epoch_s[0])
  before_training = epoch_starts[0] - start
  adjax_total = fit_s + (args.protocol_epochs - adjax_epochs) * steady_epoch

  model = TorchSimpleNet().to(device)
  proj_opt = torch.optim.AdamW(model.adaptor.parameters(), 1e-4)
  dsc_opt = torch.optim.Adam(model.discriminator.parameters(), 2e-4, weight_decay=1e-5)
  timages = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
  torch_epoch(model, timages[: args.batch], args.batch, proj_opt, dsc_opt)  # warm-up
  sync()
  start = time.perf_counter()
  for _ in range(args.measure_epochs):
    torch_epoch(model, timages, args.batch, proj_opt, dsc_opt)
  sync()
  torch_epoch_s = (time.perf_counter() - start) / args.measure_epochs
  torch_total = args.protocol_epochs * torch_epoch_s

  print(f"adjax: {adjax_epochs} epochs of train.fit_category in {fit_s:.1f} s: feature cache "
        f"{feature_s[0]:.1f} s (decode + backbone incl. its compilation; the training programs compile alongside), "
        f"other set-up {before_training - feature_s[0]:.1f} s, first epoch {epoch_s[0]:.2f} s, "
        f"then {steady_epoch:.3f} s/epoch "
        f"({n / steady_epoch:.1f} img/s)")
  print(f"torch: {torch_epoch_s:.1f} s/epoch ({n / torch_epoch_s:.1f} img/s), backbone recomputed each epoch")
  print(f"{args.protocol_epochs}-epoch protocol (adjax ran {adjax_epochs}, torch {args.measure_epochs} epoch(s), "
        "rest extrapolated): "
        f"adjax {adjax_total / 60:.2f} min, torch {torch_total / 60:.1f} min, ratio {torch_total / adjax_total:.2f}x")

  # Inference: one batch, features -> scores -> upsampled + smoothed maps.
  # The program `--mode=eval` runs (evaluate.make_scorer); SimpleNet's maps: bilinear + sigma 4.
  adjax_infer = evaluate.make_scorer(config, method, feature_fn)
  xb = jax.device_put(images[: args.batch])
  jax.block_until_ready(adjax_infer(state, feature_fn.variables, xb))
  repeats = 20 if device == "cuda" else 3
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(adjax_infer(state, feature_fn.variables, xb))
  adjax_inf = (time.perf_counter() - start) / repeats
  torch_infer(model, timages[: args.batch], args.crop)
  sync()
  start = time.perf_counter()
  for _ in range(repeats):
    torch_infer(model, timages[: args.batch], args.crop)
  sync()
  torch_inf = (time.perf_counter() - start) / repeats
  print(f"inference, batch {args.batch}: adjax {args.batch / adjax_inf:.1f} img/s ({adjax_inf * 1000:.0f} ms), "
        f"torch {args.batch / torch_inf:.1f} img/s ({torch_inf * 1000:.0f} ms), ratio {torch_inf / adjax_inf:.2f}x")


if __name__ == "__main__":
  main()

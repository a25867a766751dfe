r"""Input pipelines on MVTec AD bottle (900x900 PNG -> resize 256 -> crop 224), two parts.

  python benchmarks/input_pipeline.py [--root ../shared/data/mvtec_ad] [--batch 8] [--part decode|train|all]
      [--epochs 3] [--models linear,conv]

decode: reads the 209 training images once per worker setting (0 = decode in the main
process, then 1 and 2 worker processes) and prints images/s and wall time. The reference is a
torchvision DataLoader with the same transforms and worker counts, as a ratio (torch time /
grain time).

train: the image-space training path (adjax/caches.py, train.train_gradient) for a model
whose batches are augmented at every step (random flip, brightness and contrast jitter, one
random-erasing rectangle; new draws each step). Two models: 'linear' (a per-pixel 3 -> 3 map:
the step costs almost nothing, so steps/s measure the input path: batch assembly,
augmentation, transfer) and 'conv' (a small convolutional autoencoder: on a CPU its
convolutions' backward passes dominate, so it compares XLA's and PyTorch's CPU kernels more
than the input paths). adjax keeps the
decoded uint8 images on the device and augments inside the jitted step; the reference is the
same model and augmentation in PyTorch, the augmentation done on the host by a DataLoader's
Dataset over the same decoded uint8 images in memory (decoding excluded on both sides, which
spares torch the per-epoch decoding its reference code would do). Prints training steps/s,
wall time and the ratio, after one warm-up epoch each (compilation excluded).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adjax.data import datasets, pipeline  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def time_grain(records, batch, workers):
  start = time.perf_counter()
  n = sum(len(b["index"]) for b in pipeline.make_dataset(
      records, image_size=256, crop_size=224, mean=MEAN, std=STD, batch_size=batch, worker_count=workers))
  return n, time.perf_counter() - start


def time_torch(records, batch, workers):
  import torch
  from PIL import Image
  from torchvision import transforms as T
  tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])

  class Images(torch.utils.data.Dataset):
    def __len__(self):
      return len(records)

    def __getitem__(self, i):
      return tf(Image.open(records[i].path).convert("RGB"))

  start = time.perf_counter()
  n = sum(len(b) for b in torch.utils.data.DataLoader(Images(), batch_size=batch, num_workers=workers))
  return n, time.perf_counter() - start


# ---- the image-space training part: one augmentation, written for each framework ----

ERASE = 0.25  # side of the random-erasing square, as a fraction of the image side


def augment_jax(images, key):
  """images (B, S, S, 3) normalised float32: per image a flip (p 1/2), brightness +-0.2,
  contrast x[0.8, 1.2] and one zeroed ERASE*S square at a random position."""
  import jax
  import jax.numpy as jnp
  b, s = images.shape[0], images.shape[1]
  k_flip, k_bright, k_contrast, k_y, k_x = jax.random.split(key, 5)
  flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
  images = jnp.where(flip, images[:, :, ::-1], images)
  mean = images.mean(axis=(1, 2, 3), keepdims=True)
  contrast = jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=0.8, maxval=1.2)
  images = (images - mean) * contrast + mean + jax.random.uniform(k_bright, (b, 1, 1, 1), minval=-0.2, maxval=0.2)
  side = int(ERASE * s)
  y0 = jax.random.randint(k_y, (b, 1, 1, 1), 0, s - side + 1)
  x0 = jax.random.randint(k_x, (b, 1, 1, 1), 0, s - side + 1)
  rows, cols = jnp.arange(s)[None, :, None, None], jnp.arange(s)[None, None, :, None]
  inside = (rows >= y0) & (rows < y0 + side) & (cols >= x0) & (cols < x0 + side)
  return jnp.where(inside, 0.0, images)


def make_autoencoder_method(model):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  from adjax.backbones import layers
  from adjax.methods import base

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      if model == "linear":
        return nn.Dense(3)(x)
      x = nn.relu(nn.Conv(16, (3, 3), strides=(2, 2))(x))
      x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
      x = nn.relu(layers.ConvTranspose4x4S2(16)(x))  # torch's ConvTranspose2d(4, 2, 1), as below
      return layers.ConvTranspose4x4S2(3)(x)

  class AugmentedAutoencoder(base.Method):
    train_inputs = score_inputs = ("images",)

    def __init__(self, config):
      super().__init__(config)
      self.net, self.tx = Net(), optax.adam(1e-3)

    def make_extractor(self):
      return None

    def normalisation(self, extractor):
      return MEAN, STD

    def init(self, sample, key, num_subclasses=1):
      params = self.net.init(key, sample["images"])["params"]
      return {"params": params, "opt_state": self.tx.init(params)}

    def train_step(self, state, batch, key):
      x = augment_jax(batch["images"], key)
      loss, grads = jax.value_and_grad(lambda p: jnp.mean((self.net.apply({"params": p}, x) - x) ** 2))(
          state["params"])
      updates, opt_state = self.tx.update(grads, state["opt_state"])
      return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, {"loss": loss}

  return AugmentedAutoencoder


def time_adjax_training(records, batch, epochs, model):
  """(steps, seconds) of `epochs` epochs of train.train_gradient after a warm-up epoch."""
  import jax
  import ml_collections

  from adjax import caches, configlib, train
  config = configlib.base()
  config.model = ml_collections.ConfigDict({"name": "augmented_autoencoder"})
  config.data.image_size, config.data.crop_size = 256, 224
  config.train.batch_size, config.train.checkpoint_every, config.train.checkpoint_min_seconds = batch, 10 ** 6, 1e9
  config.train.log_every = 10 ** 6
  method = make_autoencoder_method(model)(config)
  normalisation = method.normalisation(None)
  training_set = caches.TrainingSet(config, method, None, records, [""], normalisation)
  step = train.make_train_step(method, normalisation)
  state = train.make_init(method, normalisation, 1)(training_set.sample(), jax.random.key(0), None)
  with tempfile.TemporaryDirectory() as workdir:
    config.train.epochs = 1  # warm-up: compiles the step for both batch sizes
    state = train.train_gradient(config, step, training_set, state, jax.random.key(1), workdir, "warmup")
    config.train.epochs = epochs
    start = time.perf_counter()
    state = train.train_gradient(config, step, training_set, state, jax.random.key(2), workdir, "timed")
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
  return epochs * -(-len(records) // batch), seconds


def time_torch_training(records, batch, epochs, workers, model):
  """(steps, seconds) of `epochs` epochs of the same model and augmentation in PyTorch, the
  augmentation on the host in a DataLoader over the decoded uint8 images."""
  import torch
  images = np.concatenate([b["image"] for b in pipeline.make_dataset(
      records, image_size=256, crop_size=224, mean=None, std=None, batch_size=batch)])  # uint8, as adjax caches
  mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)

  class Augmented(torch.utils.data.Dataset):
    def __len__(self):
      return len(images)

    def __getitem__(self, i):
      x = (torch.from_numpy(images[i]).permute(2, 0, 1).float() / 255.0 - mean) / std
      if torch.rand(()) < 0.5:
        x = x.flip(-1)
      m = x.mean()
      x = (x - m) * torch.empty(()).uniform_(0.8, 1.2) + m + torch.empty(()).uniform_(-0.2, 0.2)
      s = x.shape[-1]
      side = int(ERASE * s)
      y0, x0 = torch.randint(0, s - side + 1, (2,)).tolist()
      x[:, y0:y0 + side, x0:x0 + side] = 0.0
      return x

  if model == "linear":
    net = torch.nn.Conv2d(3, 3, 1)
  else:
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(32, 16, 4, 2, 1), torch.nn.ReLU(), torch.nn.ConvTranspose2d(16, 3, 4, 2, 1))
  optimiser = torch.optim.Adam(net.parameters(), 1e-3)
  loader = torch.utils.data.DataLoader(Augmented(), batch_size=batch, shuffle=True, num_workers=workers,
                                       persistent_workers=workers > 0)

  def one_epoch():
    for x in loader:
      loss = torch.mean((net(x) - x) ** 2)
      optimiser.zero_grad()
      loss.backward()
      optimiser.step()

  one_epoch()  # warm-up
  start = time.perf_counter()
  for _ in range(epochs):
    one_epoch()
  return epochs * len(loader), time.perf_counter() - start


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  parser = argparse.ArgumentParser()
  parser.add_argument("--root", default=os.path.join(here, "..", "..", "shared", "data", "mvtec_ad"))
  parser.add_argument("--category", default="bottle")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--part", choices=("decode", "train", "all"), default="all")
  parser.add_argument("--epochs", type=int, default=3, help="timed training epochs (part 'train')")
  parser.add_argument("--models", default="linear,conv", help="part 'train': linear and/or conv")
  args = parser.parse_args()
  records = datasets.read_split("mvtec_ad", args.root, args.category).train
  try:
    import torch  # noqa: F401
    have_torch = True
  except ImportError:
    have_torch = False
  print(f"{len(records)} images from {args.category}, batch {args.batch}, {os.cpu_count()} CPU cores")
  if args.part in ("train", "all"):
    import jax
    import torch
    torch.set_num_threads(os.cpu_count())
    for model in args.models.split(","):
      steps, seconds = time_adjax_training(records, args.batch, args.epochs, model)
      print(f"train {model}, on-device augmentation (adjax, jax {jax.__version__} on {jax.default_backend()}): "
            f"{steps / seconds:6.2f} steps/s  {steps * args.batch / seconds:7.1f} img/s  wall {seconds:6.2f} s "
            f"({args.epochs} epochs)", flush=True)
      for workers in (0, 2):
        tsteps, tseconds = time_torch_training(records, args.batch, args.epochs, workers, model)
        print(f"train {model}, host augmentation (torch {torch.__version__} DataLoader, {workers} workers): "
              f"{tsteps / tseconds:6.2f} steps/s  {tsteps * args.batch / tseconds:7.1f} img/s  "
              f"wall {tseconds:6.2f} s  ratio {(tseconds / tsteps) / (seconds / steps):.2f}x", flush=True)
  if args.part == "train":
    return
  for workers in (0, 1, 2):
    n, seconds = time_grain(records, args.batch, workers)
    line = f"grain, {workers} workers: {n / seconds:7.1f} img/s  wall {seconds:6.2f} s"
    if have_torch:
      tn, tseconds = time_torch(records, args.batch, workers)
      line += (f"   | torch DataLoader: {tn / tseconds:7.1f} img/s  wall {tseconds:6.2f} s  "
               f"ratio {tseconds / seconds:.2f}x")
    print(line)


if __name__ == "__main__":
  main()

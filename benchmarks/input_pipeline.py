r"""grain input pipeline throughput on MVTec AD bottle (900x900 PNG -> resize 256 -> crop 224).

  python benchmarks/input_pipeline.py [--root ../shared/data/mvtec_ad] [--batch 8]

Reads the 209 training images once per worker setting (0 = decode in the main process,
then 1 and 2 worker processes) and prints images/s and wall time. The reference is a
torchvision DataLoader with the same transforms and worker counts, when torch is
installed, as a ratio (torch time / grain time).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

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


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  parser = argparse.ArgumentParser()
  parser.add_argument("--root", default=os.path.join(here, "..", "..", "shared", "data", "mvtec_ad"))
  parser.add_argument("--category", default="bottle")
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()
  records = datasets.read_split("mvtec_ad", args.root, args.category).train
  try:
    import torch  # noqa: F401
    have_torch = True
  except ImportError:
    have_torch = False
  print(f"{len(records)} images from {args.category}, batch {args.batch}, {os.cpu_count()} CPU cores")
  for workers in (0, 1, 2):
    n, seconds = time_grain(records, args.batch, workers)
    line = f"grain, {workers} workers: {n / seconds:7.1f} img/s  wall {seconds:6.2f} s"
    if have_torch:
      tn, tseconds = time_torch(records, args.batch, workers)
      line += f"   | torch DataLoader: {tn / tseconds:7.1f} img/s  wall {tseconds:6.2f} s  ratio {tseconds / seconds:.2f}x"
    print(line)


if __name__ == "__main__":
  main()

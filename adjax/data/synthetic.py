"""The built-in dataset: procedurally generated industrial textures with exact defect masks.

It makes `python -m adjax.main` work on a fresh offline machine and is built for the
situation Adapted-MoE targets: each category holds several visually distinct subclasses
(colour, weave/grain, scale), and some subclasses appear only in the test split
("unseen"). Defects: scratches, holes, stains, cracks and missing pattern; a defect
changes exactly the pixels of its mask.

Generated deterministically (numpy, fixed seeds) on first use into
`<adjax cache>/synthetic/<VERSION>/`, in the texture_ad layout:
  <category>/<subclass>/train/good/*.png            (empty for unseen subclasses)
  <category>/<subclass>/test/{good,<defect>}/*.png
  <category>/<subclass>/ground_truth/<defect>/<stem>_mask.png
"""

import dataclasses
import os
import shutil
import tempfile
import zlib

import numpy as np
import scipy.ndimage
from PIL import Image, ImageDraw

from adjax import io_utils

VERSION = "v1"
IMAGE_SIZE = 160
TRAIN_PER_SUBCLASS = 30
TEST_GOOD_PER_SUBCLASS = 6
TEST_DEFECTS_PER_SUBCLASS = 8
DEFECTS = ("scratch", "hole", "stain", "crack", "missing_pattern")


@dataclasses.dataclass(frozen=True)
class Subclass:
  name: str
  kind: str  # texture generator
  colours: tuple  # RGB in [0, 1]
  scale: float  # period / grain size in pixels
  variant: str = ""
  seen: bool = True


CATEGORIES = {
    "cloth": (
        Subclass("plain_navy", "weave", ((0.15, 0.2, 0.45), (0.25, 0.3, 0.6)), 8.0, "plain"),
        Subclass("twill_khaki", "weave", ((0.6, 0.55, 0.35), (0.5, 0.45, 0.3)), 10.0, "twill"),
        Subclass("plain_red_fine", "weave", ((0.6, 0.12, 0.12), (0.75, 0.2, 0.2)), 6.0, "plain"),
        Subclass("twill_grey_coarse", "weave", ((0.55, 0.55, 0.55), (0.35, 0.35, 0.38)), 14.0, "twill", False),
        Subclass("plain_green", "weave", ((0.15, 0.45, 0.2), (0.3, 0.55, 0.25)), 9.0, "plain", False),
    ),
    "wood": (
        Subclass("oak", "wood", ((0.78, 0.6, 0.38), (0.55, 0.38, 0.2)), 9.0),
        Subclass("walnut", "wood", ((0.42, 0.28, 0.18), (0.25, 0.15, 0.09)), 6.0),
        Subclass("pine_wide", "wood", ((0.9, 0.78, 0.55), (0.72, 0.55, 0.32)), 16.0),
        Subclass("cherry", "wood", ((0.7, 0.38, 0.25), (0.5, 0.22, 0.14)), 8.0, "", False),
        Subclass("ash_fine", "wood", ((0.85, 0.8, 0.7), (0.65, 0.6, 0.5)), 4.5, "", False),
    ),
    "metal": (
        Subclass("brushed_steel", "brushed", ((0.62, 0.63, 0.66), (0.5, 0.51, 0.54)), 40.0),
        Subclass("perforated_steel", "perforated", ((0.6, 0.61, 0.64), (0.12, 0.12, 0.13)), 16.0),
        Subclass("brushed_copper", "brushed", ((0.72, 0.45, 0.3), (0.55, 0.32, 0.2)), 40.0),
        Subclass("perforated_gold_fine", "perforated", ((0.78, 0.65, 0.3), (0.15, 0.12, 0.05)), 11.0, "", False),
        Subclass("brushed_dark_vertical", "brushed", ((0.35, 0.36, 0.4), (0.25, 0.26, 0.3)), 40.0, "vertical",
                 False),
    ),
}


def _rng(*key) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32("/".join(map(str, key)).encode()))


def _smooth_noise(rng, size, cell) -> np.ndarray:
  """Smooth random field in [-1, 1] with features about `cell` pixels large."""
  n = max(2, int(np.ceil(size / cell)) + 3)
  coarse = rng.uniform(-1, 1, (n, n))
  fine = scipy.ndimage.zoom(coarse, size / (n - 3), order=3)
  return np.clip(fine[:size, :size], -1.5, 1.5)


def _mix(colours, t):
  a, b = (np.asarray(c, np.float32) for c in colours)
  return a * (1 - t[..., None]) + b * t[..., None]


def _weave(sub, rng, size):
  p = sub.scale * rng.uniform(0.95, 1.05)
  oy, ox = rng.uniform(0, p, 2)
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  i, j = np.floor((x + ox) / p), np.floor((y + oy) / p)
  u, v = ((x + ox) / p) % 1.0, ((y + oy) / p) % 1.0
  warp_on_top = ((i + j) % 2 == 0) if sub.variant == "plain" else ((i + j) % 3 == 0)
  shade_warp = 0.6 + 0.4 * np.sin(np.pi * u) ** 0.7  # a round thread, lit from above
  shade_weft = 0.6 + 0.4 * np.sin(np.pi * v) ** 0.7
  colour = np.where(warp_on_top[..., None], np.asarray(sub.colours[0]) * shade_warp[..., None],
                    np.asarray(sub.colours[1]) * shade_weft[..., None])
  return colour * (1 + 0.06 * _smooth_noise(rng, size, 24)[..., None])


def _wood(sub, rng, size):
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  cx, cy = rng.uniform(-2 * size, 3 * size), rng.uniform(-3 * size, -size)  # centre far off-image
  r = np.sqrt(((x - cx) * 0.35) ** 2 + (y - cy) ** 2)
  r = r + 6 * _smooth_noise(rng, size, 40) + 1.5 * _smooth_noise(rng, size, 8)
  rings = (r / sub.scale) % 1.0
  t = np.clip(rings ** 3 + 0.15 * _smooth_noise(rng, size, 6), 0, 1)
  return _mix(sub.colours, t)


def _brushed(sub, rng, size):
  noise = rng.normal(0, 1, (size, size))
  along = (0, sub.scale) if sub.variant != "vertical" else (sub.scale, 0)
  streaks = scipy.ndimage.gaussian_filter(noise, sigma=(along[0] / 4 + 0.6, along[1] / 4 + 0.6))
  streaks = streaks / (streaks.std() + 1e-6)
  t = np.clip(0.5 + 0.25 * streaks + 0.2 * _smooth_noise(rng, size, 80), 0, 1)
  return _mix(sub.colours, t)


def _perforated(sub, rng, size):
  p = sub.scale
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  oy, ox = rng.uniform(0, p, 2)
  row = np.floor((y + oy) / p)
  dx = ((x + ox + (row % 2) * p / 2) % p) - p / 2  # staggered rows
  dy = ((y + oy) % p) - p / 2
  hole = np.clip((np.sqrt(dx ** 2 + dy ** 2) - p * 0.28) / 1.2, 0, 1)  # soft edge
  plate = np.asarray(sub.colours[0]) * (1 + 0.05 * _smooth_noise(rng, size, 30))[..., None]
  return plate * hole[..., None] + np.asarray(sub.colours[1]) * (1 - hole[..., None])


GENERATORS = {"weave": _weave, "wood": _wood, "brushed": _brushed, "perforated": _perforated}


def texture(sub: Subclass, rng, size=IMAGE_SIZE) -> np.ndarray:
  image = GENERATORS[sub.kind](sub, rng, size)
  image = image + rng.normal(0, 0.012, image.shape)  # sensor noise
  return np.clip(image, 0, 1).astype(np.float32)


def _curve_points(rng, size, n=24):
  start = rng.uniform(0.2 * size, 0.8 * size, 2)
  angle = rng.uniform(0, np.pi)
  length = rng.uniform(0.3, 0.6) * size
  bend = rng.uniform(-0.4, 0.4)
  t = np.linspace(-0.5, 0.5, n)
  direction = np.array([np.cos(angle), np.sin(angle)])
  normal = np.array([-direction[1], direction[0]])
  return [tuple(start + direction * length * s + normal * bend * length * s ** 2 * 2) for s in t]


def _draw_mask(size, draw_fn) -> np.ndarray:
  canvas = Image.new("L", (size, size), 0)
  draw_fn(ImageDraw.Draw(canvas))
  return np.asarray(canvas) > 127


def _blob(rng, size, radius):
  cy, cx = rng.uniform(0.25 * size, 0.75 * size, 2)
  y, x = np.mgrid[0:size, 0:size]
  d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) / radius
  return d + 0.35 * _smooth_noise(rng, size, radius * 0.8) < 1.0


def add_defect(image: np.ndarray, defect: str, rng) -> tuple[np.ndarray, np.ndarray]:
  """Returns (defective image, bool mask); pixels outside the mask are unchanged."""
  size = image.shape[0]
  out = image.copy()
  mean_colour = image.reshape(-1, 3).mean(axis=0)
  if defect == "scratch":
    points = _curve_points(rng, size)
    width = int(rng.integers(2, 4))
    mask = _draw_mask(size, lambda d: d.line(points, fill=255, width=width))
    tone = 0.92 if rng.random() < 0.5 else 0.12
    out[mask] = 0.25 * out[mask] + 0.75 * tone
  elif defect == "hole":
    r = rng.uniform(5, 10)
    cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
    mask = _draw_mask(size, lambda d: d.ellipse((cx - r, cy - r * rng.uniform(0.8, 1.2), cx + r, cy + r), fill=255))
    y, x = np.mgrid[0:size, 0:size]
    depth = np.clip(1 - np.sqrt((y - cy) ** 2 + (x - cx) ** 2) / r, 0, 1)
    out[mask] = (0.05 + 0.1 * (1 - depth[mask]))[:, None] * np.ones(3)
  elif defect == "stain":
    mask = _blob(rng, size, rng.uniform(10, 22))
    stain = np.asarray(rng.choice([(0.35, 0.25, 0.1), (0.1, 0.1, 0.1), (0.7, 0.65, 0.2)]), np.float32)
    alpha = rng.uniform(0.45, 0.7)
    out[mask] = (1 - alpha) * out[mask] + alpha * stain
  elif defect == "crack":
    points = [tuple(rng.uniform(0.3 * size, 0.7 * size, 2))]
    heading = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(10, 18))):
      heading += rng.normal(0, 0.6)
      step = rng.uniform(3, 6)
      points.append((points[-1][0] + step * np.cos(heading), points[-1][1] + step * np.sin(heading)))
    branch_at = points[len(points) // 2]
    branch = [branch_at] + [(branch_at[0] + k * 4 * np.cos(heading + 1.2), branch_at[1] + k * 4 * np.sin(heading + 1.2))
                            for k in range(1, 5)]

    def draw(d):
      d.line(points, fill=255, width=2)
      d.line(branch, fill=255, width=2)
    mask = _draw_mask(size, draw)
    out[mask] = 0.3 * out[mask] * 0.3 + 0.02
  elif defect == "missing_pattern":
    mask = np.zeros((size, size), bool)
    h, w = rng.integers(14, 30, 2)
    top, left = rng.integers(int(0.15 * size), int(0.85 * size) - 30, 2)
    mask[top:top + h, left:left + w] = True
    out[mask] = mean_colour + rng.normal(0, 0.01, (int(mask.sum()), 3))
  else:
    raise ValueError(f"unknown defect {defect}")
  return np.clip(out, 0, 1), mask


def _save_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8)).save(path)


def _generate_subclass(root, category, sub: Subclass):
  base = os.path.join(root, category, sub.name)
  os.makedirs(os.path.join(base, "train", "good"), exist_ok=True)
  if sub.seen:
    for i in range(TRAIN_PER_SUBCLASS):
      _save_png(os.path.join(base, "train", "good", f"{i:03d}.png"), texture(sub, _rng(category, sub.name, "train", i)))
  for i in range(TEST_GOOD_PER_SUBCLASS):
    _save_png(os.path.join(base, "test", "good", f"{i:03d}.png"), texture(sub, _rng(category, sub.name, "good", i)))
  for i in range(TEST_DEFECTS_PER_SUBCLASS):
    defect = DEFECTS[i % len(DEFECTS)]
    rng = _rng(category, sub.name, "defect", i)
    image, mask = add_defect(texture(sub, rng), defect, rng)
    _save_png(os.path.join(base, "test", defect, f"{i:03d}.png"), image)
    Image.fromarray(mask.astype(np.uint8) * 255).save(
        _ensure(os.path.join(base, "ground_truth", defect, f"{i:03d}_mask.png")))


def _ensure(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return path


def ensure_generated(root: str = "") -> str:
  """Path of the built-in dataset, generating it first if needed (a few seconds)."""
  target = root or os.path.join(io_utils.cache_dir("synthetic"), VERSION)
  if os.path.exists(os.path.join(target, "COMPLETE")):
    return target
  parent = os.path.dirname(os.path.abspath(target))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=".synthetic-")
  try:
    for category, subclasses in CATEGORIES.items():
      for sub in subclasses:
        _generate_subclass(tmp, category, sub)
    open(os.path.join(tmp, "COMPLETE"), "w").write(VERSION + "\n")
    if os.path.exists(os.path.join(target, "COMPLETE")):
      return target  # another process (a multi-process run) finished first; keep its copy
    if os.path.exists(target):
      shutil.rmtree(target)  # an interrupted earlier generation
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  return target

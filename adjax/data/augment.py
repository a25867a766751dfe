"""Random image augmentations that run on the device, inside a jitted training step.

Each op maps (images (B, H, W, C) float, key) -> (augmented images, mask (B, H, W) bool of the
pixels it changed), draws everything from `key` (a new key each step gives new draws) and has
static shapes, so it traces once. Methods pick them by name through `OPS`. `downscale` is no
op but the deterministic resize that random-scale sampling applies on the device.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np


def _downscale_axis(x, axis: int, factor: int):
  """jax.image.resize's antialiased linear (triangle) filter along `axis` by an integer factor: the
  same weights (a triangle of half-width `factor` around each output pixel's centre, its taps inside
  the image normalised to sum 1), applied as 2 * factor strided slices instead of a dense matrix."""
  n = x.shape[axis]
  m = n // factor
  centre = (factor - 1) / 2  # output j's centre in the input is j * factor + centre
  taps = np.arange(-factor, 2 * factor)
  w = np.maximum(0.0, 1.0 - np.abs(taps - centre) / factor)
  taps, w = taps[w > 0], w[w > 0]
  position = np.arange(m)[None, :] * factor + taps[:, None]  # (taps, m): the input index of each tap
  weights = np.where((position >= 0) & (position < n), w[:, None], 0.0)
  weights = (weights / weights.sum(axis=0, keepdims=True)).astype(x.dtype)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (-taps[0], taps[-1] - (factor - 1))
  padded = jnp.pad(x, pad)
  shape = [1] * x.ndim
  shape[axis] = m
  out = 0.0
  for k, t in enumerate(taps):
    start = t - taps[0]
    tap = jax.lax.slice_in_dim(padded, start, start + factor * (m - 1) + 1, factor, axis)
    out = out + tap * jnp.asarray(weights[k]).reshape(shape)
  return out


def downscale(images, height: int, width: int):
  """jax.image.resize(images (B, H, W, C), (B, height, width, C), 'linear', antialias=True), by taps
  when H and W are whole multiples of height and width (without the dense resize matrices, whose
  products dominate a large downscale's cost), otherwise by jax.image.resize itself."""
  b, h, w, c = images.shape
  if h % height or w % width:
    return jax.image.resize(images, (b, height, width, c), method="linear", antialias=True)
  out = images if h == height else _downscale_axis(images, 1, h // height)
  return out if w == width else _downscale_axis(out, 2, w // width)


def _rectangles(key, b, count, h, w, area_fraction, aspect_range):
  """`count` rectangles per image, (b, count) arrays (height, width) in pixels, each of about
  area_fraction * h * w pixels with log-uniform aspect ratio in aspect_range."""
  area = area_fraction * h * w
  log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
  aspect = jnp.exp(jax.random.uniform(key, (b, count), minval=log_lo, maxval=log_hi))
  heights = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h).astype(jnp.int32)
  widths = jnp.clip(jnp.round(area / heights), 1, w).astype(jnp.int32)
  return heights, widths


def _inside(y0, x0, heights, widths, h, w):
  """(B, H, W) masks of the rectangles [y0, y0 + height) x [x0, x0 + width), per image (B,)."""
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  return ((rows >= y0[:, None, None]) & (rows < (y0 + heights)[:, None, None])
          & (cols >= x0[:, None, None]) & (cols < (x0 + widths)[:, None, None]))


def patch_budget(total_fraction: float, max_patch_fraction: float) -> tuple:
  """(patch slots, area fraction of each): the fewest patches of at most max_patch_fraction
  of the image that together cover total_fraction of it (FEGAN Sec. III-D)."""
  count = max(1, math.ceil(total_fraction / max_patch_fraction - 1e-9))
  return count, total_fraction / count


def self_copy_paste(images, key, total_fraction=0.2, max_patch_fraction=0.01, aspect_range=(1 / 3, 3.0),
                    jitter=0.2):
  """FEGAN's M-SE (eq. 2, Sec. III-D): rectangles of random aspect ratio (the multi-scale of its
  name; every patch of the same area, patch_budget's) copied from the image itself,
  colour-jittered (per patch and channel: gain 1 + U(-jitter, jitter), offset U(-jitter,
  jitter) in the images' units) and pasted at random positions. Each patch covers
  at most max_patch_fraction of the image and all together total_fraction of it (the sum of
  the patches' areas; overlaps are allowed, as in Table 5's 100%). Patches copy from the
  original image, not from earlier pastes."""
  b, h, w, c = images.shape
  count, fraction = patch_budget(total_fraction, max_patch_fraction)
  k_shape, k_src_y, k_src_x, k_dst_y, k_dst_x, k_gain, k_offset = jax.random.split(key, 7)
  heights, widths = _rectangles(k_shape, b, count, h, w, fraction, aspect_range)
  src_y = jax.random.randint(k_src_y, (b, count), 0, h - heights + 1)
  src_x = jax.random.randint(k_src_x, (b, count), 0, w - widths + 1)
  dst_y = jax.random.randint(k_dst_y, (b, count), 0, h - heights + 1)
  dst_x = jax.random.randint(k_dst_x, (b, count), 0, w - widths + 1)
  gain = 1.0 + jax.random.uniform(k_gain, (b, count, c), minval=-jitter, maxval=jitter)
  offset = jax.random.uniform(k_offset, (b, count, c), minval=-jitter, maxval=jitter)
  rows, cols = jnp.arange(h), jnp.arange(w)

  def paste(k, carry):
    out, mask = carry
    inside = _inside(dst_y[:, k], dst_x[:, k], heights[:, k], widths[:, k], h, w)
    # Pixel (y, x) of the pasted patch is pixel (y - dst_y + src_y, x - dst_x + src_x) of the image.
    src_rows = jnp.clip(rows[None] - dst_y[:, k, None] + src_y[:, k, None], 0, h - 1)  # (B, H)
    src_cols = jnp.clip(cols[None] - dst_x[:, k, None] + src_x[:, k, None], 0, w - 1)  # (B, W)
    shifted = jax.vmap(lambda img, r, cc: img[r][:, cc])(images, src_rows, src_cols)
    jittered = shifted * gain[:, k, None, None, :] + offset[:, k, None, None, :]
    return jnp.where(inside[..., None], jittered, out), mask | inside

  return jax.lax.fori_loop(0, count, paste, (images, jnp.zeros((b, h, w), bool)))


def cutout(images, key, total_fraction=0.2, max_patch_fraction=0.01, aspect_range=(1.0, 1.0), colour=False):
  """Cutout (DeVries and Taylor 2017; FEGAN Table 6): the same patch budget as self_copy_paste,
  filled with zeros (the normalised mean), or with one random colour per patch (`colour`)."""
  b, h, w, c = images.shape
  count, fraction = patch_budget(total_fraction, max_patch_fraction)
  k_shape, k_y, k_x, k_colour = jax.random.split(key, 4)
  heights, widths = _rectangles(k_shape, b, count, h, w, fraction, aspect_range)
  y0 = jax.random.randint(k_y, (b, count), 0, h - heights + 1)
  x0 = jax.random.randint(k_x, (b, count), 0, w - widths + 1)
  fill = jnp.zeros((b, count, c))
  if colour:
    fill = jax.random.uniform(k_colour, (b, count, c), minval=-2.0, maxval=2.0)

  def paste(k, carry):
    out, mask = carry
    inside = _inside(y0[:, k], x0[:, k], heights[:, k], widths[:, k], h, w)
    return jnp.where(inside[..., None], fill[:, k, None, None, :], out), mask | inside

  return jax.lax.fori_loop(0, count, paste, (images, jnp.zeros((b, h, w), bool)))


def grid_mask(images, key, cell=16, drop_fraction=0.3):
  """RIAD's masks (Zavrtanik et al. 2021; FEGAN Table 6): the image cut into non-overlapping
  cell x cell squares, each removed (set to zero) with probability drop_fraction."""
  b, h, w, _ = images.shape
  cells = jax.random.bernoulli(key, drop_fraction, (b, -(-h // cell), -(-w // cell)))
  mask = jnp.repeat(jnp.repeat(cells, cell, axis=1), cell, axis=2)[:, :h, :w]
  return jnp.where(mask[..., None], 0.0, images), mask


def stripe_mask(images, key, widths=(2, 4, 8, 16), stripes=4):
  """SCADN's masks (Yan et al. 2021; FEGAN Table 6): per image, horizontal or vertical stripes
  of one of `widths` pixels, `stripes` of them at random offsets, set to zero."""
  b, h, w, _ = images.shape
  k_dir, k_width, k_pos = jax.random.split(key, 3)
  vertical = jax.random.bernoulli(k_dir, 0.5, (b,))
  width = jnp.asarray(widths)[jax.random.randint(k_width, (b,), 0, len(widths))]
  side = jnp.where(vertical, w, h)
  start = (jax.random.uniform(k_pos, (b, stripes)) * (side - width)[:, None]).astype(jnp.int32)
  rows, cols = jnp.arange(h)[None, :, None, None], jnp.arange(w)[None, None, :, None]
  along = jnp.where(vertical[:, None, None, None], cols, rows)  # (B, H, W, 1) after broadcasting
  hit = (along >= start[:, None, None, :]) & (along < (start + width[:, None])[:, None, None, :])
  mask = jnp.broadcast_to(hit.any(axis=-1), (b, h, w))
  return jnp.where(mask[..., None], 0.0, images), mask


def random_erasing(images, key, area_range=(0.02, 0.4), aspect_range=(0.3, 1 / 0.3), window=None, fill="noise"):
  """Random erasing (Zhong et al. 2020, Alg. 1): one rectangle per image of area_range of the
  area (of a window x window square when `window` (B,) pixels is given, else of the image) and
  aspect ratio uniform in aspect_range, at a uniform position, filled with uniform noise in
  [0, 1] (fill='noise'), or with the same image's pixels of another rectangle of its size at a
  uniform position (fill='copy': CutPaste, Li et al. 2021, a defect made of the image's own
  content). Alg. 1 redraws a rectangle that does not fit; here its sides are clipped to the image."""
  if fill not in ("noise", "copy"):
    raise ValueError(f"random_erasing's fill must be 'noise' or 'copy', not {fill!r}")
  b, h, w, c = images.shape
  k_area, k_aspect, k_y, k_x, k_fill = jax.random.split(key, 5)
  base = jnp.full((b,), float(h * w)) if window is None else jnp.asarray(window, jnp.float32) ** 2
  area = jax.random.uniform(k_area, (b,), minval=area_range[0], maxval=area_range[1]) * base
  aspect = jax.random.uniform(k_aspect, (b,), minval=aspect_range[0], maxval=aspect_range[1])
  heights = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, h).astype(jnp.int32)
  widths = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, w).astype(jnp.int32)
  y0 = (jax.random.uniform(k_y, (b,)) * (h - heights + 1)).astype(jnp.int32)
  x0 = (jax.random.uniform(k_x, (b,)) * (w - widths + 1)).astype(jnp.int32)
  mask = _inside(y0, x0, heights, widths, h, w)
  if fill == "noise":
    source = jax.random.uniform(k_fill, images.shape, images.dtype)
  else:
    k_sy, k_sx = jax.random.split(k_fill)
    sy = (jax.random.uniform(k_sy, (b,)) * (h - heights + 1)).astype(jnp.int32)
    sx = (jax.random.uniform(k_sx, (b,)) * (w - widths + 1)).astype(jnp.int32)
    # Pixel (y, x) of the rectangle is pixel (y - y0 + sy, x - x0 + sx) of the same image.
    rows = jnp.clip(jnp.arange(h)[None] - y0[:, None] + sy[:, None], 0, h - 1)
    cols = jnp.clip(jnp.arange(w)[None] - x0[:, None] + sx[:, None], 0, w - 1)
    source = jax.vmap(lambda img, r, cc: img[r][:, cc])(images, rows, cols)
  return jnp.where(mask[..., None], source, images), mask


def none(images, key):
  del key
  return images, jnp.zeros(images.shape[:3], bool)


OPS = {"mse": self_copy_paste, "cutout": cutout, "cutout_colour": lambda x, k, **kw: cutout(x, k, colour=True, **kw),
       "riad": grid_mask, "scadn": stripe_mask, "erasing": random_erasing,
       "none": none}

"""Image and mask files: reading them with errors that name the file; the geometry and pixel
preprocessing (crop / squash / pad, normalisation, maps back to the image) are
adjax/data/geometry.py's, re-exported here.
"""

import contextlib

import numpy as np
from PIL import Image, UnidentifiedImageError

from adjax.data.geometry import (  # noqa: F401  (re-exported)
  RESIZE_MODES,
  WHOLE_IMAGE,
  UnsupportedImage,
  content_box,
  input_side,
  kept_fraction,
  limited_size,
  mask_at,
  normalise_uint8,
  open_upright,
  preprocess_image,
  preprocess_mask,
  to_original,
  to_rgb,
  upright_size,
)
from adjax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@contextlib.contextmanager
def _reading(path: str, what: str):
  """Errors from reading the file at `path` as DataErrors that name it and say what to do."""
  try:
    yield
  except FileNotFoundError:
    raise DataError(f"The {what} {path} does not exist. Restore it, or remove it from the dataset.") from None
  except UnsupportedImage as e:
    raise DataError(f"The {what} {e}") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"The {what} {path} cannot be read as an image ({e}). Replace it with an intact "
                    "copy, or remove it from its folder.") from None


def _open(path: str, what: str) -> Image.Image:
  with _reading(path, what):
    return open_upright(path)  # decoded now, so truncated files fail here, naming the file


def load_image(path: str) -> Image.Image:
  return to_rgb(_open(path, "image"))


def load_mask(path: str) -> np.ndarray:
  """A ground-truth mask as bool HxW: any non-zero pixel is anomalous (VisA uses ids 1..n); in a
  JPEG, whose compression rings around a mask's edges with small non-zero values, values above 127."""
  image = _open(path, "mask")
  mask = np.asarray(image)
  if mask.ndim == 3:
    mask = mask[..., :3].max(axis=-1) if mask.shape[-1] >= 3 else mask[..., 0]
  return mask > (127 if image.format in ("JPEG", "MPO") else 0)


def image_size_of(path: str, what: str = "image") -> tuple[int, int]:
  """(width, height) as `load_image` gives it, from the file header, and a cheap integrity check of the file."""
  with _reading(path, what), Image.open(path) as image:
    size = upright_size(image, path)
    image.verify()
    return size

"""Image and mask decoding and preprocessing, matching torchvision's transforms.

`preprocess_image` = torchvision Resize(image_size) (shorter side, PIL bilinear with
antialiasing) + CenterCrop(crop_size) + ToTensor + Normalize(mean, std), returned HWC.
"""

import numpy as np
from PIL import Image, UnidentifiedImageError

from adjax.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _open(path: str, what: str) -> Image.Image:
  try:
    image = Image.open(path)
    image.load()  # decode now, so truncated files fail here, naming the file
    return image
  except FileNotFoundError:
    raise DataError(f"The {what} {path} does not exist. Restore it, or remove it from the dataset.") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"The {what} {path} cannot be read as an image ({e}). Replace it with an intact "
                    "copy, or delete it from the dataset folder.") from None


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL image as 8-bit RGB: grayscale is replicated, alpha dropped, 16-bit scaled."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    array = np.asarray(image).astype(np.float64)
    # 16-bit images use the full 0..65535 range; int32 'I' images from 16-bit PNGs too.
    array = np.clip(array / 257.0, 0, 255).round().astype(np.uint8)
    image = Image.fromarray(array, mode="L")
  elif image.mode == "F":
    array = np.asarray(image, dtype=np.float64)
    scale = 255.0 if array.max() <= 1.0 else 1.0
    image = Image.fromarray(np.clip(array * scale, 0, 255).round().astype(np.uint8), mode="L")
  if image.mode == "RGB":
    return image
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    image = image.convert("RGBA")
    return image.convert("RGB")  # drop alpha: inspection images carry no meaning in it
  return image.convert("RGB")


def load_image(path: str) -> Image.Image:
  return to_rgb(_open(path, "image"))


def load_mask(path: str) -> np.ndarray:
  """A ground-truth mask as bool HxW: any non-zero pixel is anomalous (VisA uses ids 1..n)."""
  mask = np.asarray(_open(path, "mask"))
  if mask.ndim == 3:
    mask = mask[..., :3].max(axis=-1) if mask.shape[-1] >= 3 else mask[..., 0]
  return mask > 0


def image_size_of(path: str, what: str = "image") -> tuple[int, int]:
  """(width, height) from the file header, and a cheap integrity check of the file."""
  try:
    with Image.open(path) as image:
      size = image.size
      image.verify()
    return size
  except FileNotFoundError:
    raise DataError(f"The {what} {path} does not exist. Restore it, or remove it from the dataset.") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"The {what} {path} cannot be read as an image ({e}). Replace it with an intact "
                    "copy, or delete it from the dataset folder.") from None


def _resize_shorter(image: Image.Image, size: int, resample) -> Image.Image:
  w, h = image.size
  if (w <= h and w == size) or (h <= w and h == size):
    return image
  if w <= h:
    return image.resize((size, int(size * h / w)), resample)
  return image.resize((int(size * w / h), size), resample)


def _center_crop(array: np.ndarray, crop: int) -> np.ndarray:
  h, w = array.shape[:2]
  if h < crop or w < crop:
    raise ValueError(f"crop {crop} larger than resized image {h}x{w}; set data.crop_size <= data.image_size")
  top = int(round((h - crop) / 2.0))
  left = int(round((w - crop) / 2.0))
  return array[top:top + crop, left:left + crop]


def preprocess_image(image: Image.Image, image_size: int, crop_size: int, mean, std) -> np.ndarray:
  """Resized, cropped and normalised float32 (H, W, 3); with mean=None the uint8 pixels instead
  (the same resize and crop: normalise_uint8 of them is this function's float result)."""
  image = _resize_shorter(to_rgb(image), image_size, Image.BILINEAR)
  if mean is None:
    return _center_crop(np.asarray(image, dtype=np.uint8), crop_size)
  array = _center_crop(np.asarray(image, dtype=np.float32) / 255.0, crop_size)
  return ((array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def normalise_uint8(images, mean, std, xp=np):
  """preprocess_image's normalisation of uint8 pixels, in numpy or (xp=jax.numpy) on the device."""
  array = images.astype(xp.float32) / 255.0
  return (array - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def preprocess_mask(mask: np.ndarray, image_size: int, crop_size: int) -> np.ndarray:
  """Resize a bool mask like its image, then binarise at 0.5."""
  resized = _resize_shorter(Image.fromarray(mask.astype(np.float32), mode="F"), image_size, Image.BILINEAR)
  return (_center_crop(np.asarray(resized), crop_size) >= 0.5).astype(np.float32)


def denormalise(image: np.ndarray, mean, std) -> np.ndarray:
  """Inverse of the normalisation, as uint8 RGB, for overlays."""
  array = image * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
  return np.clip(array * 255.0, 0, 255).round().astype(np.uint8)

"""Image geometry and pixel preprocessing, matching torchvision's transforms: pure PIL and numpy.

`preprocess_image` brings an image of any shape to the model's square input, by `resize`:
  crop    torchvision Resize(image_size) (shorter side, PIL bilinear with antialiasing) +
          CenterCrop(crop_size): the papers' MVTec protocol; a non-square image loses its ends
  squash  the whole image resized to image_size x image_size (aspect ratio not kept)
  pad     the whole image resized so its longer side is image_size, centred and padded to a
          square by repeating its edge pixels (aspect ratio kept; the padding is never scored)
then ToTensor + Normalize(mean, std), returned HWC. `to_original` takes a map of the model's
input back to the image's own pixels in the two whole-image modes.

This module imports nothing from adjax: `--mode=export` copies it beside an exported scorer,
whose loader preprocesses images with exactly this code.
"""

import logging

import numpy as np
import PIL
from PIL import Image, ImageOps

_ORIENTATION = 0x0112  # the EXIF (and TIFF) tag; values 5-8 turn the image by 90 degrees
_COMPRESSION = 259  # the TIFF tag; 1 is uncompressed
_warned = {"low_bits": False}  # warnings given once per process


class UnsupportedImage(ValueError):
  """A file this code would read wrongly; the message names it and says what to do."""


def open_upright(path: str) -> Image.Image:
  """The decoded image as viewers show it: turned or mirrored by its EXIF orientation, as OpenCV's imread does.

  A camera or an image viewer that records a rotation in the tag leaves the pixels unturned, so
  without this the model would see such an image on its side (and its mask, drawn on the shown
  image, would not fit it)."""
  image = Image.open(path)
  _refuse_misread(image, path)
  image.load()
  if _orientation(image) != 1:
    ImageOps.exif_transpose(image, in_place=True)  # in place keeps `filename` for the warnings
  return image


def upright_size(image: Image.Image, path: str) -> tuple[int, int]:
  """(width, height) of `open_upright(path)`, from the header of `image`, opened and not yet decoded."""
  _refuse_misread(image, path)
  w, h = image.size
  return (h, w) if _orientation(image) in (5, 6, 7, 8) else (w, h)


def _orientation(image: Image.Image) -> int:
  """The orientation still to apply: Pillow turns TIFF images itself (their `size` is already upright).

  Pillow decodes a whole PNG to look for an eXIf chunk after its pixels; before decoding, one placed
  ahead of them (where the PNG extension puts it) is already in `info`."""
  if image.format == "TIFF" or (image.format == "PNG" and "exif" not in image.info):
    return 1
  return image.getexif().get(_ORIENTATION, 1)


def _refuse_misread(image: Image.Image, path: str) -> None:
  # Pillow (13.0 at least) decodes an uncompressed one-channel TIFF turned by 90 degrees by its orientation
  # tag with the wrong row length: scrambled pixels and no error (tests/test_data.py shows it).
  if (image.format == "TIFF" and len(image.getbands()) == 1 and image.tag_v2.get(_COMPRESSION, 1) == 1
      and image.tag_v2.get(_ORIENTATION, 1) in (5, 6, 7, 8)):
    raise UnsupportedImage(
        f"{path} is an uncompressed one-channel TIFF whose orientation tag turns it by 90 degrees, which "
        f"Pillow {PIL.__version__} reads wrongly. Save it as PNG or as a compressed (LZW) TIFF.")


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL image as 8-bit RGB: grayscale is replicated, alpha dropped, 16-bit scaled."""
  if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
    array = np.asarray(image).astype(np.float64)
    # 16-bit images use the full 0..65535 range; int32 'I' images from 16-bit PNGs too.
    _warn_if_low_bits(image, array.max())
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


def _warn_if_low_bits(image: Image.Image, largest: float) -> None:
  """Once per process: a 16-bit image within 0..4095 (12-bit camera data, say) keeps at most 16 grey levels."""
  if 0 < largest < 4096 and not _warned["low_bits"]:
    _warned["low_bits"] = True
    logging.getLogger("adjax").warning(
        "%s is a 16-bit image whose largest value is %d: read as 8-bit (value / 257) it keeps %d grey levels. If "
        "it holds 10- or 12-bit camera data, convert the images to 8-bit at that depth (value / 4 or / 16) first.",
        getattr(image, "filename", "") or "An image", largest, int(largest // 257) + 1)


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


RESIZE_MODES = ("crop", "squash", "pad")
WHOLE_IMAGE = ("squash", "pad")


def input_side(resize: str, image_size: int, crop_size: int) -> int:
  """The model's square input side: the crop in 'crop' mode, else image_size."""
  return crop_size if resize == "crop" else image_size


def content_box(width: int, height: int, resize: str, image_size: int) -> tuple:
  """(top, left, rows, cols) of the image's own pixels inside the model input, whole-image modes."""
  if resize == "squash":
    return 0, 0, image_size, image_size
  scale = image_size / max(width, height)
  rows, cols = max(1, round(height * scale)), max(1, round(width * scale))
  return (image_size - rows) // 2, (image_size - cols) // 2, rows, cols


def kept_fraction(width: int, height: int, resize: str, image_size: int, crop_size: int) -> float:
  """The share of an image's pixels the model input covers: 1 in whole-image modes; the centre
  crop's share of the resized image in 'crop' mode."""
  if resize != "crop":
    return 1.0
  short, long = sorted((width, height))
  resized_long = image_size * long / short
  return min(1.0, crop_size / image_size) * min(1.0, crop_size / resized_long)


def _fit(image: Image.Image, resize: str, image_size: int, crop_size: int, resample):
  """The PIL image resized by `resize`, and for 'pad' its box in the square input."""
  if resize == "crop":
    return _resize_shorter(image, image_size, resample), None
  if resize == "squash":
    return (image if image.size == (image_size, image_size) else image.resize((image_size, image_size), resample)), None
  top, left, rows, cols = content_box(*image.size, resize, image_size)
  return (image if image.size == (cols, rows) else image.resize((cols, rows), resample)), (top, left, rows, cols)


def _to_square(array: np.ndarray, resize: str, image_size: int, crop_size: int, box, mode="edge") -> np.ndarray:
  if resize == "crop":
    return _center_crop(array, crop_size)
  if resize == "pad":
    top, left, rows, cols = box
    pad = ((top, image_size - rows - top), (left, image_size - cols - left)) + ((0, 0),) * (array.ndim - 2)
    return np.pad(array, pad, mode=mode)
  return array


def preprocess_image(image: Image.Image, image_size: int, crop_size: int, mean, std,
                     resize: str = "crop") -> np.ndarray:
  """Resized (by `resize`) and normalised float32 (S, S, 3); with mean=None the uint8 pixels instead
  (the same geometry: normalise_uint8 of them is this function's float result)."""
  image, box = _fit(to_rgb(image), resize, image_size, crop_size, Image.BILINEAR)
  if mean is None:
    return _to_square(np.asarray(image, dtype=np.uint8), resize, image_size, crop_size, box)
  array = _to_square(np.asarray(image, dtype=np.float32) / 255.0, resize, image_size, crop_size, box)
  return ((array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def normalise_uint8(images, mean, std, xp=np):
  """preprocess_image's normalisation of uint8 pixels, in numpy or (xp=jax.numpy) on the device."""
  array = images.astype(xp.float32) / 255.0
  return (array - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def preprocess_mask(mask: np.ndarray, image_size: int, crop_size: int, resize: str = "crop") -> np.ndarray:
  """Resize a bool mask like its image, then binarise at 0.5 (padding: never anomalous)."""
  resized, box = _fit(Image.fromarray(mask.astype(np.float32), mode="F"), resize, image_size, crop_size,
                      Image.BILINEAR)
  return (_to_square(np.asarray(resized), resize, image_size, crop_size, box, mode="constant") >= 0.5).astype(
      np.float32)


def to_original(amap: np.ndarray, width: int, height: int, resize: str, max_side: int = 0) -> np.ndarray:
  """A whole-image mode's (S, S) map at the image's own size (width x height), bilinear; with
  max_side > 0, at most max_side pixels on the longer side (aspect kept)."""
  side = amap.shape[0]
  top, left, rows, cols = content_box(width, height, resize, side)
  content = np.asarray(amap, np.float32)[top:top + rows, left:left + cols]
  out_w, out_h = limited_size(width, height, max_side)
  return np.asarray(Image.fromarray(content, mode="F").resize((out_w, out_h), Image.BILINEAR))


def limited_size(width: int, height: int, max_side: int = 0) -> tuple:
  """(width, height) scaled down so that the longer side is at most max_side (0: unchanged)."""
  if max_side <= 0 or max(width, height) <= max_side:
    return width, height
  scale = max_side / max(width, height)
  return max(1, round(width * scale)), max(1, round(height * scale))


def mask_at(mask: np.ndarray, width: int, height: int) -> np.ndarray:
  """A bool mask at (width, height) (nearest neighbour when it must shrink)."""
  if mask.shape == (height, width):
    return mask
  return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)) > 127

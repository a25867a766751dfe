"""grain input pipelines: records -> decoded, resized, cropped, normalised, batched arrays.

Each element is a dict of numpy arrays:
  image (H, W, 3) float32, normalised with the given mean/std (uint8 pixels when mean is None)
  mask  (H, W) float32 in {0, 1} (zeros where there is no mask)
  label () int32, index () int32 (position in the record list), subclass () int32,
  size  (2,) int32: the image file's own (width, height)
H = W = the model's input side (transforms.input_side), by the `resize` mode.
Shuffling is deterministic from (seed, epoch). For multi-host runs each JAX process
reads its own shard (`shard_index`/`shard_count`, by default this process's).
"""

import dataclasses
import os
from collections.abc import Sequence

import grain
import jax
import numpy as np
from absl import flags

from adjax.data import transforms
from adjax.data.datasets import Record


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """Picklable per-element work, so grain worker processes can run it."""
  records: tuple
  image_size: int
  crop_size: int
  mean: tuple
  std: tuple
  subclass_ids: tuple  # subclass name per id
  resize: str = "crop"

  def __call__(self, index: int) -> dict:
    record: Record = self.records[index]
    image = transforms.load_image(record.path)
    array = transforms.preprocess_image(image, self.image_size, self.crop_size, self.mean, self.std, self.resize)
    if record.mask_path is not None:
      mask = transforms.preprocess_mask(transforms.load_mask(record.mask_path), self.image_size, self.crop_size,
                                        self.resize)
    else:
      mask = np.zeros(array.shape[:2], np.float32)
    subclass = self.subclass_ids.index(record.subclass) if record.subclass in self.subclass_ids else -1
    return {"image": array, "mask": mask, "label": np.int32(record.label), "index": np.int32(index),
            "subclass": np.int32(subclass), "size": np.asarray(image.size, np.int32)}


def make_dataset(records: Sequence[Record], *, image_size: int, crop_size: int, mean, std, batch_size: int,
                 shuffle: bool = False, seed: int = 0, epoch: int = 0, drop_remainder: bool = False,
                 worker_count: int = 0, subclass_ids: Sequence[str] = (), shard_index: int | None = None,
                 shard_count: int | None = None, resize: str = "crop") -> grain.IterDataset:
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  preprocess = Preprocess(tuple(records), image_size, crop_size, None if mean is None else tuple(mean),
                          None if std is None else tuple(std), tuple(subclass_ids), resize)
  indices = grain.MapDataset.range(len(records))
  if shuffle:
    indices = indices.shuffle(seed=seed + 1_000_003 * epoch)
  indices = indices[shard_index::shard_count]
  if worker_count == 0:
    # Decode single images on threads, batch after: PIL releases the GIL while decoding and
    # resizing, so this scales with the cores; batching first would decode a batch's images
    # one after another on one thread.
    threads = decode_threads()
    return indices.map(preprocess).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads + batch_size)).batch(
            batch_size, drop_remainder=drop_remainder)
  # Worker processes each take whole batches (grain slices the dataset before mp_prefetch
  # by its top-level elements and interleaves them back in order).
  dataset = indices.map(preprocess).batch(batch_size, drop_remainder=drop_remainder)
  iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2 * worker_count, prefetch_buffer_size=4))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; outside absl.app nobody parsed them
  return iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))


def decode_threads() -> int:
  """Threads that decode images in the main process: one per core, at least 2, at most 16."""
  return max(2, min(16, os.cpu_count() or 2))


def num_batches(num_records: int, batch_size: int, drop_remainder: bool = False, shard_count: int = 1) -> int:
  per_shard = -(-num_records // shard_count)
  return per_shard // batch_size if drop_remainder else -(-per_shard // batch_size)


def pad_batch(images: np.ndarray, batch_size: int) -> np.ndarray:
  """`images` with zero images appended up to `batch_size`, so that a dataset's short last
  batch reuses the full batches' compiled program instead of compiling its own (each
  backbone compile costs seconds, more on a GPU). Callers drop the padded rows; every
  extractor and scorer treats images independently (inference-mode BatchNorm), so the real
  rows are unchanged."""
  missing = batch_size - len(images)
  if missing <= 0:
    return images
  return np.concatenate([images, np.zeros((missing,) + images.shape[1:], images.dtype)])

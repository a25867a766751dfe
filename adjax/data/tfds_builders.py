"""TFDS builders for MVTec AD and VisA, read from the official archives in a manual directory.

Optional (`pip install -e ".[tfds]"`, no TensorFlow needed): the folder readers in
datasets.py stay the default path. The builders enumerate files with those same readers,
so the layouts and bad-input errors are shared, and write array_record files that
`tfds.data_sources` serves as random-access grain data sources:

    builder = tfds_builders.MvtecAd(config="bottle", data_dir=DIR)
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=ARCHIVES))
    source = tfds_builders.grain_source("mvtec_ad/bottle", "test", data_dir=DIR)
    dataset = grain.MapDataset.source(source)  # dataset[i]["image"]: uint8 HxWx3

Manual directory contents: `mvtec_anomaly_detection.tar.xz` (or the unpacked folder
`mvtec_anomaly_detection/`), `VisA_20220922.tar` (or `VisA/`).
"""

import io
import os
import tarfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from adjax.data import datasets, transforms
from adjax.errors import DataError

MVTEC_CATEGORIES = ("bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                    "screw", "tile", "toothbrush", "transistor", "wood", "zipper")
VISA_CATEGORIES = ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
                   "pcb2", "pcb3", "pcb4", "pipe_fryum")


def _features():
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "mask": tfds.features.Image(shape=(None, None, 1)),  # all zeros for normal images
      "label": tfds.features.ClassLabel(names=["normal", "anomaly"]),
      "defect_type": tfds.features.Text(),
      "filename": tfds.features.Text(),
  })


def _locate(manual_dir, archive_name, folder_name, dl_manager):
  folder = os.path.join(manual_dir, folder_name)
  if os.path.isdir(folder):
    return folder
  archive = os.path.join(manual_dir, archive_name)
  if not os.path.exists(archive):
    raise DataError(f"Neither {archive} nor {folder} exists. Put the official archive in the manual "
                    "directory (tfds DownloadConfig(manual_dir=...)).")
  extracted = os.path.join(str(dl_manager.download_dir), "extracted", os.path.basename(archive))
  if not os.path.exists(os.path.join(extracted, ".complete")):
    try:
      with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    except (tarfile.TarError, OSError, EOFError) as e:
      raise DataError(f"The archive {archive} cannot be extracted ({e}). Download it again.") from None
    open(os.path.join(extracted, ".complete"), "w").close()
  inner = os.path.join(extracted, folder_name)
  return inner if os.path.isdir(inner) else extracted


def _png(array: np.ndarray) -> bytes:
  """PNG bytes: tfds encodes numpy images with TensorFlow, but takes encoded bytes as they are."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def _examples(records):
  for record in records:
    rgb = transforms.load_image(record.path)  # grayscale/16-bit categories become 8-bit RGB
    image = _png(np.asarray(rgb))
    if record.mask_path:
      mask = _png(transforms.load_mask(record.mask_path).astype(np.uint8) * 255)
    else:
      mask = _png(np.zeros((rgb.height, rgb.width), np.uint8))
    key = os.path.relpath(record.path, os.path.dirname(os.path.dirname(os.path.dirname(record.path))))
    yield key, {"image": image, "mask": mask, "label": record.label, "defect_type": record.defect_type,
                "filename": record.path}


class MvtecAd(tfds.core.GeneratorBasedBuilder):
  """MVTec AD (Bergmann et al., CVPR 2019), one config per category. CC BY-NC-SA 4.0."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Place mvtec_anomaly_detection.tar.xz (or its unpacked folder) in manual_dir."
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in MVTEC_CATEGORIES]

  def _info(self):
    return self.dataset_info_from_configs(features=_features(), supervised_keys=None)

  def _split_generators(self, dl_manager):
    root = _locate(str(dl_manager.manual_dir), "mvtec_anomaly_detection.tar.xz", "mvtec_anomaly_detection",
                   dl_manager)
    split = datasets.read_split("mvtec_ad", root, self.builder_config.name)
    return {"train": self._generate_examples(split.train), "test": self._generate_examples(split.test)}

  def _generate_examples(self, records):
    yield from _examples(records)


class Visa(tfds.core.GeneratorBasedBuilder):
  """VisA (Zou et al., ECCV 2022) with its 1cls split, one config per category. CC BY 4.0."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Place VisA_20220922.tar (or its unpacked VisA/ folder with split_csv/) in manual_dir."
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in VISA_CATEGORIES]

  def _info(self):
    return self.dataset_info_from_configs(features=_features(), supervised_keys=None)

  def _split_generators(self, dl_manager):
    root = _locate(str(dl_manager.manual_dir), "VisA_20220922.tar", "VisA", dl_manager)
    split = datasets.read_split("visa", root, self.builder_config.name)
    return {"train": self._generate_examples(split.train), "test": self._generate_examples(split.test)}

  def _generate_examples(self, records):
    yield from _examples(records)


def grain_source(name: str, split: str, data_dir: str):
  """A random-access source of a prepared builder, ready for grain.MapDataset.source."""
  return tfds.data_source(name, split=split, data_dir=data_dir)

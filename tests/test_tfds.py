"""TFDS builders: build from an archive in a manual dir (no TensorFlow), read back through grain."""

import os
import shutil
import tarfile

import grain
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets", reason="needs the [tfds] extra")

from conftest import require_bottle  # noqa: E402

from adjax.data import tfds_builders, transforms  # noqa: E402


def test_mvtec_builder_from_archive_reads_back_identical_pixels(tmp_path):
  bottle = require_bottle()
  staging = tmp_path / "staging" / "bottle"
  for sub in ("train/good", "test/good", "test/broken_small", "ground_truth/broken_small"):
    (staging / sub).mkdir(parents=True)
    for name in sorted(os.listdir(os.path.join(bottle, sub)))[:2]:
      shutil.copy(os.path.join(bottle, sub, name), staging / sub / name)
  manual = tmp_path / "manual"
  manual.mkdir()
  with tarfile.open(manual / "mvtec_anomaly_detection.tar.xz", "w:xz") as tar:
    tar.add(staging, arcname="bottle")
  data_dir = str(tmp_path / "tfds")
  builder = tfds_builders.MvtecAd(config="bottle", data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  train = grain.MapDataset.source(tfds_builders.grain_source("mvtec_ad/bottle", "train", data_dir))
  test = grain.MapDataset.source(tfds_builders.grain_source("mvtec_ad/bottle", "test", data_dir))
  assert (len(train), len(test)) == (2, 4)
  anomalous = [test[i] for i in range(len(test)) if test[i]["label"] == 1]
  assert len(anomalous) == 2
  example = anomalous[0]
  name = os.path.basename(example["filename"].decode())
  original = np.asarray(transforms.load_image(os.path.join(bottle, "test/broken_small", name)))
  np.testing.assert_array_equal(example["image"], original)
  mask = transforms.load_mask(os.path.join(bottle, "ground_truth/broken_small", name.replace(".png", "_mask.png")))
  np.testing.assert_array_equal(example["mask"][..., 0] > 0, mask)


def test_visa_builder_from_unpacked_folder(tmp_path):
  from PIL import Image
  visa = tmp_path / "manual" / "VisA"
  rng = np.random.default_rng(0)
  for rel in ("candle/Data/Images/Normal/0000.JPG", "candle/Data/Images/Anomaly/0001.JPG"):
    (visa / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(visa / rel)
  (visa / "candle/Data/Masks/Anomaly").mkdir(parents=True)
  Image.fromarray(np.full((20, 24), 3, np.uint8)).save(visa / "candle/Data/Masks/Anomaly/0001.png")
  (visa / "split_csv").mkdir()
  (visa / "split_csv/1cls.csv").write_text(
      "object,split,label,image,mask\ncandle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
      "candle,test,anomaly,candle/Data/Images/Anomaly/0001.JPG,candle/Data/Masks/Anomaly/0001.png\n")
  data_dir = str(tmp_path / "tfds")
  tfds_builders.Visa(config="candle", data_dir=data_dir).download_and_prepare(
      file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=str(visa.parent)))
  test = tfds_builders.grain_source("visa/candle", "test", data_dir)
  assert len(test) == 1 and test[0]["label"] == 1 and test[0]["mask"].all()


def test_missing_archive_names_the_file(tmp_path):
  from adjax.errors import DataError
  (tmp_path / "manual").mkdir()
  (tmp_path / "manual" / "notes.txt").write_text("not the archive")  # tfds itself rejects an empty dir
  builder = tfds_builders.MvtecAd(config="bottle", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(DataError, match="mvtec_anomaly_detection.tar.xz"):
    builder.download_and_prepare(file_format="array_record",
                                 download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))

"""Dataset readers, the grain pipeline and bad-input errors, on real and generated data."""

import json
import logging
import os
import shutil

import numpy as np
import pytest
from conftest import require_bottle
from PIL import Image

from adjax.data import datasets, pipeline, synthetic, transforms
from adjax.errors import ConfigError, DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_real_bottle_split_counts():
  split = datasets.read_split("mvtec_ad", os.path.dirname(require_bottle()), "bottle")
  assert len(split.train) == 209
  good = [r for r in split.test if r.label == 0]
  bad = [r for r in split.test if r.label == 1]
  assert (len(good), len(bad)) == (20, 63)
  assert all(r.mask_path and os.path.exists(r.mask_path) for r in bad)
  assert all(r.mask_path is None for r in good + split.train)
  assert {r.defect_type for r in bad} == {"broken_large", "broken_small", "contamination"}
  datasets.validate(split)


def test_real_bottle_pipeline_shapes_and_mask_alignment():
  split = datasets.read_split("mvtec_ad", os.path.dirname(require_bottle()), "bottle")
  bad = [r for r in split.test if r.label == 1][:4]
  batch = next(iter(pipeline.make_dataset(bad, image_size=256, crop_size=224, mean=MEAN, std=STD, batch_size=4)))
  assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.float32
  assert batch["mask"].shape == (4, 224, 224)
  assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
  for k, record in enumerate(bad):
    # Same geometry as the image: the 224 crop of the 256 resize covers original pixels
    # [56.25, 843.75) of the 900x900 image; the masked area inside it must match, scaled.
    raw = transforms.load_mask(record.mask_path)
    assert raw.shape == (900, 900)
    expected = raw[56:844, 56:844].sum() * (256 / 900) ** 2
    assert batch["mask"][k].sum() == pytest.approx(expected, rel=0.1, abs=20)


def test_mask_and_image_transform_consistently():
  # A white square on black and the same square as a mask must coincide after the transforms.
  image = np.zeros((300, 400, 3), np.uint8)
  image[100:180, 150:260] = 255
  mask = image[..., 0] > 0
  x = transforms.preprocess_image(Image.fromarray(image), 128, 112, (0, 0, 0), (1, 1, 1))
  m = transforms.preprocess_mask(mask, 128, 112)
  assert x.shape == (112, 112, 3) and m.shape == (112, 112)
  assert np.mean((x[..., 0] >= 0.5) == (m > 0.5)) > 0.995


def test_preprocess_matches_torchvision():
  tv = pytest.importorskip("torchvision.transforms")
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (300, 350, 3), dtype=np.uint8))
  reference = tv.Compose([tv.Resize(256), tv.CenterCrop(224), tv.ToTensor(), tv.Normalize(MEAN, STD)])
  expected = reference(image).numpy().transpose(1, 2, 0)
  np.testing.assert_allclose(transforms.preprocess_image(image, 256, 224, MEAN, STD), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P", "LA", "CMYK"])
def test_image_modes_become_rgb(tmp_path, mode):
  rng = np.random.default_rng(1)
  if mode == "I;16":
    image = Image.fromarray(rng.integers(0, 65536, (20, 30), dtype=np.uint16))
  else:
    image = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode)
  path = tmp_path / ("x.png" if mode != "CMYK" else "x.jpg")
  image.save(path)
  loaded = transforms.load_image(str(path))
  assert loaded.mode == "RGB" and loaded.size == (30, 20)
  if mode == "I;16":
    expected = (np.asarray(image).astype(np.float64) / 257).round()
    np.testing.assert_allclose(np.asarray(loaded)[..., 0], expected, atol=1)


def test_a_16_bit_image_holding_12_bit_data_is_warned_about_once(tmp_path, caplog, monkeypatch):
  from adjax.data import geometry
  monkeypatch.setitem(geometry._warned, "low_bits", False)
  rng = np.random.default_rng(2)
  for name, top in (("full.png", 65536), ("mono12.png", 4096), ("again.png", 4096)):
    Image.fromarray(rng.integers(0, top, (20, 30), dtype=np.uint16)).save(tmp_path / name)
  with caplog.at_level(logging.WARNING):
    transforms.load_image(str(tmp_path / "full.png"))
    assert not caplog.records  # the full 16-bit range: no warning
    for name in ("mono12.png", "again.png"):
      assert np.asarray(transforms.load_image(str(tmp_path / name))).max() <= 16  # what / 257 leaves
  assert len(caplog.records) == 1 and "mono12.png is a 16-bit image" in caplog.text and "/ 16" in caplog.text


# What a viewer shows for each EXIF orientation, written out from the EXIF specification.
_SHOWN = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
          5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
          8: lambda a: np.rot90(a, 1)}


def _save_oriented(path, array, orientation, **kwargs):
  image = Image.fromarray(array)
  exif = image.getexif()
  exif[0x0112] = orientation
  image.save(path, exif=exif.tobytes(), **kwargs)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_images_and_masks_are_read_as_their_exif_orientation_shows_them(tmp_path, orientation):
  """A photo whose camera (or viewer) recorded a rotation in the EXIF tag is read upright, so its
  mask, drawn on the image as shown, fits it; the header-only size agrees with the decoded one."""
  y, x = np.mgrid[:20, :30]
  pixels = np.stack([x * 8, y * 12, (x + 2 * y) * 3], -1).astype(np.uint8)  # smooth, so JPEG keeps it
  mask = np.zeros((20, 30), np.uint8)
  mask[2:5, 20:29] = 255
  shown, shown_mask = _SHOWN[orientation](pixels), _SHOWN[orientation](mask)
  _save_oriented(tmp_path / "x.png", pixels, orientation)
  _save_oriented(tmp_path / "x_mask.png", mask, orientation)
  _save_oriented(tmp_path / "x.jpg", pixels, orientation, quality=95)
  image = transforms.load_image(str(tmp_path / "x.png"))
  np.testing.assert_array_equal(np.asarray(image), shown)
  np.testing.assert_array_equal(transforms.load_mask(str(tmp_path / "x_mask.png")), shown_mask > 0)
  assert transforms.image_size_of(str(tmp_path / "x.png")) == image.size == (shown.shape[1], shown.shape[0])
  jpeg = np.asarray(transforms.load_image(str(tmp_path / "x.jpg")), np.float64)
  assert jpeg.shape == shown.shape and np.abs(jpeg - shown).mean() < 4  # JPEG's loss only, not a turn
  assert transforms.image_size_of(str(tmp_path / "x.jpg")) == (shown.shape[1], shown.shape[0])


def test_a_jpeg_mask_is_its_drawn_region_and_any_image_extension_is_found(tmp_path):
  root = _make_mvtec(tmp_path, size=(40, 60))
  os.remove(tmp_path / "cat/ground_truth/crack/000_mask.png")
  drawn = np.zeros((40, 60), np.uint8)
  drawn[10:20, 15:40] = 255
  Image.fromarray(drawn).save(tmp_path / "cat/ground_truth/crack/000_mask.jpeg", quality=75)
  assert (np.asarray(Image.open(tmp_path / "cat/ground_truth/crack/000_mask.jpeg")) > 0).sum() > (drawn > 0).sum()
  (record,) = [r for r in datasets.read_split("mvtec_ad", root, "cat").test if r.label == 1]
  assert record.mask_path.endswith("000_mask.jpeg")
  np.testing.assert_array_equal(transforms.load_mask(record.mask_path), drawn > 0)  # not the ringing around it


def test_a_folder_named_like_an_image_is_not_taken_for_one(tmp_path):
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "y.png")
  (tmp_path / "x.png").mkdir()
  assert datasets.images_in(str(tmp_path)) == [str(tmp_path / "y.png")]


def _stand_in_scorer(monkeypatch):
  """scorer_runtime.Scorer with a stand-in program (score: the image's mean pixel): the reading only."""
  from adjax import scorer_runtime
  def init(self, folder):
    self.meta = {"image_size": 16, "crop_size": 16, "resize": "squash"}
    self.program = type("Program", (), {"call": lambda _, x: (x.mean(axis=(1, 2, 3)), np.zeros(x.shape[:3]))})()
  monkeypatch.setattr(scorer_runtime.Scorer, "__init__", init)
  return scorer_runtime


def test_the_exported_scorer_reads_images_upright_too(tmp_path, monkeypatch):
  scorer_runtime = _stand_in_scorer(monkeypatch)
  _save_oriented(tmp_path / "x.jpg", np.zeros((20, 30, 3), np.uint8), 6)
  (result,) = scorer_runtime.Scorer("export").score([str(tmp_path / "x.jpg")])
  assert result["map"].shape == (30, 20)  # the map at the upright image's pixels


def test_the_exported_scorer_reports_an_unreadable_image_and_scores_the_others(tmp_path, monkeypatch, capsys):
  scorer_runtime = _stand_in_scorer(monkeypatch)
  paths = [str(tmp_path / n) for n in ("dark.png", "broken.png", "light.png")]
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(paths[0])
  (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
  Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(paths[2])
  with pytest.raises(SystemExit, match="1 of 3 images could not be read"):
    scorer_runtime.main(["scorer.py", "export", *paths])
  lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [line["image"] for line in lines] == paths  # in order, the broken one in its place
  assert "cannot be read as an image" in lines[1]["error"] and lines[0]["score"] < lines[2]["score"]
  with pytest.raises(OSError):  # from Python, score() raises as any reader would
    scorer_runtime.Scorer("export").score(paths)


def test_an_uncompressed_one_channel_tiff_turned_by_its_tag_is_refused(tmp_path):
  pixels = (np.arange(20 * 30).reshape(20, 30) % 251).astype(np.uint8)
  for name, compression in (("raw.tif", None), ("lzw.tif", "tiff_lzw")):
    Image.fromarray(pixels).save(tmp_path / name, tiffinfo={0x0112: 6},
                                 **({"compression": compression} if compression else {}))
  # Why it is refused: Pillow's own reading scrambles it (if this fails, Pillow reads it right and the
  # refusal in geometry._refuse_misread can go).
  assert not np.array_equal(np.asarray(Image.open(tmp_path / "raw.tif")), np.rot90(pixels, -1))
  for read in (transforms.load_image, transforms.image_size_of):
    with pytest.raises(DataError, match="raw.tif is an uncompressed one-channel TIFF.*Save it as PNG"):
      read(str(tmp_path / "raw.tif"))
  np.testing.assert_array_equal(np.asarray(transforms.load_image(str(tmp_path / "lzw.tif")))[..., 0],
                                np.rot90(pixels, -1))
  assert transforms.image_size_of(str(tmp_path / "lzw.tif")) == (20, 30)


def _make_mvtec(root, n_train=3, defects=("crack",), size=(32, 32)):
  rng = np.random.default_rng(0)
  def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
  for i in range(n_train):
    save(f"{root}/cat/train/good/{i:03d}.png", rng.integers(0, 256, size + (3,), dtype=np.uint8))
  save(f"{root}/cat/test/good/000.png", rng.integers(0, 256, size + (3,), dtype=np.uint8))
  for d in defects:
    save(f"{root}/cat/test/{d}/000.png", rng.integers(0, 256, size + (3,), dtype=np.uint8))
    mask = np.zeros(size, np.uint8)
    mask[4:9, 4:9] = 255
    save(f"{root}/cat/ground_truth/{d}/000_mask.png", mask)
  return str(root)


def test_bad_input_corrupt_image(tmp_path):
  root = _make_mvtec(tmp_path)
  bad = tmp_path / "cat/train/good/001.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
  split = datasets.read_split("mvtec_ad", root, "cat")
  with pytest.raises(DataError, match=str(bad)):
    datasets.validate(split)


def test_bad_input_truncated_image(tmp_path):
  root = _make_mvtec(tmp_path, size=(64, 64))
  path = tmp_path / "cat/test/good/000.png"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(DataError, match="000.png"):
    datasets.validate(datasets.read_split("mvtec_ad", root, "cat"))


def test_bad_input_missing_mask(tmp_path):
  root = _make_mvtec(tmp_path)
  os.remove(tmp_path / "cat/ground_truth/crack/000_mask.png")
  with pytest.raises(DataError, match="has no mask.*000_mask.png"):
    datasets.read_split("mvtec_ad", root, "cat")


def test_bad_input_mask_of_wrong_size(tmp_path):
  root = _make_mvtec(tmp_path)
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "cat/ground_truth/crack/000_mask.png")
  with pytest.raises(DataError, match="000_mask.png is 16x16 but its image"):
    datasets.validate(datasets.read_split("mvtec_ad", root, "cat"))


def test_bad_input_empty_and_missing_split_folders(tmp_path):
  root = _make_mvtec(tmp_path)
  for f in os.listdir(tmp_path / "cat/train/good"):
    os.remove(tmp_path / "cat/train/good" / f)
  with pytest.raises(DataError, match="No training images.*train/good"):
    datasets.read_split("mvtec_ad", root, "cat")
  shutil.rmtree(tmp_path / "cat/test")
  os.makedirs(tmp_path / "cat/train/good/x", exist_ok=True)
  with pytest.raises(DataError, match="test folder .*does not exist"):
    datasets.read_split("mvtec_ad", root, "cat")


def test_bad_input_missing_root_and_category(tmp_path):
  with pytest.raises(DataError, match="data.root"):
    datasets.read_split("mvtec_ad", str(tmp_path / "nowhere"), "cat")
  root = _make_mvtec(tmp_path)
  with pytest.raises(DataError, match="category folder .*nope"):
    datasets.read_split("mvtec_ad", root, "nope")
  with pytest.raises(ConfigError, match="data.name"):
    datasets.read_split("imagenet", root, "cat")


def test_folder_dataset_with_and_without_masks(tmp_path):
  _make_mvtec(tmp_path)
  split = datasets.read_split("folder", str(tmp_path / "cat"), "")
  assert split.has_masks and all(r.mask_path for r in split.test if r.label)
  shutil.rmtree(tmp_path / "cat/ground_truth")
  split = datasets.read_split("folder", str(tmp_path / "cat"), "")
  assert not split.has_masks and all(r.mask_path is None for r in split.test)


def test_btad_and_visa_layouts(tmp_path):
  rng = np.random.default_rng(0)
  def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)
  img = lambda: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  save(f"{tmp_path}/btad/01/train/ok/0000.bmp", img())
  save(f"{tmp_path}/btad/01/test/ok/0000.bmp", img())
  save(f"{tmp_path}/btad/01/test/ko/0001.bmp", img())
  save(f"{tmp_path}/btad/01/ground_truth/ko/0001.png", np.full((16, 16), 255, np.uint8))
  split = datasets.read_split("btad", f"{tmp_path}/btad", "01")
  assert (len(split.train), len(split.test), split.test[0].label) == (1, 2, 1)
  visa = tmp_path / "visa"
  save(f"{visa}/candle/Data/Images/Normal/0000.JPG", img())
  save(f"{visa}/candle/Data/Images/Normal/0001.JPG", img())
  save(f"{visa}/candle/Data/Images/Anomaly/0002.JPG", img())
  save(f"{visa}/candle/Data/Masks/Anomaly/0002.png", np.full((16, 16), 1, np.uint8))  # VisA: ids, not 255
  os.makedirs(visa / "split_csv")
  (visa / "split_csv/1cls.csv").write_text(
      "object,split,label,image,mask\n"
      "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
      "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
      "candle,test,anomaly,candle/Data/Images/Anomaly/0002.JPG,candle/Data/Masks/Anomaly/0002.png\n")
  split = datasets.read_split("visa", str(visa), "candle")
  assert (len(split.train), len(split.test)) == (1, 2)
  assert transforms.load_mask(split.test[1].mask_path).all()


def test_pcb_bank_layout_as_published(tmp_path):
  """PCB-Bank's archive (pcb<N>/Data/Images, Data/Masks with class ids) and its repository's
  1cls_clear.csv; a category whose images are absent (pcb5/6 come by e-mail) is named in the error."""
  rng = np.random.default_rng(0)
  root = tmp_path / "PCB-Bank"
  def save(rel, array):
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(root / rel)
  for i in range(3):
    save(f"pcb7/Data/Images/Normal/{i:04d}.JPG", rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
  save("pcb7/Data/Images/Anomaly/0100.JPG", rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
  mask = np.zeros((12, 20), np.uint8)
  mask[2:5, 3:9] = 1  # id2class: pcb7 1 = "Missing Switch"
  save("pcb7/Data/Masks/Anomaly/0100.png", mask)
  rows = ["object,split,label,image,mask",
          "pcb7,train,normal,pcb7/Data/Images/Normal/0000.JPG,",
          "pcb7,train,normal,pcb7/Data/Images/Normal/0001.JPG,",
          "pcb7,test,normal,pcb7/Data/Images/Normal/0002.JPG,",
          "pcb7,test,anomaly,pcb7/Data/Images/Anomaly/0100.JPG,pcb7/Data/Masks/Anomaly/0100.png",
          "pcb5,train,normal,pcb5/Data/Images/Normal/0000.JPG,"]
  with pytest.raises(DataError, match="1cls.csv"):
    datasets.read_split("pcb_bank", str(root), "pcb7")
  (root / "1cls_clear.csv").write_text("\n".join(rows) + "\n")
  assert datasets.categories_from_config("pcb_bank", str(root), "all") == ["pcb5", "pcb7"]
  split = datasets.read_split("pcb_bank", str(root), "pcb7")
  assert ([r.label for r in split.train], [r.label for r in split.test]) == ([0, 0], [0, 1])
  assert datasets.validate(split) == [(20, 12)] * 4
  assert transforms.load_mask(split.test[1].mask_path).sum() == 18  # class ids count as anomalous
  with pytest.raises(DataError, match="pcb5.*does not exist.*e-mail"):
    datasets.read_split("pcb_bank", str(root), "pcb5")


def test_synthetic_dataset_is_deterministic_and_has_unseen_subclasses(tmp_path):
  root_a = synthetic.ensure_generated(str(tmp_path / "a"))
  split = datasets.read_split("synthetic", root_a, "cloth")
  assert len(split.subclasses) == 5 and len(split.unseen_subclasses) == 2
  assert not {r.subclass for r in split.train} & set(split.unseen_subclasses)
  assert {r.defect_type for r in split.test if r.label} == set(synthetic.DEFECTS)
  datasets.validate(split)
  # Masks are exact: the defect changed pixels inside the mask and none outside.
  record = next(r for r in split.test if r.defect_type == "hole")
  mask = transforms.load_mask(record.mask_path)
  assert 20 < mask.sum() < 0.1 * mask.size
  # Same bytes when generated again elsewhere.
  root_b = synthetic.ensure_generated(str(tmp_path / "b"))
  rel = os.path.relpath(record.path, root_a)
  assert open(record.path, "rb").read() == open(os.path.join(root_b, rel), "rb").read()


def test_synthetic_defect_changes_only_masked_pixels():
  rng = np.random.default_rng(0)
  sub = synthetic.CATEGORIES["wood"][0]
  for defect in synthetic.DEFECTS:
    clean = synthetic.texture(sub, np.random.default_rng(5))
    broken, mask = synthetic.add_defect(clean, defect, rng)
    assert mask.any(), defect
    np.testing.assert_array_equal(broken[~mask], clean[~mask])
    assert np.abs(broken[mask] - clean[mask]).mean() > 0.02, defect


def test_pipeline_shuffle_is_deterministic_and_sharding_partitions(synthetic_root):
  root = synthetic_root
  records = datasets.read_split("synthetic", root, "metal").train[:12]
  kw = dict(image_size=32, crop_size=32, mean=MEAN, std=STD, batch_size=4, shuffle=True, seed=3)
  order = lambda **extra: np.concatenate([b["index"] for b in pipeline.make_dataset(records, **kw, **extra)])
  first = order()
  np.testing.assert_array_equal(first, order())
  assert not np.array_equal(first, order(epoch=1))
  assert sorted(first) == list(range(12))
  shards = [order(shard_index=i, shard_count=3) for i in range(3)]
  assert sorted(np.concatenate(shards)) == list(range(12))


def test_pipeline_worker_processes_give_the_same_batches(synthetic_root):
  root = synthetic_root
  records = datasets.read_split("synthetic", root, "wood").test[:6]
  kw = dict(image_size=40, crop_size=32, mean=MEAN, std=STD, batch_size=3, subclass_ids=("oak", "walnut"))
  inline = list(pipeline.make_dataset(records, **kw))
  workers = list(pipeline.make_dataset(records, worker_count=2, **kw))
  assert len(inline) == len(workers) == 2
  for a, b in zip(inline, workers):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_pipeline_threads_keep_record_order_and_batch_sizes(synthetic_root, monkeypatch, drop_remainder):
  # Images decode on several threads one by one and are batched after: order must survive.
  monkeypatch.setattr(pipeline, "decode_threads", lambda: 5)
  records = datasets.read_split("synthetic", synthetic_root, "cloth").train[:11]
  batches = list(pipeline.make_dataset(records, image_size=32, crop_size=32, mean=MEAN, std=STD, batch_size=4,
                                       drop_remainder=drop_remainder))
  assert [len(b["index"]) for b in batches] == ([4, 4] if drop_remainder else [4, 4, 3])
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(8 if drop_remainder else 11))
  assert batches[0]["image"].shape == (4, 32, 32, 3)

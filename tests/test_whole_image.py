"""data.resize (issue 19, item 1): the whole image is scored by default, maps come back at each
image's own resolution, and a centre crop says how much it never scores."""

import logging
import os

import numpy as np
import pytest
from conftest import require_bottle
from PIL import Image

from adjax import configlib, train
from adjax.data import transforms
from adjax.errors import ConfigError
from configs import patch_knn, simplenet


def test_squash_and_pad_keep_the_whole_image_and_crop_does_not():
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (30, 90, 3), np.uint8))  # 3:1, width 90, height 30
  squashed = transforms.preprocess_image(image, 48, 0, None, None, "squash")
  padded = transforms.preprocess_image(image, 48, 0, None, None, "pad")
  cropped = transforms.preprocess_image(image, 48, 48, None, None, "crop")
  assert squashed.shape == padded.shape == cropped.shape == (48, 48, 3)
  assert transforms.content_box(90, 30, "pad", 48) == (16, 0, 16, 48)  # the image is 48x16 inside
  np.testing.assert_array_equal(padded[:16], np.repeat(padded[16:17], 16, axis=0))  # edge-padded
  assert transforms.kept_fraction(90, 30, "crop", 48, 48) == pytest.approx(1 / 3)
  assert transforms.kept_fraction(90, 30, "squash", 48, 0) == 1.0
  mask = np.zeros((30, 90), bool)
  mask[:, :10] = True  # a defect at the left edge
  assert transforms.preprocess_mask(mask, 48, 48, "crop").sum() == 0  # outside the centre crop
  assert transforms.preprocess_mask(mask, 48, 0, "squash")[:, :5].all()
  padded_mask = transforms.preprocess_mask(mask, 48, 0, "pad")
  assert padded_mask[:16].sum() == 0 and padded_mask[16:32, :5].all()  # the padding is never anomalous


@pytest.mark.parametrize("mode", ["squash", "pad"])
def test_maps_go_back_to_the_images_own_pixels(mode):
  width, height, side = 90, 30, 48
  top, left, rows, cols = transforms.content_box(width, height, mode, side)
  amap = np.zeros((side, side), np.float32)
  amap[top:top + rows, left:left + cols // 2] = 1.0  # the left half of the image's content
  full = transforms.to_original(amap, width, height, mode)
  assert full.shape == (height, width)
  assert full[:, :40].min() > 0.9 and full[:, 50:].max() < 0.1
  assert transforms.to_original(amap, width, height, mode, max_side=45).shape == (15, 45)


def test_setting_only_the_image_size_sets_the_input_and_a_stray_crop_is_refused():
  config = simplenet.get_config("")
  assert config.data.resize == "squash" and configlib.input_size(config) == 160
  config.data.image_size = 256  # the user's one override
  configlib.validate(config)
  assert configlib.input_size(config) == 256
  config.data.crop_size = 224
  with pytest.raises(ConfigError, match="data.crop_size"):
    configlib.validate(config)
  config.data.crop_size, config.data.resize = 0, "tile"
  with pytest.raises(ConfigError, match="data.resize"):
    configlib.validate(config)
  paper = simplenet.get_config("mvtec_ad")
  assert (paper.data.resize, paper.data.image_size, paper.data.crop_size) == ("crop", 329, 288)


def _rectangular_bottle(root, n_train=24, n_good=8, n_defect=10, side=96):
  """MVTec AD bottle as 3:1 images: three bottle images side by side, each scaled to side x side,
  the defective one (with its mask) at the right end, outside any centre crop."""
  bottle = require_bottle()
  scaled = lambda p: np.asarray(Image.open(p).convert("RGB").resize((side, side), Image.BILINEAR))
  train = sorted(os.listdir(os.path.join(bottle, "train", "good")))
  good = sorted(os.listdir(os.path.join(bottle, "test", "good")))
  defects = [(d, f) for d in ("broken_large", "contamination") for f in
             sorted(os.listdir(os.path.join(bottle, "test", d)))[: n_defect // 2]]
  fill = [os.path.join(bottle, "test", "good", f) for f in good[n_good:]]  # normal images never in a test slot

  def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path)

  paths = [os.path.join(bottle, "train", "good", f) for f in train]
  for i in range(n_train):
    save(os.path.join(root, "train", "good", f"{i:03d}.png"),
         np.concatenate([scaled(paths[(3 * i + k) % len(paths)]) for k in range(3)], axis=1))
  for i in range(n_good):
    right = scaled(os.path.join(bottle, "test", "good", good[i]))
    save(os.path.join(root, "test", "good", f"{i:03d}.png"),
         np.concatenate([scaled(fill[i % len(fill)]), scaled(fill[(i + 1) % len(fill)]), right], axis=1))
  for i, (defect, name) in enumerate(defects):
    right = scaled(os.path.join(bottle, "test", defect, name))
    save(os.path.join(root, "test", "broken", f"{i:03d}.png"),
         np.concatenate([scaled(fill[i % len(fill)]), scaled(fill[(i + 1) % len(fill)]), right], axis=1))
    mask = np.asarray(Image.open(os.path.join(bottle, "ground_truth", defect, name.replace(".png", "_mask.png")))
                      .convert("L").resize((side, side), Image.NEAREST))
    save(os.path.join(root, "ground_truth", "broken", f"{i:03d}_mask.png"),
         np.concatenate([np.zeros((side, 2 * side), np.uint8), mask], axis=1))


def test_whole_image_default_finds_defects_at_the_edge_that_a_centre_crop_never_sees(tmp_path, caplog):
  root = tmp_path / "rectangular_bottle"
  _rectangular_bottle(str(root))
  reports = {}
  for mode in ("squash", "crop"):
    config = patch_knn.get_config("")
    config.data.name, config.data.root, config.data.category = "folder", str(root), ""
    if mode == "crop":
      configlib.centre_crop(config, 192, 192)  # 288x96 -> 576x192 -> the middle third
    else:
      configlib.whole_image(config, 192)
    config.eval.num_overlays = 2
    with caplog.at_level(logging.INFO):
      reports[mode] = train.run(config, str(tmp_path / mode), "train")["rectangular_bottle"]
    if mode == "crop":
      assert "data.resize=crop scores 33.3% of an image's pixels" in caplog.text
  assert reports["squash"]["image_auroc"] >= 0.9, reports["squash"]
  assert reports["crop"]["image_auroc"] <= 0.75, reports["crop"]
  assert reports["squash"]["pixel_auroc"] >= 0.85
  assert reports["crop"]["pixel_auroc"] is None  # no defect pixel inside any crop
  overlay = next((tmp_path / "squash" / "overlays" / "rectangular_bottle").iterdir())
  assert Image.open(overlay).size == (3 * 288, 96)  # three panels at the image's own 288x96

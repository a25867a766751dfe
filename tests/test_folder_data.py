"""Folder data as a user lays it out (issue 19, item 4): one category without data.category, normal
test images under good/ok/normal in any case, hidden folders skipped, masks of any extension case,
every test folder's role logged, and a test set without defects explained."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from adjax import methods, train
from adjax.data import datasets
from adjax.errors import ConfigError, DataError
from configs import patch_knn


def _image(path, seed, size=(40, 32)):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, size[::-1] + (3,), np.uint8)).save(path)


def _folder(root, normal="good", mask_name="000_mask.png", defects=True, train_normal="good", defect="scratch",
            normals=True):
  for i in range(4):
    _image(os.path.join(root, "train", train_normal, f"{i}.png"), i)
  if normals:
    _image(os.path.join(root, "test", normal, "n0.png"), 10)
  _image(os.path.join(root, "test", ".ipynb_checkpoints", "stale.png"), 11)
  if defects:
    _image(os.path.join(root, "test", defect, "000.png"), 12)
    mask = np.zeros((32, 40), np.uint8)
    mask[4:9, 4:9] = 255
    os.makedirs(os.path.join(root, "ground_truth", "scratch"), exist_ok=True)
    Image.fromarray(mask).save(os.path.join(root, "ground_truth", "scratch", mask_name), format="PNG")


def _run_config(root):
  """patch_knn, small, on the folder data at root."""
  config = patch_knn.get_config("")
  config.data.name, config.data.root = "folder", str(root)
  config.data.image_size, config.eval.num_overlays = 32, 0
  return config


def test_a_folder_is_one_category_whatever_data_category_says(tmp_path):
  root = str(tmp_path / "parts")
  _folder(root)
  for category in ("", "cloth,wood,metal", "all"):
    assert datasets.categories_from_config("folder", root, category) == [""]
  split = datasets.read_split("folder", root, "")
  assert split.category == "parts" and len(split.train) == 4
  # A folder of category folders: 'all' takes the subfolders that hold train/, not train/ itself.
  _folder(str(tmp_path / "lines" / "a"))
  _folder(str(tmp_path / "lines" / "b"))
  os.makedirs(tmp_path / "lines" / "notes")
  assert datasets.categories_from_config("folder", str(tmp_path / "lines"), "all") == ["a", "b"]
  for category in ("cloth,wood,metal", "a,c", ""):  # categories it lacks are named, with the ones it has
    with pytest.raises(ConfigError, match=r"lines.*; it holds the categories a, b .*'all'"):
      datasets.categories_from_config("folder", str(tmp_path / "lines"), category)
  with pytest.raises(DataError, match="holds no categories"):  # 'all' finding nothing: never an empty run
    datasets.categories_from_config("folder", str(tmp_path / "lines" / "notes"), "all")
  with pytest.raises(DataError, match="data.root"):
    datasets.categories_from_config("folder", str(tmp_path / "nowhere"), "all")
  assert datasets.read_split("folder", str(tmp_path / "lines"), "b").category == "b"
  # An empty folder is named by the category it is, not by data.category's empty string.
  os.makedirs(tmp_path / "empty" / "train" / "good")
  os.makedirs(tmp_path / "empty" / "test" / "good")
  with pytest.raises(DataError, match="No training images found for category 'empty'.*train/good"):
    datasets.read_split("folder", str(tmp_path / "empty"), "")


def test_normal_folder_names_hidden_folders_and_mask_folder_and_extension_case(tmp_path):
  for normal, defect in (("normal", "scratch"), ("OK", "Scratch"), ("Good", "SCRATCH")):
    root = str(tmp_path / normal)
    # train/ takes the same normal-folder names as test/; the mask folder is ground_truth/scratch throughout
    _folder(root, normal=normal, mask_name="000_mask.PNG", train_normal=normal, defect=defect)
    split = datasets.read_split("folder", root, "")
    assert len(split.train) == 4
    labels = {os.path.basename(os.path.dirname(r.path)): r.label for r in split.test}
    assert labels == {normal: 0, defect: 1}  # .ipynb_checkpoints is not a defect type
    assert split.test[[r.label for r in split.test].index(1)].mask_path.endswith("scratch/000_mask.PNG")
  _folder(str(tmp_path / "OK"), train_normal="good")  # train/OK and train/good: which is it?
  with pytest.raises(DataError, match="train holds OK and good"):
    datasets.read_split("folder", str(tmp_path / "OK"), "")


def test_the_run_logs_each_test_folders_role_and_explains_a_test_set_without_defects(tmp_path, caplog):
  root = str(tmp_path / "only_good")
  _folder(root, normal="normal", defects=False)
  config = _run_config(root)  # data.category is the built-in dataset's 'cloth,wood,metal'
  with caplog.at_level(logging.INFO):
    report = train.run(config, str(tmp_path / "run"), "train")
  assert list(report) == ["only_good", "mean"]
  assert report["only_good"]["image_auroc"] is None
  assert "does not apply" in caplog.text and "only_good test folders: normal: normal (1 images)" in caplog.text
  assert "no anomalous test images" in caplog.text


def test_strongly_rectangular_images_squashed_get_a_warning_with_what_to_do(caplog):
  config = patch_knn.get_config("")
  with caplog.at_level(logging.INFO):
    train._log_geometry(config, "strip", [(600, 60), (640, 60)])  # line-scan strips, aspect 10 to 10.67
    train._log_geometry(config, "photo", [(400, 300)])
  warned = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warned) == 1 and "strip" in warned[0].getMessage() and "tiles" in warned[0].getMessage()
  assert "photo: data.resize=squash: whole images of aspect ratios 1.33..1.33" in caplog.text


def test_a_test_set_without_normal_images_is_explained(tmp_path, caplog):
  root = str(tmp_path / "defects_only")
  _folder(root, normals=False)
  config = _run_config(root)
  with caplog.at_level(logging.WARNING):
    train.load_splits(config, methods.build(config))
  assert "defects_only: no normal test images (only scratch)" in caplog.text


def test_a_test_folder_named_like_a_normal_one_is_warned_about(tmp_path, caplog):
  root = str(tmp_path / "part")
  _folder(root, defects=False)  # no ground_truth/, so any test folder but good is a defect type without masks
  _image(os.path.join(root, "test", "good_2", "a.png"), 20)  # a later batch of normal images, misnamed
  _image(os.path.join(root, "test", "not_good", "b.png"), 21)  # a defect folder, rightly so named
  config = _run_config(root)
  with caplog.at_level(logging.WARNING):
    train.load_splits(config, methods.build(config))
  warned = [r.getMessage() for r in caplog.records if "taken as a defect type" in r.getMessage()]
  assert len(warned) == 1 and "test/good_2 is taken as a defect type" in warned[0] and "test/good" in warned[0]


def test_eval_and_resume_refuse_a_changed_training_set_but_not_new_test_images(tmp_path):
  root = tmp_path / "part"
  _folder(str(root))
  for i in range(4, 12):
    _image(str(root / "train" / "good" / f"{i}.png"), i)
  config = _run_config(root)
  workdir = str(tmp_path / "run")
  train.run(config, workdir, "train")
  _image(str(root / "test" / "good" / "n1.png"), 20)  # new test images: evaluated as usual
  train.run(config, workdir, "eval")
  os.rename(root / "train" / "good" / "0.png", root / "train" / "good" / "0b.png")  # the held-out set may change
  for mode in ("eval", "train"):
    with pytest.raises(ConfigError, match=r"training images of part are not the ones .*11 train, 1 held-out then"):
      train.run(config, workdir, mode)


def test_predict_warns_about_images_shaped_unlike_every_training_image(tmp_path, caplog):
  from adjax import predict
  root = tmp_path / "part"
  _folder(str(root))  # 40x32 training images: width / height 1.25
  config = _run_config(root)
  workdir = str(tmp_path / "run")
  train.run(config, workdir, "train")
  assert json.load(open(os.path.join(workdir, "training_sets.json")))["part"]["aspect_ratios"] == [1.25, 1.25]
  sizes = [(40, 32), (44, 34), (100, 32), (32, 40)]  # as trained, 1.29 (within 10%), a strip, turned on its side
  with caplog.at_level(logging.WARNING):
    predict._say_what_differs_from_training(workdir, "part", config, [f"{i}.png" for i in range(4)], sizes)
  warned = [r.getMessage() for r in caplog.records if "shaped unlike" in r.getMessage()]
  assert len(warned) == 1 and warned[0].startswith("2 of 4 images are shaped unlike the training images of part")
  assert "e.g. 2.png (100x32, 3.12)" in warned[0] and "data.resize=squash" in warned[0]


def test_a_workdir_whose_run_stopped_before_its_first_checkpoint_takes_another_config(tmp_path):
  from adjax.errors import WeightsError
  root = tmp_path / "part"
  _folder(str(root))
  config = _run_config(root)
  config.model.backbone_weights = str(tmp_path / "missing.pth")  # stops after config.json is written
  workdir = str(tmp_path / "run")
  with pytest.raises(WeightsError):
    train.run(config, workdir, "train")
  config.model.backbone_weights = "imagenet"
  config.data.image_size = 48  # another model input: refused for a workdir that holds a trained run
  train.run(config, workdir, "train")
  config.data.image_size = 32
  with pytest.raises(ConfigError, match="data.image_size"):
    train.run(config, workdir, "train")

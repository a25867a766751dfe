"""Dataset readers: folders on disk -> lists of `Record`s. No decoding, no model knowledge.

Layouts (one `root`, categories below it):
- mvtec_ad, mpdd:  <root>/<category>/train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png
- btad:            <root>/<category>/train/ok, test/ok, test/ko, ground_truth/ko/<stem>.<png|bmp>
- visa:            <root>/split_csv/1cls.csv (object,split,label,image,mask; paths relative to root)
- pcb_bank:        PCB-Bank (GLAD, Yao et al., ECCV 2024; RSAD Table 4) as published: <root>/pcb<N>/Data/
                   Images/{Normal,Anomaly}, Data/Masks/Anomaly (class ids 1..n), and the repository's split
                   file in the 1cls.csv format of VisA, at <root>/1cls.csv, <root>/1cls_clear.csv or
                   <root>/split_csv/1cls.csv (paths relative to root). The reorganised MVTec-style copy
                   that its prepare_data.py writes reads as data.name=mvtec_ad.
- texture_ad:      <root>/<category>/<subclass>/ with the MVTec layout inside each subclass. Texture-AD
                   (Lei et al., 2024) organises images per category and subclass; adjax expects its
                   subclasses unpacked this way. A subclass with no train images is "unseen".
- folder:          <root>/train/good, test/good, test/<defect>, and optionally
                   ground_truth/<defect>/<stem>[_mask].<ext>; without a ground_truth folder the
                   dataset has no masks and pixel metrics are reported as null. The root is one
                   category (named after it) when it holds train/ itself, whatever data.category
                   says; else its subfolders with a train/ are categories. Normal test images
                   may be in test/good, ok or normal (any letter case); hidden folders are skipped.
- synthetic:       the built-in dataset (synthetic.py), generated on first use, texture_ad layout.
"""

import csv
import dataclasses
import hashlib
import os
import re

import numpy as np

from adjax import configlib
from adjax.data import transforms
from adjax.errors import ConfigError, DataError

NAMES = ("mvtec_ad", "mpdd", "visa", "pcb_bank", "btad", "texture_ad", "folder", "synthetic")
NORMAL_DIRS = ("good", "ok", "normal")  # test folders of normal images, in any letter case


@dataclasses.dataclass(frozen=True)
class Record:
  path: str
  label: int  # 0 normal, 1 anomalous
  defect_type: str  # 'good' for normal images
  mask_path: str | None  # None: normal image, or a dataset without masks
  subclass: str = ""  # '' where the dataset has no subclasses
  category: str = ""


@dataclasses.dataclass
class Split:
  """The train and test records of one category."""
  category: str
  train: list
  test: list
  has_masks: bool
  calibration: list = dataclasses.field(default_factory=list)  # labelled, held out of `test`
  held_out: list = dataclasses.field(default_factory=list)  # normal, held out of `train` for the threshold

  @property
  def subclasses(self) -> list:
    return sorted({r.subclass for r in self.train + self.test})

  @property
  def unseen_subclasses(self) -> list:
    seen = {r.subclass for r in self.train}
    return sorted({r.subclass for r in self.test} - seen)


def images_in(folder: str) -> list:
  """The image files directly in folder (a subfolder named like an image, x.png/, is not one)."""
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(transforms.IMAGE_EXTENSIONS) and not f.startswith(".")
                and not os.path.isdir(os.path.join(folder, f)))


def _require_dir(path: str, what: str, fix: str) -> None:
  if not os.path.isdir(path):
    raise DataError(f"The {what} folder {path} does not exist. {fix}")


def _find_mask(mask_dir: str, stem: str, image_path: str, required: bool) -> str | None:
  """<stem>_mask.<ext> or <stem>.<ext> in mask_dir, <ext> any image extension in any letter case."""
  present = {f.lower(): f for f in os.listdir(mask_dir)} if os.path.isdir(mask_dir) else {}
  for name in (f"{stem}_mask", stem):
    for ext in transforms.IMAGE_EXTENSIONS:
      if (name + ext).lower() in present:
        return os.path.join(mask_dir, present[(name + ext).lower()])
  if required:
    raise DataError(f"The anomalous test image {image_path} has no mask: expected "
                    f"{os.path.join(mask_dir, stem + '_mask.png')}. Add the mask, or move the image out "
                    "of the test set.")
  return None


def _test_records(category_dir: str, category: str, subclass: str, has_masks: bool) -> list:
  test_dir = os.path.join(category_dir, "test")
  gt_dir = os.path.join(category_dir, "ground_truth")
  # A defect type's mask folder in any letter case (test/Scratch, ground_truth/scratch), the exact name first.
  gt_folders = {d.lower(): d for d in sorted(os.listdir(gt_dir), reverse=True)} if os.path.isdir(gt_dir) else {}
  test = []
  for defect in sorted(d for d in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, d))
                       and not d.startswith(".")):  # hidden folders (.ipynb_checkpoints) hold no test images
    for p in images_in(os.path.join(test_dir, defect)):
      if defect.lower() in NORMAL_DIRS:
        test.append(Record(p, 0, "good", None, subclass, category))
      else:
        stem = os.path.splitext(os.path.basename(p))[0]
        folder = defect if os.path.isdir(os.path.join(gt_dir, defect)) else gt_folders.get(defect.lower(), defect)
        mask = _find_mask(os.path.join(gt_dir, folder), stem, p, required=True) if has_masks else None
        test.append(Record(p, 1, defect, mask, subclass, category))
  return test


def named_like_normal(folder: str) -> bool:
  """A folder name that is not one of NORMAL_DIRS but has one as a word (good_2, OK-parts, Normal new),
  and no negation (not_good, no_ok)."""
  words = re.split(r"[^a-z]+", folder.lower())
  return (folder.lower() not in NORMAL_DIRS and any(w in NORMAL_DIRS for w in words)
          and not any(w in ("not", "no", "non") for w in words))


def _normal_train_folder(category_dir: str) -> str:
  """The one folder of train/ named like a normal test folder (NORMAL_DIRS, any letter case), or 'good'."""
  train = os.path.join(category_dir, "train")
  found = sorted(d for d in os.listdir(train) if d.lower() in NORMAL_DIRS
                 and os.path.isdir(os.path.join(train, d))) if os.path.isdir(train) else []
  if len(found) > 1:
    raise DataError(f"{train} holds {' and '.join(found)}: which are the normal training images? Keep one "
                    "folder of them (good, ok or normal).")
  return found[0] if found else "good"


def _mvtec_like(category_dir: str, category: str, subclass: str = "", normal: str | None = "good",
                masks: str = "required", train_required: bool = True) -> Split:
  """MVTec AD layout. normal: train/'s folder of normal images, None for any of NORMAL_DIRS (folder
  data). masks: 'required', or 'optional' (all present if ground_truth/ exists, else none)."""
  shown = normal or "good (or ok, normal)"
  fix = f"Check data.root and data.category: {category_dir} should hold train/{shown} and test/."
  _require_dir(category_dir, "category", fix)
  train_dir = os.path.join(category_dir, "train", normal or _normal_train_folder(category_dir))
  if train_required:
    _require_dir(train_dir, "training", fix)
  train = [Record(p, 0, "good", None, subclass, category) for p in images_in(train_dir)] \
      if os.path.isdir(train_dir) else []
  _require_dir(os.path.join(category_dir, "test"), "test", fix)
  has_masks = masks == "required" or os.path.isdir(os.path.join(category_dir, "ground_truth"))
  return Split(category, train, _test_records(category_dir, category, subclass, has_masks), has_masks)


def _merge(category: str, parts: list) -> Split:
  return Split(category, [r for p in parts for r in p.train], [r for p in parts for r in p.test],
               all(p.has_masks for p in parts))


# Where each split-file dataset keeps its 1cls.csv, relative to data.root, first match wins.
SPLIT_FILES = {
    "visa": ("split_csv/1cls.csv",),
    # The PCB-Bank repository ships 1cls_clear.csv beside prepare_data.py; its README calls it 1cls.csv.
    "pcb_bank": ("1cls.csv", "1cls_clear.csv", "split_csv/1cls.csv"),
}
_SPLIT_HELP = {
    "visa": "data.root must be the VisA folder that holds split_csv/1cls.csv (as unpacked from the "
            "official archive).",
    "pcb_bank": "data.root must be the PCB-Bank folder that holds pcb1 .. pcb7; put the split file from "
                "the PCB-Bank repository (1cls_clear.csv) there as 1cls.csv.",
}


def split_file(name: str, root: str) -> str:
  """The split CSV of a split-file dataset (visa, pcb_bank); DataError naming the places looked at."""
  candidates = [os.path.join(root, rel) for rel in SPLIT_FILES[name]]
  for path in candidates:
    if os.path.exists(path):
      return path
  raise DataError(f"No {name} split file: none of {', '.join(candidates)} exists. {_SPLIT_HELP[name]}")


def _from_split_file(name: str, root: str, category: str) -> Split:
  """The rows of one object in a 1cls.csv (object,split,label,image,mask; paths relative to root)."""
  csv_path = split_file(name, root)
  train, test = [], []
  with open(csv_path, newline="") as f:
    for row in csv.DictReader(f):
      if row["object"] != category:
        continue
      path = os.path.join(root, row["image"])
      anomalous = row["label"].strip().lower() == "anomaly"
      mask = os.path.join(root, row["mask"]) if anomalous and row.get("mask") else None
      if anomalous and mask is None:
        raise DataError(f"{csv_path} lists anomalous image {path} without a mask; fix the CSV.")
      record = Record(path, int(anomalous), "anomaly" if anomalous else "good", mask, "", category)
      (train if row["split"].strip() == "train" else test).append(record)
  if not train and not test:
    raise DataError(f"{csv_path} has no rows for category '{category}' (data.category).")
  missing = next((r.path for r in train + test if not os.path.exists(r.path)), None)
  if missing is not None:
    extra = (" PCB-Bank's pcb5 and pcb6 (from Real-IAD) are not in its public archive: they come by "
             "e-mail from the Real-IAD authors; or leave them out of data.category."
             if name == "pcb_bank" else "")
    raise DataError(f"{csv_path} lists {missing}, which does not exist: data.root must be the folder the "
                    f"CSV's paths are relative to.{extra}")
  return Split(category, train, test, True)


def list_categories(name: str, root: str) -> list:
  if name in SPLIT_FILES:
    with open(split_file(name, root), newline="") as f:
      return sorted({row["object"] for row in csv.DictReader(f)})
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                and d not in ("split_csv",) and not d.startswith("."))


def root_category(root: str) -> str:
  """The category name of folder data whose root holds train/ itself: the root folder's own name."""
  return os.path.basename(os.path.normpath(root))


def _require_source(name: str, root: str) -> None:
  if name not in NAMES:
    raise ConfigError(f"Unknown dataset '{name}' in data.name. Choose one of: {', '.join(NAMES)}.")
  if not root or not os.path.isdir(root):
    raise DataError(f"The dataset root {root!r} (data.root) does not exist or is not a folder. "
                    f"Set --config.data.root to the folder that holds the {name} data.")


def read_split(name: str, root: str, category: str) -> Split:
  """Train/test records of one category. Raises DataError naming what is missing."""
  _require_source(name, root)
  if name in ("mvtec_ad", "mpdd"):
    split = _mvtec_like(os.path.join(root, category), category)
  elif name == "btad":
    split = _mvtec_like(os.path.join(root, category), category, normal="ok")
  elif name in SPLIT_FILES:
    split = _from_split_file(name, root, category)
  elif name in ("texture_ad", "synthetic"):
    category_dir = os.path.join(root, category)
    _require_dir(category_dir, "category", "Check data.root and data.category.")
    subclasses = sorted(d for d in os.listdir(category_dir) if os.path.isdir(os.path.join(category_dir, d)))
    # Unseen subclasses have no (or an empty) train/good folder.
    split = _merge(category, [_mvtec_like(os.path.join(category_dir, sub), category, sub, train_required=False)
                              for sub in subclasses])
  elif category:  # folder data with one category per subfolder
    split = _mvtec_like(os.path.join(root, category), category, normal=None, masks="optional")
  else:  # folder data: the root is the category
    split = _mvtec_like(root, root_category(root), normal=None, masks="optional")
  if not split.train:
    raise DataError(f"No training images found for category '{split.category}' under {root}. "
                    "Normal training images go in train/good (train/ok for BTAD).")
  if not split.test:
    raise DataError(f"No test images found for category '{split.category}' under {root}. "
                    "Test images go in test/good and test/<defect type>.")
  return split


def _categories_present(name: str, root: str) -> list:
  """The categories under root: for folder data, its subfolders that hold train/."""
  if name == "folder":
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "train")))
  return list_categories(name, root)


def categories_from_config(name: str, root: str, category: str) -> list:
  """data.category: one name, a comma list, or 'all'. Folder data whose root holds train/
  itself is one category (named after the folder), whatever data.category says."""
  _require_source(name, root)
  if name == "folder" and os.path.isdir(os.path.join(root, "train")):
    return [""]
  if category.strip() == "all":
    found = _categories_present(name, root)
    if not found:
      raise DataError(f"data.category is 'all' but {root} holds no categories"
                      f"{': no train/ folder in it or in any of its subfolders' if name == 'folder' else ''}. "
                      "Check --config.data.root.")
    return found
  names = configlib.names(category)
  if not names and name != "folder":
    raise ConfigError("data.category is empty: name a category, a comma list, or 'all'.")
  if name not in SPLIT_FILES:  # split-file readers name what is missing themselves
    present = _categories_present(name, root)
    missing = [n for n in names if n not in present]
    if missing or (not names and present):  # or a folder root without train/ itself, no category named
      lead = f"data.category names {', '.join(missing)}, not found in {root}" if missing else (
          f"data.category is empty and {root} holds no train/ folder itself")
      raise ConfigError(f"{lead}; it holds {'the categories ' + ', '.join(present) if present else 'no categories'}"
                        f"{' (folders with a train/ subfolder)' if name == 'folder' else ''}. Set "
                        "--config.data.category to one of them, a comma list, or 'all'.")
  return names or [""]


def validate(split: Split) -> list:
  """Checks every file before any work starts: readable images, masks of the image's size.
  Returns the (width, height) of every train and test image, in that order."""
  sizes = []
  for record in split.train + split.test:
    size = transforms.image_size_of(record.path, "image")
    sizes.append(size)
    if record.mask_path is not None:
      mask_size = transforms.image_size_of(record.mask_path, "mask")
      if mask_size != size:
        raise DataError(f"The mask {record.mask_path} is {mask_size[0]}x{mask_size[1]} but its image "
                        f"{record.path} is {size[0]}x{size[1]}. Masks must have their image's size: "
                        "replace the mask with one of the right size.")
  return sizes


def training_set_fingerprint(split: Split, root: str) -> dict:
  """What a category's model was fitted and calibrated on: its training, threshold and calibration
  images (paths relative to the dataset root, so a moved dataset still matches), counted and hashed,
  and the range of their aspect ratios (width / height), which predict compares new images with."""
  roles = (("train", split.train), ("held_out", split.held_out), ("calibration", split.calibration))
  names = sorted(f"{role}:{os.path.relpath(r.path, root)}" for role, records in roles for r in records)
  aspects = [w / h for w, h in (transforms.image_size_of(r.path) for _, records in roles for r in records)]
  return {"images": {role: len(records) for role, records in roles},
          "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
          "aspect_ratios": [min(aspects), max(aspects)] if aspects else None}


def aspect_outliers(sizes, aspect_ratios, tolerance: float = 1.1) -> list:
  """Indices of the (width, height) sizes whose aspect ratio lies outside the training images'
  range [lo, hi] by more than `tolerance` times."""
  lo, hi = aspect_ratios
  return [i for i, (w, h) in enumerate(sizes) if not lo / tolerance <= w / h <= hi * tolerance]


def hold_out_normals(split: Split, fraction: float, seed: int, into: str = "held_out") -> Split:
  """`split` with `fraction` of its training images (seeded, of each subclass) moved to `into`:
  normal images never trained on. 'held_out': their scores set the decision threshold;
  'calibration': a method's calibration split of normal images only; 'test': added to the
  test images as normals (the triplet paper's protocol for its known classes)."""
  if fraction <= 0 or len(split.train) < 2:
    return split
  rng = np.random.default_rng([seed, {"held_out": 11, "calibration": 13, "test": 17}[into]])
  held = set()
  for subclass in sorted({r.subclass for r in split.train}):
    members = [i for i, r in enumerate(split.train) if r.subclass == subclass]
    count = min(len(members) - 1, int(round(fraction * len(members))))
    if count > 0:
      held.update(int(i) for i in rng.choice(members, count, replace=False))
  if not held:  # a small set: still one image, so that what it serves rests on an unseen image
    held.add(int(rng.integers(len(split.train))))
  moved = [r for i, r in enumerate(split.train) if i in held]
  if into == "test":
    moved = [dataclasses.replace(r, defect_type="good", mask_path=None) for r in moved]
    return dataclasses.replace(split, train=[r for i, r in enumerate(split.train) if i not in held],
                               test=list(split.test) + moved)
  return dataclasses.replace(split, train=[r for i, r in enumerate(split.train) if i not in held],
                             **{into: moved})


def hold_out_calibration(split: Split, fraction: float, seed: int) -> Split:
  """`split` with `fraction` of its test images, of each label, moved to `calibration` (seeded,
  at least one per label present): a labelled split for methods that fit a calibration after
  training, never scored as test."""
  rng = np.random.default_rng([seed, 7])
  held = set()
  for label in (0, 1):
    members = [i for i, r in enumerate(split.test) if r.label == label]
    if members:
      count = min(len(members) - 1, max(1, int(round(fraction * len(members)))))
      held.update(int(i) for i in rng.choice(members, count, replace=False))
  if not held:
    raise DataError(f"Category {split.category}: too few test images to hold out a calibration split "
                    f"(data.calibration_fraction={fraction}); add labelled images or lower the fraction.")
  return dataclasses.replace(split, test=[r for i, r in enumerate(split.test) if i not in held],
                             calibration=[r for i, r in enumerate(split.test) if i in held])

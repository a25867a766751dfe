"""The config keys every method shares; each configs/<method>.py starts from `base()`.

Keys (override any with --config.<key>=<value>):
  seed                      randomness for init, noise and shuffling
  data.name                 mvtec_ad | mpdd | visa | pcb_bank | btad | texture_ad | folder | synthetic
  data.root                 dataset folder ('' for synthetic: generated into the adjax cache)
  data.category             one category, a comma list, or 'all'
  data.resize               how an image of any shape becomes the model's square input
                            (adjax/data/transforms.py): 'squash' (default: the whole image to
                            image_size x image_size), 'pad' (the whole image, aspect kept, edge-
                            padded to a square), 'crop' (shorter side to image_size, then the
                            centre crop_size x crop_size: the papers' MVTec protocol; the rest of
                            a non-square image is never scored, and the run says how much)
  data.image_size           the input side ('squash', 'pad'), or the shorter side before the crop
  data.crop_size            the centre crop of 'crop' mode; 0 (unused) in the whole-image modes
  data.workers              grain worker processes (0: decode in the main process, one thread per core)
  data.calibration_fraction share of each category's test images (of each label) held out as the
                            labelled split of methods that calibrate after training; never scored as test
                            (methods calibrated on normals take it from the training images instead)
  data.test_normals_fraction
                            (configs that set it) share of each category's normal training images moved
                            to its test set as normals (the triplet paper's known classes: 0.5)
  data.threshold_fraction   share of each category's normal training images (of each subclass) held
                            out of training; the largest of their image scores is the stored decision
                            threshold that predict applies (0: no threshold; the paper protocols
                            train on every image)
  model.name                the method module in adjax/methods
  model.backbone            resnet18|resnet34|resnet50|wide_resnet50_2|vgg16|vgg19|efficientnet_lite0..2
  model.backbone_weights    'imagenet', 'random', or a path to a .pth file
  model.layers              backbone feature taps, shallow to deep
  model.dtype               float32 | bfloat16 for the frozen backbone
  model.pretrain_embed_dim, model.target_embed_dim, model.patch_size
                            the patch features of SimpleNet's family (patch_features below)
  model.feature_scale, model.feature_spread_target
                            methods that add noise to patch features: 'auto' or a number (as
                            text) multiplying the features (feature_scale below)
  train.epochs, train.batch_size
  train.cache_features      compute frozen features once and reuse them every epoch (same result)
  train.feature_cache_device_mb  cache on the accelerator (a copy on each) up to this size, else on the host
  train.image_cache_device_mb  image-space methods: the uint8 training images on the accelerator up
                            to this size, else on the host
  train.feature_cache_dtype float32 (exact) | bfloat16 (half the memory; features rounded, so
                            results differ slightly from recomputing them)
  train.categories_together  methods training a head on cached features: the categories whose
                            states have the same shapes train in one compiled program, each as
                            its solo run would (adjax/together.py), as many at once as have
                            their feature caches within feature_cache_device_mb; false: one
                            after another
  train.shared_model        one model for the run's categories (methods that allow it): trained
                            once on every known category's training images together, then
                            finalized and calibrated per category on that category's own
                            images; false: one model per category
  data.novel_categories     with train.shared_model, a comma list of the run's categories that
                            are never trained on: their normal training images serve only
                            finalize (e.g. a prototype) and calibration, and their test set
                            keeps its normals (data.test_normals_fraction is for known ones);
                            the report adds the known and novel means
  train.checkpoint_every    epochs between checkpoints; an interrupted run resumes from the last
  train.checkpoint_min_seconds  and at least this long between them (the last epoch is always saved):
                            a short run on a fast accelerator would otherwise spend a
                            noticeable share of its time saving
  eval.batch_size, eval.smoothing_sigma (Gaussian on the upsampled map), eval.num_overlays
  eval.metric_max_side      whole-image modes: maps and masks are compared at each image's own
                            resolution, scaled down to at most this many pixels on the longer
                            side (0: never scaled; it bounds the metrics' memory on large images)
  eval.predict_chunk        --mode=predict scores and writes this many images at a time, so its
                            memory stays the same however many images the folder holds
"""

import ml_collections

from adjax.errors import ConfigError


def parse_arg(arg: str, config_file: str, dataset_choices, old_forms=(), **spec) -> ml_collections.ConfigDict:
  """The one variant grammar of every config file: '--config=configs/<file>.py:<variant>', with
  <variant> = '[<dataset>][,<key>=<value>]...', e.g. 'rsad.py:mpdd,aligner=fc'.

  dataset_choices: the allowed first fields ('' included for the built-in dataset); spec: every
  key with its default, whose type parses the value (bools take true/false/1/0), or with a
  tuple of its allowed strings (the first the default). old_forms: (predicate, hint) pairs
  recognising a retired syntax, refused with its new form.
  """
  choices = {k: v for k, v in spec.items() if isinstance(v, tuple)}
  spec = {k: v[0] if isinstance(v, tuple) else v for k, v in spec.items()}
  for matches, hint in old_forms:
    if matches(arg):
      raise ConfigError(f"configs/{config_file}:{arg} uses a retired variant syntax; write it as "
                        f"configs/{config_file}:{hint(arg)} ('<dataset>,<key>=<value>,...').")
  fields = [f.strip() for f in arg.split(",")] if arg.strip() else []
  dataset = fields.pop(0) if fields and "=" not in fields[0] else ""
  if dataset not in dataset_choices:
    raise ConfigError(f"Unknown dataset variant '{dataset}' of configs/{config_file}: use one of "
                      f"{', '.join(repr(d) for d in dataset_choices)}.")
  values = ml_collections.ConfigDict(dict(spec, dataset=dataset))
  for field in fields:
    key, sep, text = field.partition("=")
    if not sep or key not in spec:
      raise ConfigError(f"Unknown variant field '{field}' of configs/{config_file}: after the dataset give "
                        f"key=value pairs with keys {', '.join(spec) or '(none)'}.")
    default = spec[key]
    if isinstance(default, bool):
      if text.lower() not in ("true", "false", "1", "0"):
        raise ConfigError(f"configs/{config_file}: {key} takes true or false, not '{text}'.")
      values[key] = text.lower() in ("true", "1")
    else:
      try:
        values[key] = type(default)(text)
      except ValueError:
        raise ConfigError(f"configs/{config_file}: {key} takes a {type(default).__name__}, not '{text}'.") from None
    if key in choices and values[key] not in choices[key]:
      raise ConfigError(f"configs/{config_file}: {key} must be one of {', '.join(choices[key])}, not '{text}'.")
  return values


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(
      name="synthetic", root="", category="cloth,wood,metal", resize="squash", image_size=160, crop_size=0,
      workers=0, calibration_fraction=0.0, threshold_fraction=0.1, novel_categories=""))
  # The frozen backbone's keys; methods on SimpleNet's patch features add patch_features' keys.
  c.model = ml_collections.ConfigDict(dict(
      name="", backbone="efficientnet_lite0", backbone_weights="imagenet", layers=("stage3", "stage5"),
      dtype="float32"))
  c.train = ml_collections.ConfigDict(dict(
      epochs=1, batch_size=8, cache_features=True, feature_cache_device_mb=4096, feature_cache_dtype="float32",
      image_cache_device_mb=4096,
      checkpoint_every=10, checkpoint_min_seconds=30.0, log_every=10, categories_together=True,
      shared_model=False))
  c.eval = ml_collections.ConfigDict(dict(batch_size=16, smoothing_sigma=4.0, pro_fpr_limit=0.3,
                                          num_overlays=8, metric_max_side=1024, predict_chunk=64))
  return c


def whole_image(c: ml_collections.ConfigDict, size: int, mode: str = "squash") -> ml_collections.ConfigDict:
  """The whole image as a size x size input (data.resize 'squash' or 'pad'): nothing is cut off."""
  c.data.resize, c.data.image_size, c.data.crop_size = mode, size, 0
  return c


def centre_crop(c: ml_collections.ConfigDict, image_size: int, crop_size: int) -> ml_collections.ConfigDict:
  """The papers' MVTec protocol: shorter side to image_size, then the centre crop_size square."""
  c.data.resize, c.data.image_size, c.data.crop_size = "crop", image_size, crop_size
  return c


def paper_data(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A paper's protocol trains on every training image: none held out for a decision threshold."""
  c.data.threshold_fraction = 0.0
  return c


def input_size(config) -> int:
  """The model's square input side for config.data."""
  from adjax.data import transforms
  return transforms.input_side(config.data.resize, config.data.image_size, config.data.crop_size)


def patch_features(c: ml_collections.ConfigDict, embed_dim: int):
  """The patch-feature keys of adjax/backbones/patch_features.py (SimpleNet Sec. 3.1), used by
  the methods that score those features: embeddings pooled to `embed_dim` per layer and in all."""
  c.model.pretrain_embed_dim = c.model.target_embed_dim = embed_dim
  c.model.patch_size = 3          # the 3x3 neighbourhood aggregated per location
  return c


# The spread the papers' noise sigma (0.015) and truncated-L1 thresholds were chosen for: the
# per-dimension std of WideResNet50 layer2+3 patch features (1536-d, ImageNet weights) on MVTec
# AD bottle's training images, recorded as 0.22-0.24; WideResNet50's weights are not available
# offline to measure the median exactly (benchmarks/README.md, "Feature scale").
WRN50_FEATURE_SPREAD = 0.23


def feature_scale(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """model.feature_scale of the methods that add Gaussian noise of a fixed sigma to patch
  features: '1.0' (the papers' setting) on their WideResNet50, else 'auto': per category, the
  factor that brings the training features' median per-dimension std to
  model.feature_spread_target (adjax/methods/common.py: FeatureScale). Text, so that one key
  takes both 'auto' and a number from the command line (--config.model.feature_scale=0.05)."""
  c.model.feature_scale = "1.0" if c.model.backbone == "wide_resnet50_2" else "auto"
  c.model.feature_spread_target = WRN50_FEATURE_SPREAD
  return c


def lite0_demo(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The offline default: built-in dataset, packaged EfficientNet-Lite0 ImageNet weights.

  Lite0 stage3 (stride 8, 40 ch) and stage5 (stride 16, 112 ch) play the role of
  WideResNet50 layer2 and layer3; 9 * 112 = 1008 values per location after the 3x3
  aggregation, so the embeddings are pooled to 512 rather than 1536.

  Lite0's stage outputs are linear (no ReLU): their patch features are about 20x larger than
  WideResNet50's, so the noise-based methods scale them per category to WideResNet50's spread
  (`feature_scale`, 'auto') instead of re-tuning every paper value per backbone.
  """
  c.data.name, c.data.root, c.data.category = "synthetic", "", "cloth,wood,metal"
  whole_image(c, 160)
  c.model.backbone, c.model.backbone_weights = "efficientnet_lite0", "imagenet"
  c.model.layers = ("stage3", "stage5")
  patch_features(c, 512)
  return c


def lite0_real_data(c: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
  """A real dataset with the offline Lite0 backbone (e.g. MVTec AD bottle in the accuracy
  benchmarks): the paper-standard 256 -> 224 preprocessing, all categories by default."""
  lite0_demo(c)
  c.data.name, c.data.category = dataset, "all"
  centre_crop(c, 256, 224)
  paper_data(c)
  return c


def wrn50_paper(c: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
  """The papers' common protocol: WideResNet50 layer2+3, 1536-d patch features, 256 -> 224 (RSAD Sec. 4,
  Adapted-MoE's SimpleNet baseline); configs/simplenet.py then takes its official run script's 329 -> 288."""
  c.data.name = dataset
  c.data.category = "all"
  centre_crop(c, 256, 224)
  paper_data(c)
  c.model.backbone, c.model.backbone_weights = "wide_resnet50_2", "imagenet"
  c.model.layers = ("layer2", "layer3")
  patch_features(c, 1536)
  return c


def _validate_taps(config) -> None:
  from adjax import backbones
  from adjax.errors import ConfigError
  if config.model.backbone == "" and not tuple(config.model.layers):
    return  # a method trained from scratch on the images (configs/triplet.py): no frozen network
  spec = backbones.get_spec(config.model.backbone)
  layers = list(config.model.layers) if isinstance(config.model.layers, (tuple, list)) else [config.model.layers]
  bad = [t for t in layers if t not in spec.taps or t == "logits"]
  if bad or not layers:
    raise ConfigError(f"model.layers {layers} are not feature taps of {spec.name}; choose from "
                      f"{', '.join(t for t in spec.taps if t != 'logits')} (shallow to deep).")
  strides = [spec.strides[t] for t in layers]
  if strides != sorted(strides):
    raise ConfigError(f"model.layers {layers} must go from shallow to deep (strides {strides}).")


def names(text: str) -> list:
  """A comma list config value ('a, b,c') as its non-empty names."""
  return [n.strip() for n in text.split(",") if n.strip()]


# Keys added after workdirs were written, with the value a config.json without them implies.
ADDED_DEFAULTS = {"train.shared_model": False, "data.novel_categories": "", "model.calibration_fill": "noise",
                  "model.distance_scale": "none", "model.train_chunk": 0}


def added(config, key: str):
  """The value of `key` (one of ADDED_DEFAULTS) in a config, or in an older run's config.json without it."""
  section, name = key.split(".")
  return config[section].get(name, ADDED_DEFAULTS[key])


def novel_categories(config) -> list:
  """data.novel_categories as a list of names."""
  return names(added(config, "data.novel_categories"))


def paper_kfold_svm(config) -> list:
  """eval.paper_kfold_svm as a list of alternative-score names ([] when off)."""
  return names(config.get("eval", {}).get("paper_kfold_svm", ""))


def validate(config) -> None:
  """Checks values the type system cannot, before any data is read or weights loaded."""
  from adjax import methods
  from adjax.data import datasets
  from adjax.errors import ConfigError
  if config.data.name not in datasets.NAMES:
    raise ConfigError(f"Unknown dataset '{config.data.name}' in data.name. Choose one of: "
                      f"{', '.join(datasets.NAMES)}.")
  methods.get(config.model.name)
  if "backbone" in config.model:  # methods without a frozen backbone have no backbone keys
    _validate_taps(config)
  for key in ("data.image_size", "train.epochs", "train.batch_size", "eval.batch_size", "train.checkpoint_every"):
    section, name = key.split(".")
    if config[section][name] <= 0:
      raise ConfigError(f"{key} must be positive, not {config[section][name]}.")
  from adjax.data import transforms
  if config.data.resize not in transforms.RESIZE_MODES:
    raise ConfigError(f"data.resize must be one of {', '.join(transforms.RESIZE_MODES)}, not '{config.data.resize}'.")
  if config.data.resize == "crop" and config.data.crop_size <= 0:
    raise ConfigError(f"data.crop_size must be positive with data.resize=crop, not {config.data.crop_size}.")
  if config.data.resize != "crop" and config.data.crop_size not in (0, config.data.image_size):
    raise ConfigError(f"data.crop_size ({config.data.crop_size}) is only used with data.resize=crop; data.resize="
                      f"{config.data.resize} scales the whole image to data.image_size ({config.data.image_size}). "
                      "Set data.crop_size=0, or data.resize=crop to crop.")
  novel = novel_categories(config)
  if novel and not added(config, "train.shared_model"):
    raise ConfigError(f"data.novel_categories={','.join(novel)!r} needs train.shared_model=true: novel categories are "
                      "tested on a model trained on the other categories. Set train.shared_model=true, or clear "
                      "data.novel_categories.")
  if config.train.checkpoint_min_seconds < 0:
    raise ConfigError(f"train.checkpoint_min_seconds must be 0 or more, not {config.train.checkpoint_min_seconds}.")
  if not 0.0 <= config.data.threshold_fraction < 1.0:
    raise ConfigError(f"data.threshold_fraction must be in [0, 1), not {config.data.threshold_fraction}.")
  if not 0.0 <= config.data.get("test_normals_fraction", 0.0) < 1.0:
    raise ConfigError(f"data.test_normals_fraction must be in [0, 1), not {config.data.test_normals_fraction}.")
  if not 0.0 <= config.data.calibration_fraction < 1.0:
    raise ConfigError(f"data.calibration_fraction must be in [0, 1), not {config.data.calibration_fraction}.")
  if config.data.resize == "crop" and config.data.crop_size > config.data.image_size:
    raise ConfigError(f"data.crop_size ({config.data.crop_size}) must not exceed data.image_size "
                      f"({config.data.image_size}): the crop is taken from the resized image.")
  for key in ("model.dtype", "train.feature_cache_dtype"):
    section, name = key.split(".")
    if name in config[section] and config[section][name] not in ("float32", "bfloat16"):
      raise ConfigError(f"{key} must be 'float32' or 'bfloat16', not '{config[section][name]}'.")

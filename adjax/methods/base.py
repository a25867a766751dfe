"""The method protocol: what every method implements and what the shared loop may rely on.

A method is a class built once from its config, `Method(config)`; it owns its Flax modules
and optax transforms (built in `__init__`) and knows nothing about files, datasets,
checkpoints or reports. The shared loop (adjax/train.py) reaches it only through this class.

Inputs, declared by class attributes:
  train_inputs    what a training batch carries besides 'subclass' (B,) int32:
                  'features'  frozen-extractor output for the clean images, float32
                  'images'    the clean training images, float32, normalised by `normalisation()`,
                              (B, S, S, 3), S = configlib.input_size; any augmentation is the method's,
                              done inside `train_step` from its key (so on the device)
  score_inputs    what `score` receives: the same two keys
  cache_features  whether 'features' may be computed once and reused every epoch: true
                  unless a random augmentation comes before the extractor
  trains          True: gradient training by `train_step`; False: statistics only (`fit`)
  shares_across_categories  True: train.shared_model may train one state on several categories'
                  training images at once (each record's 'subclass' is then its category's index),
                  which `finalize` and `calibrate` then complete per category on its own images
  alternative_scores  the names of the image_score_<name> diagnostics it reports, which
                  eval.paper_kfold_svm may fit a k-fold SVM on (evaluate.log_diagnostics)
  calibrates      True: `calibrate` runs after training on a split of data.calibration_fraction
                  held out of the test images (calibration_source 'test': labelled, never scored
                  as test) or of the normal training images ('normals': never trained on, no
                  test label read)
  execution_keys  model.<key>s that change how a step runs on a machine, never what it computes:
                  a workdir trained with one value is reused with another (checkpoints.check_run_config)
  min_train_images  the fewest training images a trained category may have (the loop refuses fewer
                  at start-up, naming the category)

Stages, in the order the loop calls them (all but `train_step` and `score` have defaults):
  check_config(config)                        before any data is read or anything compiled
  make_extractor() -> FeatureExtractor|None   the frozen feature network(s); None: no 'features'
  derives_subclasses() -> bool                whether assign_subclasses needs the features
  assign_subclasses(features, subclass, key) -> subclass ids (N,), before init
  check_subclasses(num_subclasses, label)     told how many training subclasses a category has
                                              (label: its name), before init; may warn
  init(sample, key, num_subclasses) -> state  sample: a one-record training batch of zeros
  prepares() -> bool                          whether prepare needs the training features
  prepare(state, features, label) -> state    after init, before the first step: statistics of
                                              every training record's features (host arrays)
                                              that the method keeps in its state (e.g. a
                                              feature scale); the state's structure is
                                              unchanged; label names the category in logs
  fit(data, key, num_subclasses) -> state     statistics-only methods; data: every training
                                              record's inputs (the train_inputs keys)
  train_step(state, batch, key) -> (state, metrics)
                                              pure; jitted by the loop, data-parallel over the
                                              mesh; the key differs at every step
  finalize(state, batches) -> state           after training, over the training set once more
  score(state, inputs, image_shape) -> (image scores (B,), patch maps (B, h, w))
                                              pure and jittable; higher = more anomalous; maps
                                              at any resolution (the loop upsamples them)
  diagnostics(state, inputs) -> {name: (B, n)} per-image vectors, jittable, computed with the
                                              scores; the loop sums each over the test set and
                                              logs and reports the totals (e.g. per-expert
                                              routing counts); those named image_score_<name>,
                                              (B, 1), are other image scores, reported by their
                                              image AUROC
  calibrate(state, scored) -> state           scored: {'scores', 'maps', 'labels', 'images'} of
                                              the calibration split, scored with `state`
                                              ('images': the normalised inputs)
`state` is a pytree of arrays whose structure `init` (or `fit`) fixes: the loop checkpoints it
with Orbax and restores it into that structure.
"""


from adjax import configlib
from adjax.errors import ConfigError


class Method:
  train_inputs: tuple = ("features",)
  score_inputs: tuple = ("features",)
  cache_features: bool = True
  trains: bool = True
  calibrates: bool = False
  calibration_source: str = "test"
  shares_across_categories: bool = False
  alternative_scores: tuple = ()  # the <name>s of its image_score_<name> diagnostics (eval.paper_kfold_svm)
  execution_keys: tuple = ()
  min_train_images: int = 1

  def __init__(self, config):
    self.check_config(config)
    if configlib.added(config, "train.shared_model") and not self.shares_across_categories:
      raise ConfigError(f"train.shared_model=true: model.name={config.model.name} trains one model per category "
                        "(its state is not completed per category after a shared training). Set "
                        "train.shared_model=false.")
    self.config = config

  @classmethod
  def check_config(cls, config) -> None:
    """Raises ConfigError naming the key for values the method cannot use."""
    cls.check_alternative_scores(config)
    if cls.calibrates and not config.data.get("calibration_fraction", 0.0) > 0:
      held = ("normal training images out of training" if cls.calibration_source == "normals"
              else "test images out of the evaluation")
      raise ConfigError(f"model.name={config.model.name} fits a calibration after training and needs held-out "
                        f"images: set data.calibration_fraction (e.g. 0.2) to hold that share of each category's "
                        f"{held}.")

  @staticmethod
  def check_choice(key: str, value, allowed) -> None:
    """A ConfigError naming model.<key>, its value and the values allowed, unless it is one of them."""
    if value not in allowed:
      raise ConfigError(f"model.{key} must be one of {', '.join(map(str, allowed))}, not '{value}'.")

  @classmethod
  def check_alternative_scores(cls, config) -> None:
    """eval.paper_kfold_svm must name some of the method's alternative_scores, with 2 folds or more."""
    wanted = configlib.paper_kfold_svm(config)
    folds = config.get("eval", {}).get("paper_kfold_folds", 5)
    if wanted and (set(wanted) - set(cls.alternative_scores) or folds < 2):
      raise ConfigError(f"eval.paper_kfold_svm={','.join(wanted)!r} with eval.paper_kfold_folds={folds}: "
                        f"model.name={config.model.name} reports "
                        f"{list(cls.alternative_scores) or 'no other image scores'}; name some of them, and 2 folds "
                        "or more.")

  def make_extractor(self) -> object | None:
    """SimpleNet-style patch features of `config.model` (adjax/backbones/patch_features.py)."""
    from adjax.backbones.patch_features import make_feature_fn
    return make_feature_fn(self.config.model)

  def normalisation(self, extractor) -> tuple:
    """(mean, std) per RGB channel applied to images in [0, 1]; the extractor's by default."""
    if extractor is None:
      return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return tuple(extractor.spec.mean), tuple(extractor.spec.std)

  def derives_subclasses(self) -> bool:
    return False

  def assign_subclasses(self, features, subclass, key):
    del features, key
    return subclass

  def check_subclasses(self, num_subclasses: int, label: str = "") -> None:
    del num_subclasses, label

  def init(self, sample, key, num_subclasses: int = 1):
    raise NotImplementedError(f"{type(self).__name__} trains, so it must define init")

  def prepares(self) -> bool:
    return False

  def prepare(self, state, features, label=""):
    del features, label
    return state

  def fit(self, data, key, num_subclasses: int = 1):
    raise NotImplementedError(f"{type(self).__name__} has trains=False, so it must define fit")

  def train_step(self, state, batch, key):
    raise NotImplementedError(f"{type(self).__name__} has trains=True, so it must define train_step")

  def finalize(self, state, batches):
    del batches
    return state

  def score(self, state, inputs, image_shape):
    raise NotImplementedError

  def diagnostics(self, state, inputs):
    del state, inputs
    return {}

  def calibrate(self, state, scored):
    del scored
    return state

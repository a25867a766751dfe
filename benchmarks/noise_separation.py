r"""How fast does a noise discriminator learn to tell normal features from their noised copies?

  python benchmarks/noise_separation.py [--steps 2500] [--crop 14] [--category bottle]
      [--runs "simplenet.py:mvtec_ad_lite0 data.image_size=256 data.crop_size=224,rsad.py:mvtec_ad_lite0"]

A training diagnostic for SimpleNet and RSAD on real MVTec AD bottle, using the TRAINING
images only (no test image is read, so it can guide choices without selecting on the test
set). Each run trains its method for `--steps` steps of 4 images on random crops of the
cached patch-feature maps (crops keep steps cheap on a CPU; the full protocol is
benchmarks/bottle_accuracy.py) and prints, every `--steps/10` steps, the loss and
P(D_true > D_fake): the fraction of locations of 4 training images whose clean feature the
discriminator scores as more normal than the same feature plus the method's Gaussian noise
(0.5 = cannot tell them apart). A run is a config plus `key=value` overrides.
"""

import argparse
import ast
import os
import runpy
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from adjax import caches, methods  # noqa: E402
from adjax.data import datasets  # noqa: E402

DEFAULT_RUNS = ("simplenet.py:mvtec_ad_lite0 data.image_size=256 data.crop_size=224,"
                "rsad.py:mvtec_ad_lite0,"
                "rsad.py:mvtec_ad_lite0 model.mona_dropout=0.0,"
                "rsad.py:mvtec_ad_lite0 model.aligner='fc'")


def load_run(spec: str):
  """'file.py:variant key=value ...' -> config (same variant syntax as adjax.main)."""
  name, *overrides = spec.split()
  path, _, variant = name.partition(":")
  config = runpy.run_path(os.path.join(ROOT, "configs", path))["get_config"](*([variant] if variant else []))
  for override in overrides:
    key, value = override.split("=", 1)
    section, field = key.split(".")
    old = config[section][field]
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):  # a bare word such as model.aligner=fc is a string
      if not isinstance(old, str):
        raise
    config[section][field] = type(old)(value) if isinstance(old, (tuple, list, str)) else value
  return config


def normality_logits(method, state, features, noise_key):
  """Discriminator outputs for the clean adapted features and their noised copies (eq. 6)."""
  true = method.adapt(state, features * state["feature_scale"])
  fake = true + method.config.model.noise_std * jax.random.normal(noise_key, true.shape)
  return method.discriminate(state, true), method.discriminate(state, fake)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  parser.add_argument("--root", default=os.path.join(ROOT, "..", "shared", "data", "mvtec_ad"))
  parser.add_argument("--category", default="bottle")
  parser.add_argument("--steps", type=int, default=2500)
  parser.add_argument("--crop", type=int, default=14, help="side of the random crop of each feature map")
  parser.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated runs")
  args = parser.parse_args()
  records = datasets.read_split("mvtec_ad", args.root, args.category).train
  cache = {}
  summary = []
  for spec in [s.strip() for s in args.runs.split(",")]:
    config = load_run(spec)
    method = methods.build(config)  # SimpleNet or RSAD: both have adapt and discriminate
    key = (config.data.image_size, config.data.crop_size, config.model.backbone, tuple(config.model.layers))
    if key not in cache:
      extractor = method.make_extractor()
      cache[key] = caches.compute_features(config, extractor, records, "features", *method.normalisation(extractor))
    features = cache[key]
    n, h, w, _ = features.shape
    crop = min(args.crop, h, w)
    state = method.init({"features": features[:1, :crop, :crop]}, jax.random.key(config.seed))
    if method.prepares():  # model.feature_scale='auto': from these training features, as train.py does
      state = method.prepare(state, features, args.category)
    step = jax.jit(lambda s, b, k, m=method: m.train_step(s, {"features": b}, k))
    probe = jnp.asarray(features[:4])
    rng, key = np.random.default_rng(config.seed), jax.random.key(config.seed + 1)
    print(f"== {spec}: {n} training images, maps {h}x{w}, crops {crop}x{crop}", flush=True)
    start = time.perf_counter()
    for i in range(1, args.steps + 1):
      idx = rng.choice(n, 4, replace=False)
      y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
      key, sub = jax.random.split(key)
      state, metrics = step(state, jnp.asarray(features[idx, y:y + crop, x:x + crop]), sub)
      if i % max(1, args.steps // 10) == 0 or i == args.steps:
        true, fake = normality_logits(method, state, probe, jax.random.key(5))
        separation = float((true > fake).mean())
        print(f"step {i:6d}  loss {float(metrics['loss']):.4f}  P(D_true > D_fake) {separation:.3f}  "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    summary.append((spec, separation, time.perf_counter() - start))
  print(f"\n| run | P(D_true > D_fake) after {args.steps} steps | wall time |\n|---|---|---|")
  for spec, separation, seconds in summary:
    print(f"| {spec} | {separation:.3f} | {seconds:.0f} s |")


if __name__ == "__main__":
  main()

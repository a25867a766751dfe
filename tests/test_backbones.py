"""Parity of the Flax backbones with torchvision / the EfficientNet-Lite reference."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="parity tests need the [test] extra (torch)")
torchvision = pytest.importorskip("torchvision")

from adjax import backbones  # noqa: E402
from adjax.backbones import torch_pickle, weights  # noqa: E402
from adjax.errors import WeightsError  # noqa: E402

SIZES = [(224, 224), (257, 233)]
TOLERANCE = 1e-4  # max |flax - torch| / max |torch| per feature map


def _randomise_batchnorm(model, seed):
  gen = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      n = m.num_features
      m.weight.data = 0.5 + torch.rand(n, generator=gen)
      m.bias.data = 0.2 * torch.randn(n, generator=gen)
      m.running_mean.data = 0.2 * torch.randn(n, generator=gen)
      m.running_var.data = 0.5 + torch.rand(n, generator=gen)
  return model.eval()


def _torch_resnet_taps(model, x):
  x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  out = {"stem": x}
  for i in range(1, 5):
    x = getattr(model, f"layer{i}")(x)
    out[f"layer{i}"] = x
  out["logits"] = model.fc(torch.flatten(model.avgpool(x), 1))
  return out


def _torch_vgg_taps(model, x):
  out, stage = {}, 1
  for layer in model.features:
    if isinstance(layer, torch.nn.MaxPool2d):
      out[f"stage{stage}"] = x
      x = layer(x)
      out[f"pool{stage}"] = x
      stage += 1
    else:
      x = layer(x)
  return out


def _save_state_dict(model, path, legacy=False):
  torch.save(model.state_dict(), path, _use_new_zipfile_serialization=not legacy)
  return str(path)


def _compare(flax_out, torch_out, context):
  assert set(flax_out) <= set(torch_out)
  for tap, value in flax_out.items():
    expected = torch_out[tap].numpy()
    if expected.ndim == 4:
      expected = expected.transpose(0, 2, 3, 1)
    value = np.asarray(value)
    assert value.shape == expected.shape, (context, tap)
    error = np.abs(value - expected).max() / np.abs(expected).max()
    assert error < TOLERANCE, f"{context} {tap}: relative error {error:.2e}"


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "wide_resnet50_2", "vgg16", "vgg19"])
def test_torchvision_parity_with_random_weights(arch, tmp_path):
  torch.manual_seed(0)
  model = _randomise_batchnorm(getattr(torchvision.models, arch)(weights=None), seed=1)
  # Through the file path users take: torch.save -> torch-free reader -> conversion.
  variables = weights.convert_file(arch, _save_state_dict(model, tmp_path / f"{arch}.pth"))
  spec = backbones.get_spec(arch)
  taps = tuple(t for t in spec.taps if t != "logits" or spec.family == "resnet")
  module = backbones.create(arch, taps)
  apply = jax.jit(module.apply)
  torch_taps = _torch_resnet_taps if spec.family == "resnet" else _torch_vgg_taps
  rng = np.random.default_rng(0)
  for h, w in SIZES:
    x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
    with torch.inference_mode():
      expected = torch_taps(model, torch.from_numpy(x.transpose(0, 3, 1, 2)))
    _compare(apply(variables, x), expected, f"{arch} {h}x{w}")


def _lite_reference(index):
  from efficientnet_lite_pytorch import EfficientNet
  # image_size=None selects the reference's dynamic TF 'SAME' padding, which equals its
  # static padding at the nominal size and stays correct at odd sizes.
  model = EfficientNet.from_name(f"efficientnet-lite{index}", image_size=None)
  path = weights._imagenet_file(backbones.get_spec(f"efficientnet_lite{index}"))
  model.load_state_dict(torch.load(path, weights_only=False))
  return model.eval()


def _torch_lite_taps(model, x, arch):
  from adjax.backbones.efficientnet_lite import stages
  x = model._swish(model._bn0(model._conv_stem(x)))
  out = {"stem": x}
  block = 0
  for i, (repeats, *_rest) in enumerate(stages(arch), start=1):
    for _ in range(repeats):
      x = model._blocks[block](x)
      block += 1
    out[f"stage{i}"] = x
  assert block == len(model._blocks)
  x = model._swish(model._bn1(model._conv_head(x)))
  out["head"] = x
  out["logits"] = model._fc(torch.flatten(model._avg_pooling(x), 1))
  return out


@pytest.mark.parametrize("index", [0, 1, 2])
def test_efficientnet_lite_parity_with_packaged_weights(index):
  arch = f"efficientnet_lite{index}"
  model = _lite_reference(index)
  variables = weights.load_variables(arch, "imagenet")
  module = backbones.create(arch, backbones.get_spec(arch).taps)
  apply = jax.jit(module.apply)
  rng = np.random.default_rng(index)
  for h, w in SIZES:
    x = rng.uniform(-1, 1, size=(2, h, w, 3)).astype(np.float32)
    with torch.inference_mode():
      expected = _torch_lite_taps(model, torch.from_numpy(x.transpose(0, 3, 1, 2)), arch)
    _compare(apply(variables, x), expected, f"{arch} {h}x{w}")


def _classify_lite0(image):
  from PIL import Image

  from adjax.data import transforms
  spec = backbones.get_spec("efficientnet_lite0")
  x = transforms.preprocess_image(Image.fromarray(image), 256, 224, spec.mean, spec.std)
  module = backbones.create("efficientnet_lite0", ("logits",))
  logits = module.apply(weights.load_variables("efficientnet_lite0"), x[None])["logits"][0]
  return np.argsort(-np.asarray(logits))[:5]


def test_efficientnet_lite0_classifies_sample_photos():
  skimage_data = pytest.importorskip("skimage.data")
  cat = _classify_lite0(skimage_data.chelsea())
  assert set(cat) & {281, 282, 283, 284, 285}, f"chelsea top-5 {cat}"
  coffee = _classify_lite0(skimage_data.coffee())
  assert set(coffee) & {967, 968}, f"coffee top-5 {coffee}"


def test_torch_free_reader_matches_torch_load_both_formats(tmp_path):
  model = torchvision.models.resnet18(weights=None)
  for legacy in (False, True):
    path = _save_state_dict(model, tmp_path / f"r18_{legacy}.pth", legacy=legacy)
    ours = torch_pickle.load_state_dict(path)
    theirs = torch.load(path, weights_only=True)
    assert list(ours) == list(theirs)
    for key in ours:
      np.testing.assert_array_equal(ours[key], theirs[key].numpy())


def test_missing_paper_weights_offline_raise_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
  monkeypatch.setenv("ADJAX_OFFLINE", "1")
  with pytest.raises(WeightsError) as info:
    weights.load_variables("wide_resnet50_2", "imagenet")
  message = str(info.value)
  assert "wide_resnet50_2-95faca4d.pth" in message
  assert "model.backbone_weights" in message


def test_file_whose_hash_does_not_match_its_name_is_refused(tmp_path):
  model = torchvision.models.resnet18(weights=None)
  path = _save_state_dict(model, tmp_path / "resnet18-f37072fd.pth")  # not the real file
  with pytest.raises(WeightsError, match="SHA-256"):
    weights.load_variables("resnet18", path)


def test_weights_of_another_architecture_are_refused(tmp_path):
  path = _save_state_dict(torchvision.models.resnet18(weights=None), tmp_path / "r18.pth")
  with pytest.raises(WeightsError, match="do not fit"):
    weights.load_variables("resnet34", path)


def test_corrupt_and_missing_weight_files(tmp_path):
  bad = tmp_path / "bad.pth"
  bad.write_bytes(b"not a torch file")
  with pytest.raises(WeightsError, match="not a readable PyTorch state dict"):
    weights.load_variables("resnet18", str(bad))
  with pytest.raises(WeightsError, match="does not exist"):
    weights.load_variables("resnet18", str(tmp_path / "nope.pth"))


def test_cached_conversion_is_reused(tmp_path):
  path = _save_state_dict(torchvision.models.resnet18(weights=None), tmp_path / "r18.pth")
  first = weights.load_variables("resnet18", path)
  cache_files = os.listdir(os.path.join(os.environ["ADJAX_CACHE_DIR"], "backbones"))
  assert any(f.startswith("resnet18-") for f in cache_files)
  second = weights.load_variables("resnet18", path)
  jax.tree.map(np.testing.assert_array_equal, first, second)

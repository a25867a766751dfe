r"""The 3x3 convolution layers of the triplet network and FEGAN's encoder, forward and backward, adjax
(XLA) against PyTorch: the layers both training steps spend most of their time in, so their ratio bounds
what the whole step can reach on a machine.

  python benchmarks/conv_layers.py [--networks triplet,fegan] [--repeats 5] [--warmup 2] [--triplet-chunk 16]

Each layer runs its forward, its weight and bias gradients and (except a network's first layer, whose
input is the image) its input gradient for a fixed random output gradient, float32, random weights and
inputs, as each side's training step runs it: for the triplet ('mvtec_ad' shapes, 576 patches of 64x64 a
step) JAX in chunks of `model.train_chunk` (16) patches, PyTorch in its three passes of 192 (NCHW, as
benchmarks/triplet_speed.py); for FEGAN ('mvtec_ad_lite0': quarter-width VGG19 encoder, 256x256, batch
16) one pass on both sides. A layer that occurs several times in the network (the triplet's residual
blocks shrink by 2 pixels a convolution; FEGAN's stages repeat widths) is timed once per distinct shape
and counted with its multiplicity in the network's total. GFLOP/s counts the three products
(2 x 3 x output pixels x 9 x C_in x C_out; two for the first layer), img/s the layer's images (the
triplet's patches) a second. Both sides use all cores.
A last table times the three products alone for a few of those layers (PyTorch's through
torch.nn.grad), at JAX's chunk and at PyTorch's pass size, to show which of them differs.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import timing  # noqa: E402
import torch  # noqa: E402

import adjax  # noqa: E402,F401 - adjax's XLA:CPU flags, set before JAX starts
from adjax import configlib  # noqa: E402
from adjax.methods import triplet  # noqa: E402
from configs import fegan as fegan_config  # noqa: E402
from configs import triplet as triplet_config  # noqa: E402

NHWC = ("NHWC", "HWIO", "NHWC")


def triplet_layers(chunk=None):
  """(name, count, batch, side, c_in, c_out, padding, jax chunk, torch pass, input gradient) of the
  network's 16 -> 16 layers (the first, 1 -> 16, runs as shifted products in adjax), by distinct shape."""
  config = triplet_config.get_config("mvtec_ad")
  m = config.model
  triplets = config.train.batch_size * sum(m.patches_per_scale) // len(m.scales)  # 192: the scales' equal shares
  patches, chunk, torch_pass = 3 * triplets, chunk or m.train_chunk, triplets  # torch: a, p and n passes
  patch, filters, stem, blocks = m.patch_size, m.filters, m.stem, m.blocks
  rows, side = [], patch - 2
  for i in range(1, stem):
    rows.append((f"stem{i} {side}->{side - 2}", 1, patches, side, filters, filters, 0, chunk, torch_pass, True))
    side -= 2
  side //= 2
  for _ in range(2 * blocks):
    rows.append((f"block {side}->{side - 2}", 1, patches, side, filters, filters, 0, chunk, torch_pass, True))
    side -= 2
  assert side == triplet.output_side(patch, stem, blocks)
  return rows


def fegan_layers():
  """The same for FEGAN's encoder (VGG19's convolution blocks, 'same' padding, average pooling)."""
  config = fegan_config.get_config("mvtec_ad_lite0")
  batch, side, width = config.train.batch_size, configlib.input_size(config), config.model.width
  rows, c_in = [], 3
  for stage, (n, c) in enumerate(((2, 64), (2, 128), (4, 256), (4, 512), (4, 512))):
    c = int(c * width)
    if c_in != c:
      rows.append((f"{side}x{side} {c_in}->{c}", 1, batch, side, c_in, c, 1, batch, batch, stage > 0))
    rows.append((f"{side}x{side} {c}->{c}", n - (c_in != c), batch, side, c, c, 1, batch, batch, True))
    c_in, side = c, side // 2
  return rows


def flops(batch, side, c_in, c_out, padding, input_gradient):
  out = side + 2 * padding - 2
  return 2 * (3 if input_gradient else 2) * batch * out * out * 9 * c_in * c_out


def jax_layer(batch, side, c_in, c_out, padding):
  """(input, output gradient, kernel, conv(x, w)) of one layer in JAX, random."""
  rng = np.random.default_rng(0)
  out = side + 2 * padding - 2
  x = jnp.asarray(rng.standard_normal((batch, side, side, c_in), np.float32))
  g = jnp.asarray(rng.standard_normal((batch, out, out, c_out), np.float32))
  w = jnp.asarray(rng.standard_normal((3, 3, c_in, c_out), np.float32) * 0.1)
  pads = ((padding, padding), (padding, padding))
  return x, g, w, lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=NHWC)


def time_jax(batch, side, c_in, c_out, padding, chunk, input_gradient, warmup, repeats):
  x, g, w, conv = jax_layer(batch, side, c_in, c_out, padding)
  b = jnp.zeros((c_out,), jnp.float32)

  def layer(x, w, b):
    return conv(x, w) + b

  @jax.jit
  def step(x, g, w, b):
    ys, dxs, dw, db = [], [], 0.0, 0.0
    for i in range(0, batch, chunk):
      xi, gi = x[i:i + chunk], g[i:i + chunk]
      if input_gradient:
        y, vjp = jax.vjp(layer, xi, w, b)
        dx, dwi, dbi = vjp(gi)
        dxs.append(dx)
      else:
        y, vjp = jax.vjp(lambda w, b, xi=xi: layer(xi, w, b), w, b)
        dwi, dbi = vjp(gi)
      ys.append(y)  # returned, so that the forward is not dropped as dead code
      dw, db = dw + dwi, db + dbi
    return ys, dxs, dw, db

  return timing.measure(lambda: step(x, g, w, b), warmup=warmup, repeats=repeats, sync=jax.block_until_ready)


def time_torch(batch, side, c_in, c_out, padding, torch_pass, input_gradient, warmup, repeats):
  torch.manual_seed(0)
  out = side + 2 * padding - 2
  conv = torch.nn.Conv2d(c_in, c_out, 3, padding=padding)
  x = torch.randn(batch, c_in, side, side)
  g = torch.randn(batch, c_out, out, out)

  def step():
    conv.zero_grad(set_to_none=True)
    for i in range(0, batch, torch_pass):
      xi = x[i:i + torch_pass].requires_grad_(input_gradient)
      conv(xi).backward(g[i:i + torch_pass])

  return timing.measure(step, warmup=warmup, repeats=repeats)


def time_products(batch, side, c_in, c_out, padding, warmup, repeats):
  """Seconds of the forward, the input gradient and the weight gradient alone, one batch, (JAX, torch)."""
  x, g, w, conv = jax_layer(batch, side, c_in, c_out, padding)
  out = g.shape[1]
  jitted = (jax.jit(conv), jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0]),
            jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0]))
  args = ((x, w), (x, w, g), (x, w, g))
  jax_s = [timing.measure(lambda f=f, a=a: f(*a), warmup=warmup, repeats=repeats, sync=jax.block_until_ready)
           for f, a in zip(jitted, args)]
  tx, tw, tg = torch.randn(batch, c_in, side, side), torch.randn(c_out, c_in, 3, 3), torch.randn(batch, c_out, out, out)
  with torch.no_grad():
    torch_s = [timing.measure(f, warmup=warmup, repeats=repeats) for f in (
        lambda: torch.nn.functional.conv2d(tx, tw, padding=padding),
        lambda: torch.nn.grad.conv2d_input(tx.shape, tw, tg, padding=padding),
        lambda: torch.nn.grad.conv2d_weight(tx, tw.shape, tg, padding=padding))]
  return jax_s, torch_s


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--networks", default="triplet,fegan", help="comma-separated: triplet, fegan")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per layer and side (the median)")
  parser.add_argument("--triplet-chunk", type=int, default=None,
                      help="patches per JAX pass for the triplet; default: the config's model.train_chunk")
  args = parser.parse_args()
  networks = args.networks.split(",")
  if not set(networks) <= {"triplet", "fegan"}:
    parser.error(f"--networks takes triplet and/or fegan, not {args.networks!r}")
  torch.set_num_threads(os.cpu_count())
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); forward + backward per layer, float32, median of {args.repeats} "
        f"after {args.warmup}", flush=True)
  wall = time.perf_counter()
  for network in networks:
    rows = triplet_layers(args.triplet_chunk) if network == "triplet" else fegan_layers()
    print(f"\n{network}: {'layer':<22} {'count':>5} {'images':>6} {'torch ms':>9} {'adjax ms':>9} {'ratio':>6} "
          f"{'torch img/s':>11} {'adjax img/s':>11} {'torch GFLOP/s':>13} {'adjax GFLOP/s':>13}")
    totals = np.zeros(2)
    for name, count, batch, side, c_in, c_out, padding, chunk, torch_pass, grad_x in rows:
      t = time_torch(batch, side, c_in, c_out, padding, torch_pass, grad_x, args.warmup, args.repeats)
      j = time_jax(batch, side, c_in, c_out, padding, chunk, grad_x, args.warmup, args.repeats)
      f = flops(batch, side, c_in, c_out, padding, grad_x) / 1e9
      totals += count * np.array([t, j])
      print(f"{'':9}{name:<22} {count:>5} {batch:>6} {t * 1e3:9.1f} {j * 1e3:9.1f} {t / j:5.2f}x "
            f"{batch / t:11.0f} {batch / j:11.0f} {f / t:13.1f} {f / j:13.1f}", flush=True)
    print(f"{'':9}{'all layers, counted':<22} {'':>5} {'':>6} {totals[0] * 1e3:9.1f} {totals[1] * 1e3:9.1f} "
          f"{totals[0] / totals[1]:5.2f}x")
  print(f"\nthe three products alone, one batch of the given size (ms, torch / adjax):\n{'':9}{'layer':<22} "
        f"{'images':>6} {'forward':>15} {'input gradient':>15} {'weight gradient':>15}")
  tri = triplet_layers(args.triplet_chunk)
  first_block = next(r for r in tri if r[0].startswith("block"))
  products = [("triplet", r, b) for r in (tri[0], first_block) for b in (r[7], r[8])]  # JAX's chunk, torch's pass
  products.append(("fegan", fegan_layers()[1], fegan_layers()[1][2]))  # the 256x256 16 -> 16 layer
  for network, (name, _, _, side, c_in, c_out, padding, *_), batch in products:
    if network in networks:
      jax_s, torch_s = time_products(batch, side, c_in, c_out, padding, args.warmup, args.repeats)
      cells = " ".join(f"{t * 1e3:7.1f}/{j * 1e3:<7.1f}" for t, j in zip(torch_s, jax_s))
      print(f"{'':9}{network + ' ' + name:<22} {batch:>6} {cells}", flush=True)
  print(f"wall {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
  main()

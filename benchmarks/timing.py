"""Timing helpers shared by the benchmarks."""

import time


def measure(fn, *, warmup=2, repeats=5, sync=lambda out: out):
  """Median seconds of `fn()` over `repeats` runs after `warmup` runs (synced each time)."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  times.sort()
  return times[len(times) // 2]


def mean_seconds(fn, runs, *, warmup=1, sync=lambda: None):
  """Mean seconds of a call of `fn` over `runs` calls after `warmup` ones: `sync()` (an
  accelerator's queue) before the clock starts and before it stops, the calls between queued."""
  for _ in range(warmup):
    fn()
  sync()
  start = time.perf_counter()
  for _ in range(runs):
    fn()
  sync()
  return (time.perf_counter() - start) / runs


def torch_sync(device):
  """What waits for a PyTorch device's queued work: nothing on the CPU."""
  import torch  # noqa: PLC0415 - the benchmarks that time PyTorch have it; others need not
  return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def row(name, images, seconds, reference_seconds=None):
  line = f"{name:<48} {images / seconds:10.1f} img/s  {seconds * 1000:9.1f} ms/batch"
  if reference_seconds is not None:
    line += f"  {reference_seconds / seconds:6.2f}x vs torch"
  return line


PRECISIONS = ("float32", "tf32")


def set_precision(mode):
  """The same float32 matmul/convolution precision on both sides: 'float32' (full; TF32 off in
  PyTorch, 'highest' in JAX, whose GPU default would use TF32) or 'tf32' (both allowed TF32,
  JAX's GPU default). On a CPU both modes compute in float32."""
  import jax  # noqa: PLC0415
  import torch  # noqa: PLC0415
  if mode not in PRECISIONS:
    raise ValueError(f"--precision must be one of {PRECISIONS}, not {mode!r}")
  tf32 = mode == "tf32"
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
  jax.config.update("jax_default_matmul_precision", "tensorfloat32" if tf32 else "highest")

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


def row(name, images, seconds, reference_seconds=None):
  line = f"{name:<48} {images / seconds:10.1f} img/s  {seconds * 1000:9.1f} ms/batch"
  if reference_seconds is not None:
    line += f"  {reference_seconds / seconds:6.2f}x vs torch"
  return line

"""Atomic file writes: nothing is ever left written half-way."""

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image


def background_threads() -> int:
  """Threads for host work run behind the main loop (ahead-of-time compiles, reports): one per
  four cores, 1 to 4, so that on few cores the main loop keeps its own."""
  return max(1, min(4, (os.cpu_count() or 1) // 4))


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
  """Calls `write(f)` on a temporary file beside `path`, then renames it over `path`; the file
  gets the permissions of one created by open() (0666 less the umask), not mkstemp's 0600."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
  try:
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str) -> None:
  atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def cache_dir(*parts: str) -> str:
  """adjax's cache directory: $ADJAX_CACHE_DIR, else $XDG_CACHE_HOME/adjax, else ~/.cache/adjax."""
  root = os.environ.get("ADJAX_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "adjax")
  path = os.path.join(root, *parts)
  os.makedirs(path, exist_ok=True)
  return path


# JAX's default keeps only programs that took >= 1 s to compile. A run also compiles dozens of
# small ones (row gathers, the scoring and map programs, optimiser set-up), each still costly
# on a GPU (ptxas, autotuning), so we keep those too: reading an entry back is a file read.
MIN_CACHED_COMPILE_SECONDS = 0.05

# Without a limit the cache only grows (every new image size, batch size or backbone adds
# programs). Beyond this size JAX deletes the least recently used entries (its eviction needs
# the filelock package, one of our dependencies). JAX_COMPILATION_CACHE_MAX_SIZE (bytes, -1: no
# limit) overrides it.
DEFAULT_CACHE_MAX_BYTES = 2 * 2 ** 30


def enable_compilation_cache() -> None:
  """Compiled programs persist across runs in <adjax cache>/xla (JAX_COMPILATION_CACHE_DIR,
  when set, is used instead; ADJAX_COMPILATION_CACHE=0 turns the cache off), so a rerun, a
  resume or an eval after training skips most compilation. It keeps at most
  DEFAULT_CACHE_MAX_BYTES unless JAX_COMPILATION_CACHE_MAX_SIZE says otherwise."""
  import jax
  if os.environ.get("ADJAX_COMPILATION_CACHE", "1") == "0":
    return
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir("xla"))
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    jax.config.update("jax_compilation_cache_max_size", DEFAULT_CACHE_MAX_BYTES)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS)


def write_png(path: str, array: np.ndarray) -> None:
  """A uint8 image array as a PNG file, atomically, at zlib level 1: the overlays and masks of a large
  predict run spend most of their time in PNG encoding, several times longer at Pillow's default."""
  atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG", compress_level=1))

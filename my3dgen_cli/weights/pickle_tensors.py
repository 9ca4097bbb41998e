"""Stand-ins for the tensor, storage and numpy globals an official pickle names: they build values only.

Storages are read by `torch.load(weights_only=True)` (torch's own restricted loader) after their
declared size is charged to the allocation budget (`pickle_budget.charge`); tensor views may not be
larger than their storage; numpy arrays of object dtype are refused.
"""

from __future__ import annotations

import io
import math
import pickle
import warnings
from typing import Any, BinaryIO

import numpy as np
import torch

from my3dgen_cli.errors import UnsafeCheckpointError, UserInputError
from my3dgen_cli.weights.pickle_budget import charge
from my3dgen_cli.weights.pickle_opcodes import BoundedUnpickler
from my3dgen_cli.weights.pickle_records import ForeignObject, _int_tuple, _one_line


class _Storage:
    """A storage read by `torch.load(weights_only=True)`: untyped bytes plus the element dtype."""

    __slots__ = ("untyped", "dtype")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped = untyped
        self.dtype = dtype


def _load_from_bytes(data: Any) -> _Storage:
    """`torch.storage._load_from_bytes`, but through torch's weights-only unpickler."""
    if not isinstance(data, (bytes, bytearray)):
        raise UserInputError(f"a storage record holds {type(data).__name__}, expected bytes")
    charge(_declared_storage_bytes(bytes(data)), "a tensor storage")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation: we only read it once
            storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _one_line(err)
        raise UnsafeCheckpointError(
            f"a tensor storage was refused by torch's weights-only loader ({reason})"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch's legacy reader asserts and raises freely on damaged bytes
        raise UserInputError(f"a tensor storage is not readable ({_one_line(err)})") from None
    if isinstance(storage, torch.TypedStorage):
        return _Storage(storage._untyped_storage, storage.dtype)
    if isinstance(storage, torch.UntypedStorage):
        return _Storage(storage, torch.uint8)
    raise UserInputError(f"a storage record holds {type(storage).__name__}, expected a tensor storage")


class _StorageHeader(BoundedUnpickler):
    """Reads only the persistent ids of a legacy `torch.save` stream, to learn the storage sizes it
    declares before torch allocates them; every global is a plain name, nothing is built."""

    def __init__(self, file: BinaryIO) -> None:
        super().__init__(file)
        self.declared = 0

    def find_class(self, module: str, name: str) -> Any:
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return name
        raise UnsafeCheckpointError(f"a tensor storage asks for `{module}.{name}`, which a storage never needs")

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise UserInputError("a tensor storage record is malformed")
        storage_type, numel = pid[1], pid[4]
        if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
            raise UserInputError(f"a tensor storage declares {numel!r} elements, expected a count")
        kind = storage_type.removesuffix("Storage") if isinstance(storage_type, str) else ""
        itemsize = _STORAGE_ITEMSIZE.get(kind, 8)
        self.declared += numel * itemsize
        return None


# Element sizes of the legacy typed storages (`torch.FloatStorage` -> "Float"); unknown ones count 8.
_STORAGE_ITEMSIZE = {"Float": 4, "Double": 8, "Half": 2, "BFloat16": 2, "Byte": 1, "Char": 1, "Short": 2,
                     "Int": 4, "Long": 8, "Bool": 1, "Untyped": 1}


def _declared_storage_bytes(data: bytes) -> int:
    """Bytes the storages of a legacy `torch.save` stream will allocate; the zip format is refused
    (official pickles never use it, and its records are sized outside the pickle)."""
    if data.startswith(b"PK\x03\x04"):
        raise UserInputError("a tensor storage is a zip archive, expected the legacy torch.save format")
    stream = io.BytesIO(data)
    header = _StorageHeader(stream)
    try:
        for _ in range(4):  # magic number, protocol version, sys info, then the storage itself
            header.load()
            if header.declared:
                break
    except (UnsafeCheckpointError, UserInputError):
        raise
    except Exception as err:  # noqa: BLE001 - any parse failure of the header is a malformed file
        raise UserInputError(f"a tensor storage is not readable ({_one_line(err)})") from None
    if header.declared > len(data):
        raise UserInputError(f"a tensor storage declares {header.declared:,} bytes but holds {len(data):,}")
    return header.declared


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise UserInputError(f"a tensor record holds {type(storage).__name__}, expected a storage")
    if not _int_tuple(size) or not _int_tuple(stride) or not isinstance(storage_offset, int):
        raise UserInputError(f"a tensor record has size {size!r}, stride {stride!r}: expected tuples of ints")
    if any(v < 0 for v in (*size, *stride, storage_offset)):
        raise UserInputError(f"a tensor record has size {size!r}, stride {stride!r}: expected no negative values")
    itemsize = torch.empty((), dtype=storage.dtype).element_size()
    if math.prod(size) * itemsize > storage.untyped.nbytes():
        # A view larger than its storage (stride 0) would become that large on the first copy.
        raise UserInputError(f"a tensor record of size {tuple(size)} is larger than its storage")
    tensor = torch.empty((0,), dtype=storage.dtype)
    return tensor.set_(storage.untyped, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    # requires_grad, hooks and metadata describe autograd state, which a weights file never needs.
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise UserInputError(f"a parameter record holds {type(data).__name__}, expected a tensor")
    return data  # a plain tensor: the reader returns a state dict, not modules


class _TensorType(ForeignObject):
    qualname = "torch.Tensor"


class _ParameterType(ForeignObject):
    qualname = "torch.nn.parameter.Parameter"


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> torch.Tensor:
    if func not in (_rebuild_tensor_v2, _rebuild_parameter) or new_type not in (_TensorType, _ParameterType):
        raise UnsafeCheckpointError("torch._utils._rebuild_from_type_v2 asks for more than a plain tensor")
    if not isinstance(args, tuple):
        raise UserInputError("a tensor record is malformed: expected an argument tuple")
    return func(*args)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UnsafeCheckpointError("a numpy scalar record is not a plain number (object dtype or no bytes)")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].copy()


def _numpy_array(shape: Any, dtype: Any, *args: Any) -> np.ndarray:
    """A fresh numpy array of `shape`, charged to the budget before numpy allocates it."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise UnsafeCheckpointError("a numpy array record asks for object dtype")
    dims = (shape,) if isinstance(shape, int) else shape
    if not _int_tuple(dims) or any(d < 0 for d in dims):
        raise UserInputError(f"a numpy array record has shape {shape!r}, expected non-negative ints")
    charge(math.prod(dims) * dtype.itemsize, "a numpy array")
    return np.ndarray.__new__(np.ndarray, tuple(dims), dtype, *args)


class _NdarrayType:
    """Stand-in for the class `numpy.ndarray`: called (REDUCE/NEWOBJ), it makes a budgeted array."""

    def __new__(cls, shape: Any = (0,), dtype: Any = float, *args: Any) -> Any:  # type: ignore[misc]
        if cls is not _NdarrayType:
            raise UnsafeCheckpointError("a numpy array record asks for a subclass of numpy.ndarray")
        return _numpy_array(shape, dtype, *args)


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _NdarrayType:
        raise UnsafeCheckpointError(f"numpy _reconstruct asks for {subtype!r}, expected numpy.ndarray")
    return _numpy_array(shape, dtype)


def _bytearray(source: Any = b"", *args: Any) -> bytearray:
    """`bytearray(...)`; a length (`bytearray(n)`) is charged to the budget before it is allocated."""
    if isinstance(source, int) and not isinstance(source, bool):
        charge(source, "bytearray")
    return bytearray(source, *args)

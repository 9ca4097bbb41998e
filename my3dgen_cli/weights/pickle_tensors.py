"""Stand-ins for the tensor, storage and numpy globals an official pickle names: they build values only.

Storages are read by `torch.load(weights_only=True)` (torch's own restricted loader) after their
declared size is charged to the allocation budget (`pickle_budget.charge`); tensor views may not be
larger than their storage; numpy arrays of object dtype are refused.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import warnings
from typing import Any, BinaryIO

import numpy as np
import torch

from my3dgen_cli.errors import UnsafeCheckpointError, UserInputError
from my3dgen_cli.weights.pickle_budget import charge
from my3dgen_cli.weights.pickle_opcodes import BoundedUnpickler
from my3dgen_cli.weights.pickle_records import ForeignObject, _int_tuple, _one_line, short_repr


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

    max_int_bits = 80  # torch.save's legacy magic number is 0x1950a86a20f9469cfc6c

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
            raise UserInputError(f"a tensor storage declares {short_repr(numel)} elements, expected a count")
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
        # then the storage keys, a list of names: read here with the bounds too, not only by torch's
        # loader, which would hash a 300,000-deep tuple among them (a segfault)
        keys = header.load()
    except (UnsafeCheckpointError, UserInputError):
        raise
    except Exception as err:  # noqa: BLE001 - any parse failure of the header is a malformed file
        raise UserInputError(f"a tensor storage is not readable ({_one_line(err)})") from None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise UserInputError("a tensor storage's key list is malformed: expected a list of names")
    if header.declared > len(data):
        raise UserInputError(f"a tensor storage declares {header.declared:,} bytes but holds {len(data):,}")
    return header.declared


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise UserInputError(f"a tensor record holds {type(storage).__name__}, expected a storage")
    if not _int_tuple(size) or not _int_tuple(stride) or not isinstance(storage_offset, int):
        raise UserInputError(f"a tensor record has size {short_repr(size)}, stride {short_repr(stride)}: "
                             "expected tuples of ints")
    if any(v < 0 for v in (*size, *stride, storage_offset)):
        raise UserInputError(f"a tensor record has size {short_repr(size)}, stride {short_repr(stride)}: "
                             "expected no negative values")
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


# numpy dtypes a record may name: booleans and numbers, as `np.dtype(spec)` pickles them ("f8", "i4", "b1").
_DTYPE_SPEC = re.compile(r"[<>|=]?(b1?|[iu][1248]?|f[248]?|c(8|16))")  # no f16/c32: long doubles are not JSON
_DTYPE_KINDS = "biufc"


def _plain_dtype(dtype: Any, what: str) -> np.dtype:
    """`dtype` if it is a plain number type (no fields, subarray or objects: numpy trusts a structured
    dtype's field offsets, and an object field is a pointer), else `UnsafeCheckpointError`."""
    if (not isinstance(dtype, np.dtype) or dtype.kind not in _DTYPE_KINDS or dtype.fields is not None
            or dtype.subdtype is not None or dtype.hasobject):
        raise UnsafeCheckpointError(f"{what} asks for numpy dtype {short_repr(dtype)}, expected a number type")
    return dtype


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """`numpy.dtype(spec, align, copy)` for a number type's name only, always a new object (never numpy's own
    float32, whose byte order a BUILD would then change for the whole process)."""
    if not isinstance(spec, str) or not _DTYPE_SPEC.fullmatch(spec):
        raise UnsafeCheckpointError(f"a numpy dtype record asks for {short_repr(spec)}, expected a number type")
    return _plain_dtype(np.dtype(spec, copy=True), "a numpy dtype record")  # a copy: BUILD may set its byte order


def build_dtype(dtype: np.dtype, state: Any) -> None:
    """BUILD on a dtype: only the byte order of a number type, from the state numpy pickles,
    (3, byteorder, None, None, None, -1, -1, 0); numpy would take fields, offsets and flags from it."""
    _plain_dtype(dtype, "a numpy dtype's state")
    if (not isinstance(state, tuple) or len(state) != 8 or state[0] not in (3, 4) or state[1] not in "<>|="
            or len(state[1]) != 1 or state[2:5] != (None, None, None) or state[5:] != (-1, -1, 0)):
        raise UnsafeCheckpointError("a numpy dtype's state asks for more than a byte order")
    dtype.__setstate__((3, state[1], None, None, None, -1, -1, 0))


def build_ndarray(array: np.ndarray, state: Any) -> None:
    """BUILD on an array: (1, shape, dtype, fortran, bytes) of a plain dtype, the bytes exactly its size."""
    if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
        raise UserInputError("a numpy array's state is malformed: expected (1, shape, dtype, fortran, data)")
    _, shape, dtype, fortran, data = state
    _plain_dtype(dtype, "a numpy array's state")
    if not _int_tuple(shape) or any(d < 0 for d in shape) or not isinstance(fortran, bool):
        raise UserInputError(f"a numpy array's state has shape {short_repr(shape)}, expected non-negative ints")
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
        raise UserInputError("a numpy array's data is not the size its shape and dtype say")
    array.__setstate__((1, tuple(shape), dtype, fortran, data))


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _plain_dtype(dtype, "a numpy scalar record")
    if not isinstance(data, (bytes, bytearray)) or len(data) != dtype.itemsize:
        raise UserInputError("a numpy scalar record does not hold its number's bytes")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].copy()


def _numpy_array(shape: Any, dtype: Any, *args: Any) -> np.ndarray:
    """A fresh numpy array of `shape`, charged to the budget before numpy allocates it."""
    if args:
        raise UnsafeCheckpointError("a numpy array record asks for a buffer, offset or strides")
    if dtype is float:  # np.ndarray's default
        dtype = np.dtype(np.float64)
    if isinstance(dtype, bytes):  # numpy's _reconstruct is pickled with the placeholder b"b"
        dtype = dtype.decode("latin-1")
    dtype = _numpy_dtype(dtype) if isinstance(dtype, str) else _plain_dtype(dtype, "a numpy array record")
    dims = (shape,) if isinstance(shape, int) else shape
    if not _int_tuple(dims) or any(d < 0 for d in dims):
        raise UserInputError(f"a numpy array record has shape {short_repr(shape)}, expected non-negative ints")
    charge(math.prod(dims) * dtype.itemsize, "a numpy array")
    return np.ndarray.__new__(np.ndarray, tuple(dims), dtype)


class _NdarrayType:
    """Stand-in for the class `numpy.ndarray`: called (REDUCE/NEWOBJ), it makes a budgeted array."""

    def __new__(cls, shape: Any = (0,), dtype: Any = float, *args: Any) -> Any:  # type: ignore[misc]
        if cls is not _NdarrayType:
            raise UnsafeCheckpointError("a numpy array record asks for a subclass of numpy.ndarray")
        return _numpy_array(shape, dtype, *args)


def _numpy_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _NdarrayType:
        raise UnsafeCheckpointError(f"numpy _reconstruct asks for {short_repr(subtype)}, expected numpy.ndarray")
    return _numpy_array(shape, dtype)


def _bytearray(source: Any = b"", *args: Any) -> bytearray:
    """`bytearray(...)` as pickle writes it: of bytes, of a latin-1 string (protocols 0-2), or a length,
    charged to the budget before it is allocated. No other codec: each is code (an import, and some,
    like punycode, take quadratic time)."""
    if isinstance(source, int) and not isinstance(source, bool) and not args:
        charge(source, "bytearray")
        return bytearray(source)
    if isinstance(source, bytes) and not args:
        return bytearray(source)
    if isinstance(source, str) and args in (("latin-1",), ("latin1",)):
        return bytearray(source, "latin-1")
    raise UnsafeCheckpointError("a bytearray record asks for more than bytes, a latin-1 string or a length")

"""A restricted unpickler for official EG3D network pickles: data comes out, code never runs.

The official loader (`torch_utils/persistence.py`) rebuilds every network by executing the Python
source stored in the pickle (`meta.module_src`) and importing the classes it names. We do neither.
Every global the pickle asks for is looked up in `_allowed_globals()`, which maps it to an inert
stand-in written here:

- `torch_utils.persistence._reconstruct_persistent_obj(meta)` -> `PersistentObject` (class name, the
  module `__dict__` as `state`, and `module_src` kept as text that is never compiled);
- the few non-persistent module classes of the official tree (`OSGDecoder`, `ImportanceRenderer`,
  `MipRayMarcher2`, `RaySampler`, `torch.nn.Sequential`, `torch.nn.Softplus`, ...) -> `ForeignObject`
  subclasses that only store the pickled `__dict__`;
- `dnnlib.util.EasyDict` -> `EasyDictRecord` (a plain dict subclass); `collections.OrderedDict`;
- tensor and parameter rebuilders -> tensors over storages that `torch.load(weights_only=True)` reads
  from the pickled storage bytes (torch's own restricted loader);
- numpy scalars, dtypes and arrays of non-object dtype; `set`, `frozenset`, `bytearray`.

Every allocation a stand-in makes (a `bytearray(n)`, a storage, a numpy array, a tensor view) is
charged to a budget of the bytes actually read from the file (`_AllocationBudget`), and reads are capped
at the bytes left in it: a 32-byte pickle cannot ask for gigabytes.

Anything else (`posix.system`, `builtins.eval`, `subprocess.Popen`, any other class) raises
`UnsafeCheckpointError` naming the global at the moment the unpickler meets it. Everything that ran
before that point was one of the stand-ins above, which build values and nothing else.
"""

from __future__ import annotations

import collections
import contextvars
import io
import math
import os
import pickle
import re
import warnings
from typing import Any, BinaryIO

import numpy as np
import torch

from my3dgen_cli.errors import UnsafeCheckpointError, UserInputError


class PersistentObject:
    """What `_reconstruct_persistent_obj(meta)` would have built, kept as data.

    `state` is the pickled module `__dict__` (`_parameters`, `_buffers`, `_modules`, `_init_kwargs`,
    ...). `module_src` is the source the official loader would `exec`; it is kept as a string only.
    """

    __slots__ = ("class_name", "version", "state", "module_src")

    def __init__(self, class_name: str, version: Any, state: dict[str, Any], module_src: str) -> None:
        self.class_name = class_name
        self.version = version
        self.state = state
        self.module_src = module_src

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name!r}, {len(self.state)} attributes)"


class ForeignObject:
    """An instance of an allowed non-persistent class, kept as its qualified name and `__dict__`."""

    qualname = "object"

    def __new__(cls, *args: Any, **kwargs: Any) -> ForeignObject:
        obj = object.__new__(cls)
        obj.state = {}
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {"__state__": state}

    def __repr__(self) -> str:
        return f"ForeignObject({self.qualname!r})"


class EasyDictRecord(dict):
    """Stand-in for `dnnlib.util.EasyDict`: the same items, no attribute magic."""


class _Storage:
    """A storage read by `torch.load(weights_only=True)`: untyped bytes plus the element dtype."""

    __slots__ = ("untyped", "dtype")

    def __init__(self, untyped: torch.UntypedStorage, dtype: torch.dtype) -> None:
        self.untyped = untyped
        self.dtype = dtype


# --- the allocation budget --------------------------------------------------------------------

# Slack over the file size, for small pickles whose records legitimately build a few small objects.
_BUDGET_SLACK = 1 << 20


class _AllocationBudget:
    """Bytes a pickle may make the stand-ins allocate: no more than the bytes of the file read so far.

    A legitimate weights pickle carries every byte of every storage in the file itself, before the
    record that builds it, so what it asks for never exceeds what was read; anything more is a hostile
    or broken file. (Also right for a decompressed stream, whose size is unknown up front.)
    """

    def __init__(self, reader: _CappedReader) -> None:
        self.reader = reader
        self.charged = 0

    def charge(self, nbytes: int, what: str) -> None:
        if nbytes < 0:
            raise UserInputError(f"{what} asks for a negative size")
        if self.charged + nbytes > self.reader.seen + _BUDGET_SLACK:
            raise UserInputError(f"{what} asks for {nbytes:,} bytes, more than the file itself holds")
        self.charged += nbytes


_BUDGET: contextvars.ContextVar[_AllocationBudget] = contextvars.ContextVar("my3dgen_unpickle_budget")


def _charge(nbytes: int, what: str) -> None:
    budget = _BUDGET.get(None)
    if budget is None:  # a stand-in called outside safe_load: no file to bound it by
        raise UserInputError(f"{what}: outside safe_load, no allocation budget")
    budget.charge(nbytes, what)


class _CappedReader:
    """A file view that counts the bytes seen and, where the size is known, never asks the OS for more
    than the bytes left.

    Pickle's length-prefixed records (BINBYTES8, BINUNICODE8, ...) would otherwise make the
    unpickler request a buffer of the declared length before it finds the file is shorter.
    """

    def __init__(self, file: BinaryIO, size: int | None) -> None:
        self._file = file
        self._left = size
        self._consumed = 0
        self.seen = 0  # bytes read or peeked at: what the budget allows

    def _cap(self, n: int | None) -> int:
        if self._left is None:
            return -1 if n is None else n
        return self._left if n is None or n < 0 else min(n, self._left)

    def _took(self, count: int) -> None:
        self._consumed += count
        self.seen = max(self.seen, self._consumed)
        if self._left is not None:
            self._left -= count

    def read(self, n: int = -1) -> bytes:
        data = self._file.read(self._cap(n))
        self._took(len(data))
        return data

    def readline(self, limit: int = -1) -> bytes:
        data = self._file.readline(self._cap(limit))
        self._took(len(data))
        return data

    def peek(self, n: int = 0) -> bytes:
        """Buffered bytes ahead (lets pickle prefetch instead of one read per record)."""
        peek = getattr(self._file, "peek", None)
        data = peek(n) if peek is not None else b""
        if self._left is not None:
            data = data[: self._left]
        self.seen = max(self.seen, self._consumed + len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._left is not None:
            view = view[: self._left]
        n = self._file.readinto(view) or 0
        self._took(n)
        return n


def _file_size(file: BinaryIO) -> int | None:
    """Bytes left in a plain file (None for a decompressing stream, whose fileno is the compressed file)."""
    if not isinstance(file, (io.BufferedReader, io.FileIO, io.BytesIO)):
        return None
    if isinstance(file, io.BytesIO):
        return len(file.getbuffer()) - file.tell()
    return os.fstat(file.fileno()).st_size - file.tell()


# --- stand-ins for the globals an official pickle names ----------------------------------------


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise UserInputError(
            "a persistent object record is malformed: expected type 'class' and a state dict"
        )
    class_name = meta.get("class_name")
    if not isinstance(class_name, str):
        raise UserInputError(f"a persistent object record has class_name {class_name!r}, expected a string")
    src = meta.get("module_src")
    src = src if isinstance(src, str) else ""
    return PersistentObject(class_name, meta.get("version"), dict(meta["state"]), src)


def _load_from_bytes(data: Any) -> _Storage:
    """`torch.storage._load_from_bytes`, but through torch's weights-only unpickler."""
    if not isinstance(data, (bytes, bytearray)):
        raise UserInputError(f"a storage record holds {type(data).__name__}, expected bytes")
    _charge(_declared_storage_bytes(bytes(data)), "a tensor storage")
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


class _StorageHeader(pickle.Unpickler):
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
    _charge(math.prod(dims) * dtype.itemsize, "a numpy array")
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
        _charge(source, "bytearray")
    return bytearray(source, *args)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """`copyreg._reconstructor` (protocol 0/1 objects), for the stand-in classes only."""
    if cls is EasyDictRecord and base is dict and isinstance(state, dict):
        return EasyDictRecord(state)
    if isinstance(cls, type) and issubclass(cls, ForeignObject) and base is object:
        return cls.__new__(cls)
    raise UnsafeCheckpointError(f"copyreg._reconstructor asks for {cls!r} on {base!r}, which is not allowed")


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode`: how protocol 2 stores bytes; latin-1 of a string only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("_codecs.encode is allowed only as the protocol-2 encoding of bytes")
    return text.encode("latin-1")


# --- the allow-list ----------------------------------------------------------------------------

# Non-persistent classes of the official TriPlaneGenerator tree (module, name). Their module source is
# not in the pickle at all; the official loader imports them from the `training` package.
_FOREIGN_CLASSES = {
    ("training.triplane", "OSGDecoder"),
    ("training.volumetric_rendering.renderer", "ImportanceRenderer"),
    ("training.volumetric_rendering.ray_marcher", "MipRayMarcher2"),
    ("training.volumetric_rendering.ray_sampler", "RaySampler"),
}
# A network that was itself loaded from a pickle and saved again names its classes by the module the
# persistence loader made up for the executed source.
_IMPORTED_MODULE = re.compile(r"_imported_module_[0-9a-f]{32}")
_FOREIGN_NAMES = {name for _, name in _FOREIGN_CLASSES}
_foreign_cache: dict[tuple[str, str], type[ForeignObject]] = {}


def _foreign_class(module: str, name: str) -> type[ForeignObject]:
    key = (module, name)
    if key not in _foreign_cache:
        _foreign_cache[key] = type(name, (ForeignObject,), {"qualname": f"{module}.{name}"})
    return _foreign_cache[key]


def _is_torch_nn_module(module: str, name: str) -> bool:
    """A built-in `torch.nn` module class (Sequential, Softplus, ...); never instantiated here."""
    if not module.startswith("torch.nn.modules.") or not name.isidentifier():
        return False
    cls = getattr(torch.nn, name, None)
    return isinstance(cls, type) and issubclass(cls, torch.nn.Module) and cls.__module__ == module


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): EasyDictRecord,
    ("dnnlib", "EasyDict"): EasyDictRecord,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _ParameterType,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "object"): object,  # base class argument of copyreg._reconstructor (protocol 0/1)
    ("builtins", "dict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
}


# Python 2 module names that pickle protocols 0-2 write for builtins (pickle's fix_imports).
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def resolve_global(module: str, name: str) -> Any:
    """The stand-in for global `module.name`, or `UnsafeCheckpointError` naming it."""
    module = _PY2_MODULES.get(module, module)
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if (module, name) in _FOREIGN_CLASSES or _is_torch_nn_module(module, name):
        return _foreign_class(module, name)
    if _IMPORTED_MODULE.fullmatch(module) and name in _FOREIGN_NAMES:
        return _foreign_class(module, name)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    raise UnsafeCheckpointError(
        f"the pickle asks for `{module}.{name}`, which an EG3D weights file never needs; "
        "refused before it could run (nothing from the file was imported or executed)"
    )


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose globals come only from the allow-list above."""

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UserInputError("the pickle uses persistent ids (a torch.save file?), expected a network pickle")


def safe_load(file: BinaryIO) -> Any:
    """Unpickle `file` with `RestrictedUnpickler`; a malformed stream raises `UserInputError`.

    Every allocation is bounded by the bytes read from `file` (`_AllocationBudget`, `_CappedReader`).
    """
    reader = _CappedReader(file, _file_size(file))
    token = _BUDGET.set(_AllocationBudget(reader))
    try:
        return RestrictedUnpickler(reader).load()
    except (UnsafeCheckpointError, UserInputError):
        raise
    except EOFError:
        raise UserInputError("the file ends early (truncated download?)") from None
    except pickle.UnpicklingError as err:
        if "truncated" in str(err):  # how pickle reports a record cut off mid-way (no EOFError then)
            raise UserInputError("the file ends early (truncated download?)") from None
        raise UserInputError(f"not a readable pickle ({_one_line(err)})") from None
    except RecursionError:
        raise UserInputError("the pickle nests too deeply") from None
    except (
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        RuntimeError,
        OverflowError,
        UnicodeDecodeError,
    ) as err:
        raise UserInputError(f"not a readable pickle ({_one_line(err)})") from None
    except MemoryError:
        raise UserInputError("the pickle asks for more memory than this machine has") from None
    finally:
        _BUDGET.reset(token)


def _int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) for v in value)


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__: list[str] = [
    "EasyDictRecord",
    "ForeignObject",
    "PersistentObject",
    "RestrictedUnpickler",
    "resolve_global",
    "safe_load",
]

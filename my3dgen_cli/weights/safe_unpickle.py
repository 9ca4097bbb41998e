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
charged to a budget of the bytes actually read from the file (`pickle_budget`), and reads are capped
at the bytes left in it: a 32-byte pickle cannot ask for gigabytes. The opcode loop is Python's
reference unpickler (`pickle_opcodes`), whose records never allocate before their bytes are read.

Anything else (`posix.system`, `builtins.eval`, `subprocess.Popen`, any other class) raises
`UnsafeCheckpointError` naming the global at the moment the unpickler meets it. Everything that ran
before that point was one of the stand-ins above, which build values and nothing else.
"""

from __future__ import annotations

import collections
import pickle
import re
from typing import Any, BinaryIO

import numpy as np
import torch

from my3dgen_cli.errors import UnsafeCheckpointError, UserInputError
from my3dgen_cli.weights.pickle_budget import bounded_reader
from my3dgen_cli.weights.pickle_opcodes import BoundedUnpickler, Opcodes, check_keys, checked_pairs
from my3dgen_cli.weights.pickle_records import EasyDictRecord, ForeignObject, PersistentObject, _one_line, short_repr
from my3dgen_cli.weights.pickle_tensors import (
    _bytearray,
    _load_from_bytes,
    _NdarrayType,
    _numpy_dtype,
    _numpy_reconstruct,
    _numpy_scalar,
    _ParameterType,
    _rebuild_from_type_v2,
    _rebuild_parameter,
    _rebuild_tensor,
    _rebuild_tensor_v2,
    _TensorType,
    build_dtype,
    build_ndarray,
)


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise UserInputError(
            "a persistent object record is malformed: expected type 'class' and a state dict"
        )
    class_name = meta.get("class_name")
    if not isinstance(class_name, str):
        raise UserInputError(f"a persistent object record has class_name {short_repr(class_name)}, expected a string")
    src = meta.get("module_src")
    src = src if isinstance(src, str) else ""
    return PersistentObject(class_name, meta.get("version"), dict(meta["state"]), src)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """`copyreg._reconstructor` (protocol 0/1 objects), for the stand-in classes only."""
    if cls is EasyDictRecord and base is _dict and isinstance(state, dict):  # `_dict`: builtins.dict here
        return EasyDictRecord(state)
    if isinstance(cls, type) and issubclass(cls, ForeignObject) and base is object:
        return cls.__new__(cls)
    raise UnsafeCheckpointError(
        f"copyreg._reconstructor asks for {short_repr(cls)} on {short_repr(base)}, which is not allowed"
    )


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """`_codecs.encode`: how protocol 2 stores bytes; latin-1 of a string only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("_codecs.encode is allowed only as the protocol-2 encoding of bytes")
    return text.encode("latin-1")


def _set(items: Any = ()) -> set:
    """`set(items)`, of plain keys only (`pickle_opcodes.KEY_TYPES`)."""
    items = list(items) if isinstance(items, (list, tuple, set, frozenset)) else _not_iterable(items)
    check_keys(items, "a set")
    return set(items)


def _frozenset(items: Any = ()) -> frozenset:
    return frozenset(_set(items))


def _dict(items: Any = ()) -> dict:
    """`dict(items)` of a dict or of (key, value) pairs, with plain keys."""
    return dict(checked_pairs(items, "a dict"))


def _ordered_dict(items: Any = ()) -> collections.OrderedDict:
    return collections.OrderedDict(_dict(items))


def _not_iterable(items: Any) -> Any:
    raise UserInputError(f"a set record is built from a {type(items).__name__}, expected a list")


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
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _TensorType,
    ("torch.nn.parameter", "Parameter"): _ParameterType,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "object"): object,  # base class argument of copyreg._reconstructor (protocol 0/1)
    ("builtins", "dict"): _dict,
    ("builtins", "set"): _set,
    ("builtins", "frozenset"): _frozenset,
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
    if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # not getattr: torch's lazy
        return vars(torch)[name]  # __getattr__ imports submodules and warns for some names
    raise UnsafeCheckpointError(
        f"the pickle asks for `{module}.{name}`, which an EG3D weights file never needs; "
        "refused before it could run (nothing from the file was imported or executed)"
    )


class RestrictedUnpickler(BoundedUnpickler):
    """The reference unpickler (`pickle_opcodes`) whose globals come only from the allow-list above."""

    def find_class(self, module: str, name: str) -> Any:
        return resolve_global(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UserInputError("the pickle uses persistent ids (a torch.save file?), expected a network pickle")

    def load_build(self) -> None:
        """BUILD (`obj.__setstate__(state)`) only where an EG3D pickle uses it: the `__dict__` of a
        non-persistent module (kept as data), a dtype's byte order, an array's bytes. On anything
        else it would rewrite a record after its checks (a tensor's size, a `PersistentObject`)."""
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, ForeignObject):
            target.__setstate__(state)
        elif type(target) is np.ndarray:
            build_ndarray(target, state)
        elif isinstance(target, np.dtype):
            build_dtype(target, state)
        else:
            raise UnsafeCheckpointError(
                f"the pickle sets the state of a {type(target).__name__}, which an EG3D weights file never does"
            )

    dispatch = Opcodes(BoundedUnpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def safe_load(file: BinaryIO, *, stream_limit: int | None = None) -> Any:
    """Unpickle `file` with `RestrictedUnpickler`; a malformed stream raises `UserInputError`.

    Every allocation is bounded by the bytes read from `file` (`pickle_budget`); a decompressing
    `file` may yield at most `stream_limit` bytes.
    """
    with bounded_reader(file, stream_limit) as reader:
        return _unpickle(reader)


def _unpickle(reader: Any) -> Any:
    """RestrictedUnpickler(reader).load(), each failure of a malformed stream as one `UserInputError`."""
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
    except MemoryError:
        raise UserInputError("the pickle asks for more memory than this machine has") from None
    except Exception as err:  # noqa: BLE001 - whatever a malformed stream makes an opcode or a stand-in raise
        raise UserInputError(f"not a readable pickle ({_one_line(err)})") from None


__all__: list[str] = [
    "EasyDictRecord",
    "ForeignObject",
    "PersistentObject",
    "RestrictedUnpickler",
    "resolve_global",
    "safe_load",
]

"""Official EG3D network pickles (`.pkl`), read as plain data without running anything in them.

Official network pickle (NVlabs/eg3d `training_loop.py` writes it with plain `pickle.dump`)::

    {"G": <net>, "D": <net>, "G_ema": <net>, "augment_pipe": <net>, "training_set_kwargs": {...}}

A network saved again on its own (`pickle.dump(G_ema)`, or a dict holding only some of the keys) is
read too. The training loop registers `dataset_label_std` (the camera labels' std) on G before
copying it to G_ema, so every official snapshot carries it; the generator never reads it, so it is
dropped by name (`IGNORED_TENSORS`) and the converted JSON lists it under "dropped". Any other
tensor the generator does not have is still an error.

Each `<net>` is a `torch_utils.persistence` record: class name, the Python source of its module (which
the official loader executes; we never do, see `safe_unpickle`) and the module `__dict__`. We walk
`_parameters`, `_buffers` and `_modules` of that `__dict__` to get the state dict under the official
dotted names, in `nn.Module.state_dict()` order.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from my3dgen_cli.errors import UnsafeCheckpointError, UserInputError
from my3dgen_cli.weights.pickle_records import EasyDictRecord, ForeignObject, PersistentObject, short_repr
from my3dgen_cli.weights.safe_unpickle import safe_load

# Official module of each top-level network class, so class_name reads like eg3d_parity/config.json.
_CLASS_MODULES = {"TriPlaneGenerator": "training.triplane"}
# Positional parameters of TriPlaneGenerator.__init__ (triplane.py), for pickles made with positional args.
_TRIPLANE_ARGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
_EXPECTED = "expected an EG3D network pickle (.pkl)"
_GENERATOR_CLASS = "TriPlaneGenerator"
# Tensors of an official snapshot that the generator never reads, dropped by name (and why).
IGNORED_TENSORS = {
    "dataset_label_std": "the camera labels' std over the training set, registered by training_loop.py",
}


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One network of an official EG3D pickle, as plain data.

    state_dict: official dotted names -> tensors (parameters and persistent buffers, module order,
        dtype as stored). init_kwargs / rendering_kwargs: plain dicts, lists and numbers.
    neural_rendering_resolution: the attribute of the pickled network (64 or 128 for released models).
    class_name: "training.triplane.TriPlaneGenerator" for an EG3D generator.
    """

    state_dict: dict[str, torch.Tensor]
    init_kwargs: dict[str, Any]
    rendering_kwargs: dict[str, Any]
    neural_rendering_resolution: int
    class_name: str
    dropped: tuple[str, ...] = ()  # names of IGNORED_TENSORS found in the file (not in state_dict)

    def config(self, source: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON-ready config (same layout as eg3d_parity/config.json)."""
        return {
            "init_kwargs": self.init_kwargs,
            "rendering_kwargs": self.rendering_kwargs,
            "neural_rendering_resolution": self.neural_rendering_resolution,
            "class_name": self.class_name,
            "source": dict(source or {}),
            "dropped": list(self.dropped),
        }


def read_official_pkl(path: str | Path, network: str = "G_ema") -> OfficialCheckpoint:
    """Read `network` ("G_ema", "G") from an official EG3D `.pkl` without executing anything in it.

    The file is a training snapshot (a dict with G, D, G_ema, ...), a dict holding only some of
    those, or one generator pickled on its own (then that generator is read, whatever `network`).
    Tensors in `IGNORED_TENSORS` are left out of the state dict and named in `dropped`.

    Raises:
        UserInputError: no such file, not a pickle, truncated, no `network` in it, or a network that
            is not an EG3D generator (a discriminator, another class).
        UnsafeCheckpointError: the pickle names a global outside the allow-list (`safe_unpickle`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file, {_EXPECTED}")
    with path.open("rb") as f:
        head = f.read(4)
        if head.startswith(b"PK\x03\x04"):
            raise UserInputError(f"{path}: is a zip archive (torch.save?), {_EXPECTED}")
        if not head:
            raise UserInputError(f"{path}: is empty, {_EXPECTED}")
        f.seek(0)
        try:
            data = safe_load(f)
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"{path}: {err}") from None
        except UserInputError as err:
            raise UserInputError(f"{path}: {err}") from None
    if isinstance(data, PersistentObject):  # one network saved on its own
        net, where = data, "the pickled network"
    elif isinstance(data, dict):
        if network not in data:
            names = sorted(_key_name(k) for k in itertools.islice(data, 50))
            keys = ", ".join(names[:10]) + (f", ... ({len(data)} keys)" if len(data) > 10 else "") or "none"
            raise UserInputError(f"{path}: has no '{network}' network (keys: {keys}), {_EXPECTED}")
        net, where = data[network], f"'{network}'"
    else:
        kind = type(data).__name__
        raise UserInputError(f"{path}: got a pickled {kind}, expected a dict with G, D and G_ema")
    if not isinstance(net, PersistentObject):
        kind = type(net).__name__
        raise UserInputError(f"{path}: {where} is a {kind}, expected a persistent network record")
    if net.class_name != _GENERATOR_CLASS:
        raise UserInputError(
            f"{path}: {where} is a {net.class_name}, expected an EG3D generator ({_GENERATOR_CLASS})"
        )
    try:
        return checkpoint_from_record(net)
    except UserInputError as err:
        raise UserInputError(f"{path}: {where}: {err}") from None


def checkpoint_from_record(net: PersistentObject) -> OfficialCheckpoint:
    state = net.state
    init_kwargs = plain(state.get("_init_kwargs", {}), "init_kwargs")
    if not isinstance(init_kwargs, dict):
        raise UserInputError(f"init_kwargs is a {type(init_kwargs).__name__}, expected a dict")
    init_args = plain(state.get("_init_args", ()), "init_args")
    if init_args:
        if len(init_args) > len(_TRIPLANE_ARGS):
            raise UserInputError(
                f"{net.class_name} was built with {len(init_args)} positional arguments; "
                "expected keyword arguments only"
            )
        init_kwargs = {**dict(zip(_TRIPLANE_ARGS, init_args, strict=False)), **init_kwargs}
    rendering_kwargs = plain(
        state.get("rendering_kwargs", init_kwargs.get("rendering_kwargs", {})), "rendering_kwargs"
    )
    if not isinstance(rendering_kwargs, dict):
        raise UserInputError(f"rendering_kwargs is a {type(rendering_kwargs).__name__}, expected a dict")
    nrr = plain(state.get("neural_rendering_resolution"), "neural_rendering_resolution")
    if isinstance(nrr, bool) or not isinstance(nrr, int) or nrr <= 0:
        raise UserInputError(f"neural_rendering_resolution is {short_repr(nrr)}, expected a positive int")
    module = _CLASS_MODULES.get(net.class_name)
    class_name = f"{module}.{net.class_name}" if module else net.class_name
    state_dict = _flatten(net)
    dropped = tuple(name for name in IGNORED_TENSORS if state_dict.pop(name, None) is not None)
    return OfficialCheckpoint(state_dict, init_kwargs, rendering_kwargs, nrr, class_name, dropped)


def _module_state(obj: Any, where: str) -> dict[str, Any]:
    if isinstance(obj, (PersistentObject, ForeignObject)) and isinstance(obj.state, dict):
        return obj.state
    raise UserInputError(f"module '{where or '<root>'}' is a {type(obj).__name__}, expected a network module")


def _flatten(root: Any) -> dict[str, torch.Tensor]:
    """State dict of a module record, in `nn.Module.state_dict()` order: own parameters, own
    persistent buffers, then each child, depth first."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", root)]
    while stack:
        prefix, obj = stack.pop()
        if id(obj) in seen:
            raise UserInputError(f"module '{prefix.rstrip('.')}' appears twice in the module tree")
        seen.add(id(obj))
        state = _module_state(obj, prefix.rstrip("."))
        skip = state.get("_non_persistent_buffers_set") or set()
        if not isinstance(skip, (set, frozenset, list, tuple)) or not all(isinstance(n, str) for n in skip):
            raise UserInputError(f"module '{prefix.rstrip('.') or '<root>'}' has a malformed buffer set")
        skip = set(skip)  # a list's `in` would take time quadratic in the file
        buffers = [(n, v) for n, v in _items(state, "_buffers", prefix) if n not in skip]
        for name, value in [*_items(state, "_parameters", prefix), *buffers]:
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise UserInputError(f"{prefix}{name} is a {type(value).__name__}, expected a tensor")
            # detach(): a fresh tensor object, so nothing set on the unpickled one comes along.
            out[prefix + name] = value.detach()
        children = [
            (f"{prefix}{name}.", child)
            for name, child in _items(state, "_modules", prefix)
            if child is not None
        ]
        stack.extend(reversed(children))
    return out


def _items(state: dict[str, Any], key: str, prefix: str) -> list[tuple[str, Any]]:
    table = state.get(key, {})
    if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
        raise UserInputError(f"module '{prefix.rstrip('.') or '<root>'}' has a malformed {key}")
    return list(table.items())


_MAX_CONFIG_DEPTH = 32
_MAX_CONFIG_VALUES = 100_000


def plain(value: Any, where: str) -> Any:
    """EasyDicts, numpy scalars and tuples -> dicts, Python numbers and lists (JSON-ready).

    At most `_MAX_CONFIG_VALUES` values: a list holding itself twice, 30 levels down, is a 500-byte file
    whose plain copy would have 2^30 of them."""
    return _plain(value, where, 0, [_MAX_CONFIG_VALUES])


def _plain(value: Any, where: str, depth: int, left: list[int]) -> Any:
    if depth > _MAX_CONFIG_DEPTH:  # a config is a few levels deep; a 5000-deep list is a hostile file
        raise UserInputError(f"{_top(where)} nests more than {_MAX_CONFIG_DEPTH} levels, expected plain config values")
    left[0] -= 1
    if left[0] < 0:
        raise UserInputError(f"{_top(where)} holds more than {_MAX_CONFIG_VALUES:,} values, expected a config")
    if isinstance(value, (EasyDictRecord, dict)):
        return {str(k): _plain(v, f"{where}.{_key_name(k)}", depth + 1, left) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1, left) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
        if not isinstance(value, (bool, int, float, complex)):  # a long double stays numpy: not JSON
            raise UserInputError(f"{where} holds a numpy {type(value).__name__}, expected plain values")
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise UserInputError(f"{where} holds a {type(value).__name__}, expected plain values")


def _top(where: str) -> str:
    """The config a value's path starts in ("init_kwargs" of "init_kwargs.a[3]")."""
    return where.split(".")[0].split("[")[0]


def _key_name(key: Any) -> str:
    """A dict key as an error message shows it: at most 40 characters."""
    text = key if isinstance(key, str) else short_repr(key)
    return text if len(text) <= 40 else text[:37] + "..."

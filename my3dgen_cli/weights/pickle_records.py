"""What the restricted unpickler builds instead of the official classes: plain records of their data."""

from __future__ import annotations

import reprlib
from typing import Any

import torch

from my3dgen_cli.weights.pickle_opcodes import checked_pairs


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
    """Stand-in for `dnnlib.util.EasyDict`: the same items, no attribute magic; plain keys only, however
    it is built (a REDUCE or INST call with pairs does not pass through the unpickler's key check)."""

    def __init__(self, items: Any = (), **kwargs: Any) -> None:
        super().__init__(checked_pairs(items, "an EasyDict"), **kwargs)  # kwargs' keys are names


def _int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) for v in value)


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 40, 40, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = _SHORT.maxfrozenset = 6


def short_repr(value: Any) -> str:
    """repr(value) for an error message, at most ~100 characters and built without the full repr (a file's
    value may be a list of a million references to a 1 MiB string)."""
    text = _SHORT.repr(value)
    return text if len(text) <= 100 else text[:97] + "..."

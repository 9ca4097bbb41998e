"""What the restricted unpickler builds instead of the official classes: plain records of their data."""

from __future__ import annotations

from typing import Any

import torch


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


def _int_tuple(value: Any) -> bool:
    return isinstance(value, (tuple, list, torch.Size)) and all(isinstance(v, int) for v in value)


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."

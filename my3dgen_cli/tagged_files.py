"""Reading and writing my3dgen's own safetensors files: tensors + string metadata with a `format` tag.

Every artifact reader (adapter, anchors, partial anchors, latent) goes through `read_tagged`, so each
one refuses the same way: one `UserInputError` line naming the file for an unreadable file, another
format, a missing tensor, a non-float dtype or NaN/Inf values; `json_meta` / `number_meta` type-check
the metadata. The index of all formats and their readers is `formats.py`.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli import __version__
from my3dgen_cli.errors import UserInputError, reason, shown
from my3dgen_cli.fileio import atomic_path


def read_tagged(path: Path, kind: str, formats: Collection[str], names: Collection[str] | None = None,
                ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (as stored) and metadata of a safetensors file whose `format` is one of `formats`.

    names: the tensors it must hold (only those are read); None: every tensor. Each is checked to be
    floating point and finite. kind names the artifact in messages ("anchors file", ".latent file", ...).
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserInputError(f"{kind} not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") not in formats:
                wanted = " or ".join(repr(f) for f in formats)
                raise UserInputError(f"{path}: got format {shown(meta.get('format'))}, expected {wanted}")
            keys = list(f.keys())
            missing = [n for n in names or () if n not in keys]
            if missing:
                raise UserInputError(f"{path}: has no {missing[0]!r} tensor, expected a {kind}")
            tensors = {n: f.get_tensor(n) for n in (keys if names is None else names)}
    except UserInputError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise UserInputError(f"{path}: not a readable {kind} ({reason(err)})") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise UserInputError(f"{path}: {name} has dtype {t.dtype}, expected floating point")
        if not bool(torch.isfinite(t).all()):
            raise UserInputError(f"{path}: {name} holds NaN or Inf values")
    return tensors, meta


def json_meta(path: Path, meta: dict[str, str], key: str, kind: type, default: str | None = None) -> Any:
    """Metadata `key` parsed as JSON and of type `kind`; `default` (JSON text) when absent, else required."""
    if key not in meta and default is None:
        raise UserInputError(f"{path}: metadata has no {key!r}; the file is incomplete")
    try:
        value = json.loads(meta.get(key, default))  # type: ignore[arg-type]
    except (ValueError, RecursionError):
        raise UserInputError(f"{path}: {key} metadata is not valid JSON") from None
    if not isinstance(value, kind):
        raise UserInputError(f"{path}: {key} metadata is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def number_meta(path: Path, meta: dict[str, str], key: str, kind: type) -> Any:
    """Metadata `key` as an int or float (`kind`); a one-line error for anything else."""
    try:
        return kind(meta[key])
    except (ValueError, OverflowError):
        raise UserInputError(f"{path}: {key} is {shown(meta[key])}, expected a number") from None


def write_tagged(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    """Write `tensors` (CPU, contiguous; float32 unless given otherwise) and `meta` (+ my3dgen_version)
    atomically: readers see the old file or the whole new one."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp),
                  metadata={**meta, "my3dgen_version": __version__})
    return path

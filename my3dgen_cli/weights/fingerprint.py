"""Base weight fingerprints: hashed once when a converted base is written, then read back.

An adapter records the fingerprint of the base it was trained on and refuses any other base
(`adapter_file.load_adapter`). Hashing all 30.7 M weights of a full-size base costs a noticeable fraction
of a second, so `write_converted_base` stores the value in the base's JSON sidecar::

    "fingerprint": {"sha256": "<hex>", "size": <bytes of the .safetensors>,
                    "mtime_ns": <its modification time>, "finite": <every weight checked finite>}

The stored value is trusted only while the weights file still has that size and modification time
(the quick check of make and rsync): a file edited, replaced or copied since is hashed again, and
the new value replaces the old one (sidecar rewritten atomically; the weights file is never
rewritten). The value itself is unchanged from earlier versions: sha256 over each tensor's name,
shape and float32 bytes in name order, so existing adapters keep matching their base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli.fileio import write_text_atomic

KEY = "fingerprint"


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 bytes (name order): independent of file format and dtype
    of storage once loaded into an fp32 generator."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def weights_stamp(weights: str | Path) -> dict[str, int] | None:
    """{"size", "mtime_ns"} of a converted weights file; None for anything else (e.g. an official .pkl)."""
    weights = Path(weights)
    if weights.suffix != ".safetensors":
        return None
    try:
        st = weights.stat()
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def record(sha256: str, stamp: dict[str, int], finite: bool = False) -> dict[str, Any]:
    """The sidecar entry for weights with fingerprint `sha256` and file stamp `stamp`; finite: every weight
    of that file was checked finite (`converted.read_converted_base` then skips the check)."""
    return {"sha256": sha256, **stamp, "finite": finite}


def stored_fingerprint(weights: str | Path, stamp: dict[str, int] | None) -> str | None:
    """The fingerprint stored beside `weights` if it was computed for the file `stamp` describes.

    stamp: `weights_stamp(weights)` taken *before* the weights were read, so a file replaced while
    it was being loaded never borrows the new file's value. None when absent, stale or unreadable.
    """
    if stamp is None:
        return None
    doc = _read_sidecar(Path(weights))
    entry = doc.get(KEY) if doc else None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return None
    if any(entry.get(k) != v for k, v in stamp.items()):
        return None
    return entry["sha256"]


def store_fingerprint(weights: str | Path, sha256: str, stamp: dict[str, int], finite: bool = False) -> bool:
    """Record `sha256` (and `finite`, see `record`) in the sidecar of `weights` (atomic rewrite of the JSON
    only); True if written.

    Best effort: skipped when the weights changed since `stamp` was taken, the sidecar is unreadable,
    or its folder is read-only. The next open then hashes again, as before this cache existed.
    """
    weights = Path(weights)
    doc = _read_sidecar(weights)
    if doc is None or weights_stamp(weights) != stamp:
        return False
    doc[KEY] = record(sha256, stamp, finite)
    try:
        write_text_atomic(weights.with_suffix(".json"), json.dumps(doc, indent=1, allow_nan=False) + "\n")
    except (OSError, ValueError):
        return False
    return True


def _read_sidecar(weights: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


"""Converted bases: what the cache keeps of an EG3D generator, `ConvertedBase` and its reader / writer.

    <name>.safetensors   tensors under the official names; header metadata: format (`CONVERTED_FORMAT`),
                         format_version, class_name, source_sha256, conversion_id
    <name>.json          {"init_kwargs", "rendering_kwargs", "neural_rendering_resolution",
                          "class_name", "source", "format", "fingerprint", "dropped"?}: the layout of
                         eg3d_parity/config.json, so `build_generator(config)` takes it as is

The two files are written atomically one after the other and carry the same `conversion_id`, so a
weights file is never paired with the config of another conversion.

"fingerprint" (fingerprint.py) is {"sha256", "size", "mtime_ns", "finite"}: the weights' hash for
adapters and whether every weight was checked finite, both valid only while the weights file keeps
that size and modification time. Reading every weight for NaN/Inf costs about as much as the rest
of opening a base, so the reader skips it when that marker says the very same file was checked (when
it was written, or at its last full read); a file changed on disk since is checked again.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli.errors import UserInputError, reason
from my3dgen_cli.fileio import write_atomic, write_text_atomic
from my3dgen_cli.weights.fingerprint import KEY as FINGERPRINT_KEY
from my3dgen_cli.weights.fingerprint import record as fingerprint_record
from my3dgen_cli.weights.fingerprint import state_fingerprint, weights_stamp
from my3dgen_cli.weights.official_pkl import plain

CONVERTED_FORMAT = "my3dgen-eg3d"
FORMAT_VERSION = 1
CONFIG_KEYS = ("init_kwargs", "rendering_kwargs", "neural_rendering_resolution", "class_name")


@dataclass
class ConvertedBase:
    """What a converted base holds: state_dict (official names -> tensors, memory-mapped when read) and
    config ({"init_kwargs", "rendering_kwargs", "neural_rendering_resolution", "class_name"} and optionally
    "source" (e.g. {"file", "sha256", "network"}), "dropped" (tensors of the source file left out); read
    back with "format" and "fingerprint" too)."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]


def all_finite(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding NaN or Inf; None when every value is finite."""
    for name, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def write_converted_base(dst: str | Path, base: ConvertedBase, dtype: torch.dtype | None = None) -> Path:
    """Write `dst` (.safetensors) and `dst.with_suffix(".json")`, each atomically; return `dst`.

    dtype: None keeps each tensor's dtype. The JSON records the weights' fingerprint and whether they
    are all finite, for this file's size and modification time.
    """
    from safetensors.torch import save_file

    dst, config = Path(dst), base.config
    if dst.suffix != ".safetensors":
        raise UserInputError(f"{dst}: got suffix '{dst.suffix}', expected '.safetensors'")
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise UserInputError(f"config has no {missing[0]}; expected keys {', '.join(CONFIG_KEYS)}")
    source = dict(config.get("source") or {})
    conversion_id = uuid.uuid4().hex
    doc = {key: config[key] for key in CONFIG_KEYS}
    doc["source"] = source
    if config.get("dropped"):
        doc["dropped"] = list(config["dropped"])
    doc["format"] = {"name": CONVERTED_FORMAT, "version": FORMAT_VERSION, "weights": dst.name,
                     "conversion_id": conversion_id}
    doc = plain(doc, "config")
    try:
        json.dumps(doc, allow_nan=False)  # refuse before anything is written
    except ValueError as err:
        raise UserInputError(f"config is not JSON-ready: {err}") from None
    metadata = {
        "format": CONVERTED_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "class_name": str(config["class_name"]),
        "source_sha256": str(source.get("sha256", "")),
        "conversion_id": conversion_id,
    }
    tensors = _contiguous_unshared(base.state_dict, dtype)
    fingerprint = state_fingerprint(tensors)  # what base_fingerprint gives once loaded (fp32)
    finite = all_finite(tensors) is None
    write_atomic(dst, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    stamp = weights_stamp(dst)
    if stamp is not None:
        doc[FINGERPRINT_KEY] = fingerprint_record(fingerprint, stamp, finite=finite)
    write_text_atomic(dst.with_suffix(".json"), json.dumps(doc, indent=1) + "\n")
    return dst


def _contiguous_unshared(
    state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors, each with its own memory (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach().to(device="cpu", dtype=dtype or t.dtype).contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def read_converted_base(path: str | Path, full_check: bool = False) -> ConvertedBase:
    """A converted base (`.safetensors` or its `.json`), checked; tensors come from a memory map.

    Checked: both files there, the safetensors readable with our format tag and a version this reads,
    the JSON an object with the config keys and the same conversion, a config the generator can be
    built from, and every weight finite: skipped when the JSON's marker says this very file (same size
    and mtime, before and after reading) was checked, unless `full_check`.
    """
    from safetensors import safe_open

    path = Path(path)
    weights, config_path = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for p in (weights, config_path):
        if not p.is_file():
            raise UserInputError(f"{p}: no such file; a converted checkpoint is a .safetensors plus a .json")
    stamp = weights_stamp(weights)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError for any malformed file
        raise UserInputError(f"{weights}: not a readable safetensors file ({type(err).__name__})") from None
    _check_tag(weights, metadata)
    config = _read_config(config_path, metadata.get("conversion_id"))
    if full_check or stamp is None or weights_stamp(weights) != stamp or not _checked_finite(config, stamp):
        bad = all_finite(state_dict)
        if bad is not None:
            raise UserInputError(f"{weights}: {bad} holds NaN or Inf values; convert the base again")
    return ConvertedBase(state_dict, config)


def _check_tag(weights: Path, metadata: dict[str, str]) -> None:
    if metadata.get("format") != CONVERTED_FORMAT:
        got = metadata.get("format")
        raise UserInputError(f"{weights}: got format {got!r}, expected {CONVERTED_FORMAT!r} (convert it first)")
    version = metadata.get("format_version", "0")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise UserInputError(
            f"{weights}: format version {version!r} is newer than this "
            f"my3dgen reads ({FORMAT_VERSION}); upgrade my3dgen"
        )


def _read_config(config_path: Path, conversion_id: str | None) -> dict[str, Any]:
    """The JSON beside the weights: an object with `CONFIG_KEYS`, of the same conversion, buildable."""
    from my3dgen_cli.eg3d.configs import resolve_config

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise UserInputError(f"{config_path}: not valid JSON ({reason(err)})") from None
    if not isinstance(config, dict) or any(k not in config for k in CONFIG_KEYS):
        raise UserInputError(f"{config_path}: expected keys {', '.join(CONFIG_KEYS)}")
    fmt = config.get("format")
    if not isinstance(fmt, dict) or fmt.get("conversion_id") != conversion_id:
        raise UserInputError(f"{config_path}: belongs to another conversion than "
                             f"{config_path.with_suffix('.safetensors').name}; convert again")
    try:  # bounds and types, before a generator of that size is built
        resolve_config(config)
    except (ValueError, TypeError, KeyError) as err:
        raise UserInputError(f"{config_path}: not a usable generator config ({err})") from None
    return config


def _checked_finite(config: dict[str, Any], stamp: dict[str, int]) -> bool:
    """True when the JSON's fingerprint entry says the weights file of this stamp was checked finite."""
    entry = config.get(FINGERPRINT_KEY)
    return (isinstance(entry, dict) and entry.get("finite") is True
            and all(entry.get(k) == v for k, v in stamp.items()))

"""The adapter file (`adapter.safetensors`): its contract, `AdapterFile`, and `read_adapter` / `write_adapter`.

Tensors: `<layer>.lora_A` / `<layer>.lora_B` per wrapped layer, then the trained extras under their
official names. Metadata (strings): format (`ADAPTER_FORMAT` without extras, so older versions read
it; `ADAPTER_FORMAT_EXTRAS` with), my3dgen_version, base_name, base_sha256 (the base's weight
fingerprint), rank, alpha, style, targets (JSON list), layers (JSON list of the exact wrapped layer
names; absent in files from before, which may then carry only `lora.BUILTIN_TARGETS`), extra (JSON).

`save_adapter(model, ...)` / `load_adapter(model, path)` go between a model with attached adapters
and the file (peft's `save_pretrained` / `load_adapter`); the layers themselves are `lora.py`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from my3dgen_cli.errors import IncompatibleAdapterError, UserInputError, shown
from my3dgen_cli.lora import (
    BUILTIN_TARGETS,
    CONV_STYLES,
    AdapterConfig,
    adapter_config,
    add_adapters,
    base_fingerprint,
    check_extras,
    get_adapter_state,
    is_factor,
    set_adapter_state,
)
from my3dgen_cli.tagged_files import json_meta, number_meta, read_tagged, write_tagged

ADAPTER_FORMAT = "my3dgen-lora/1"  # LoRA factors only: what older versions read
ADAPTER_FORMAT_EXTRAS = "my3dgen-lora/2"  # factors + trained extras (written only when there are extras)
ADAPTER_FORMATS = (ADAPTER_FORMAT, ADAPTER_FORMAT_EXTRAS)
MAX_RANK = 4096
_REQUIRED = ("base_name", "base_sha256", "rank", "alpha", "style", "targets")


@dataclass
class AdapterFile:
    """What an adapter file holds.

    tensors: factors and trained extras (`lora.get_adapter_state`'s layout). config: rank, alpha,
    style, targets, the exact wrapped layers (None for a file from before they were stored) and the
    extras' names. base_fingerprint: the weight fingerprint of the base it was trained on
    (`lora.base_fingerprint`, stored as `base_sha256`). extra: free JSON (training config, photos, ...).
    format / my3dgen_version: as read (writing picks the format from the tensors).
    """

    tensors: dict[str, torch.Tensor]
    config: AdapterConfig
    base_name: str
    base_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = ADAPTER_FORMAT
    my3dgen_version: str = ""


def factor_layers(tensors: dict[str, Any]) -> list[str]:
    """The layer names an adapter wraps, in file order (each once)."""
    return list(dict.fromkeys(k.rsplit(".", 1)[0] for k in tensors if is_factor(k)))


def write_adapter(path: str | Path, adapter: AdapterFile) -> Path:
    """Write `adapter` atomically; the format is `ADAPTER_FORMAT_EXTRAS` when it has extras, else `ADAPTER_FORMAT`."""
    config = adapter.config
    has_extras = any(not is_factor(k) for k in adapter.tensors)
    meta = {
        "format": ADAPTER_FORMAT_EXTRAS if has_extras else ADAPTER_FORMAT,
        "base_name": adapter.base_name,
        "base_sha256": adapter.base_fingerprint,
        "rank": str(config.rank),
        "alpha": str(config.alpha),
        "style": config.style,
        "targets": json.dumps(list(config.targets)),
        "layers": json.dumps(factor_layers(adapter.tensors)),
        "extra": json.dumps(adapter.extra or {}),
    }
    return write_tagged(path, adapter.tensors, meta)


def read_adapter(path: str | Path) -> AdapterFile:
    """An adapter file, validated; anything malformed is a one-line `UserInputError` naming the file.

    Checked: format tag, base name and fingerprint, rank, alpha, style, the wrapped layers (exact names;
    a file from before names were stored may carry only `BUILTIN_TARGETS`), extra (a JSON object), and
    every tensor (floating point, finite, factors 2-D and consistent with the rank).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"adapter file not found: {path}")
    tensors, raw = read_tagged(path, "safetensors adapter", ADAPTER_FORMATS)
    for key in _REQUIRED:
        if key not in raw:
            raise UserInputError(f"{path}: adapter metadata has no {key!r}; the file is incomplete")
    if not re.fullmatch(r"[0-9a-f]{64}", raw["base_sha256"]):
        raise UserInputError(f"{path}: base_sha256 is {shown(raw['base_sha256'])}, expected 64 hex digits")
    rank, alpha = number_meta(path, raw, "rank", int), number_meta(path, raw, "alpha", float)
    if not 1 <= rank <= MAX_RANK:
        raise UserInputError(f"{path}: rank is {rank}, expected 1 to {MAX_RANK}")
    if not math.isfinite(alpha):
        raise UserInputError(f"{path}: alpha is {raw['alpha']!r}, expected a finite number")
    if raw["style"] not in CONV_STYLES:
        raise UserInputError(f"{path}: style is {shown(raw['style'])}, expected one of {', '.join(CONV_STYLES)}")
    targets = json_meta(path, raw, "targets", list)
    extra = json_meta(path, raw, "extra", dict, "{}")
    if not all(isinstance(t, str) for t in targets):
        raise UserInputError(f"{path}: targets holds a non-string, expected a list of layer patterns")
    layers = _stored_layers(path, raw, tensors, targets)
    _check_factors(path, tensors, rank)
    config = AdapterConfig(rank, alpha, raw["style"], tuple(targets), layers,
                           tuple(k for k in tensors if not is_factor(k)))
    return AdapterFile(tensors, config, raw["base_name"], raw["base_sha256"], extra, raw["format"],
                       raw.get("my3dgen_version", ""))


def _stored_layers(path: Path, raw: dict[str, str], tensors: dict[str, torch.Tensor],
                   targets: list[str]) -> tuple[str, ...] | None:
    """The exact layer names of the file (checked against its tensors); None for a file from before they
    were stored, whose targets must then each be one of `BUILTIN_TARGETS` (text is never compiled)."""
    if "layers" in raw:
        layers = json_meta(path, raw, "layers", list)
        if not all(isinstance(n, str) for n in layers):
            raise UserInputError(f"{path}: layers holds a non-string, expected a list of layer names")
        if set(layers) != set(factor_layers(tensors)):
            raise UserInputError(f"{path}: the layers in its metadata are not the layers of its tensors")
        return tuple(layers)
    unknown = [t for t in targets if t not in BUILTIN_TARGETS]
    if unknown:
        raise UserInputError(f"{path}: targets pattern {shown(unknown[0])} is not one of my3dgen's own; an "
                             "adapter without stored layer names may only use the built-in targets")
    return None


def _check_factors(path: Path, tensors: dict[str, torch.Tensor], rank: int) -> None:
    if not any(is_factor(k) for k in tensors):
        raise UserInputError(f"{path}: holds no LoRA factors (<layer>.lora_A / .lora_B)")
    for name, t in tensors.items():
        if is_factor(name) and t.ndim != 2:
            raise UserInputError(f"{path}: {name} has shape {tuple(t.shape)}, expected 2 dimensions")
    # The rank sizes the fresh factors `load_adapter` builds: never larger than what the file holds.
    if rank > max(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A")):
        raise UserInputError(f"{path}: rank is {rank}, larger than its factors")


def save_adapter(
    model: nn.Module, path: str | Path, base_name: str, base_sha256: str, extra: dict[str, Any] | None = None
) -> Path:
    """Write the adapters attached to `model` (and its trained extras) atomically, with the metadata needed to
    re-attach them. base_sha256: the base's weight fingerprint (`lora.base_fingerprint`)."""
    config = adapter_config(model)
    if config is None:
        raise ValueError("save_adapter: the model has no adapters")
    return write_adapter(path, AdapterFile(get_adapter_state(model), config, base_name, base_sha256, extra or {}))


def load_adapter(model: nn.Module, path: str | Path, base_sha256: str | None = None) -> AdapterFile:
    """Attach the adapter file at `path` to `model` (and put its trained extras in place); refuse a base
    with another fingerprint, a tensor of another shape, or an extra outside `EXTRA_TARGETS`.

    base_sha256: the model's weight fingerprint if already known (else computed). Returns the file read.
    """
    adapter = read_adapter(path)
    actual = base_sha256 or base_fingerprint(model)
    if adapter.base_fingerprint != actual:
        raise IncompatibleAdapterError(
            f"{path} was made on base {adapter.base_name!r} (sha256 {adapter.base_fingerprint[:12]}), "
            f"not on this generator (sha256 {actual[:12]})"
        )
    check_extras(model, adapter.tensors, str(path))  # before anything is attached
    config = adapter.config
    if config.layers is None:  # an older file: its targets replaced by the equal built-in constants
        builtin = {t: t for t in BUILTIN_TARGETS}
        config = AdapterConfig(config.rank, config.alpha, config.style, tuple(builtin[t] for t in config.targets))
    add_adapters(model, config=config)
    set_adapter_state(model, adapter.tensors, str(path))
    return adapter

"""Low-rank adapters (LoRA) for EG3D's fully-connected and convolution weights.

An adapter owns only its two factors; the base layer keeps its weight and gets
`weight + delta` through its `adapter` slot (see eg3d/layers.py), *before* modulation and
demodulation, as My3DGen applies it. B starts at zero, so a fresh adapter changes nothing.

Decompositions (delta is added to the stored weight, scale = alpha / rank):
- FC [out, in]:            delta = scale * B @ A,  A [r, in], B [out, r].
- conv [out, in, k, k], "my3dgen" (the official My3DGen/LoRA-conv form):
                           delta = scale * (B @ A).reshape(out, in, k, k),
                           A [r*k, in*k*k], B [out, r*k].
- conv, "peft" style:      A [r, in*k*k], B [out, r] (fewer parameters, as peft's Conv2d LoRA).
A is Kaiming-uniform (a = sqrt 5, as nn.Linear), B zeros.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from my3dgen_cli import __version__
from my3dgen_cli.errors import IncompatibleAdapterError, UserInputError
from my3dgen_cli.fileio import atomic_path

ADAPTER_FORMAT = "my3dgen-lora/1"
CONV_STYLES = ("my3dgen", "peft")

# Every synthesis block of the backbone (conv0, conv1, torgb and their affine FCs) and both
# superresolution blocks. Mapping network, tri-plane decoder and renderer stay frozen (paper).
DEFAULT_TARGETS: tuple[str, ...] = (
    r"backbone\.synthesis\.b\d+\.(conv0|conv1|torgb)(\.affine)?",
    r"superresolution\.block[01]\.(conv0|conv1|torgb)(\.affine)?",
)
MAPPING_TARGETS: tuple[str, ...] = (r"backbone\.mapping\.(embed|fc\d+)",)
DECODER_TARGETS: tuple[str, ...] = (r"decoder\.net\.\d+",)


class LoRA(nn.Module):
    """The two factors of one weight's low-rank delta."""

    def __init__(self, weight_shape: Sequence[int], rank: int, alpha: float, style: str = "my3dgen") -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank: got {rank}, expected >= 1")
        if style not in CONV_STYLES:
            raise ValueError(f"style: got {style!r}, expected one of {CONV_STYLES}")
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.rank, self.alpha, self.style = rank, float(alpha), style
        out_features = self.weight_shape[0]
        in_features = math.prod(self.weight_shape[1:])
        inner = rank
        if len(self.weight_shape) == 4 and style == "my3dgen":
            inner = rank * self.weight_shape[-1]
        self.lora_A = nn.Parameter(torch.empty(inner, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, inner))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).reshape(self.weight_shape) * self.scale

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The delta for `weight` (its shape, dtype and device)."""
        return self.delta().to(dtype=weight.dtype)

    def extra_repr(self) -> str:
        return f"weight_shape={self.weight_shape}, rank={self.rank}, alpha={self.alpha}, style={self.style}"


def _adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every layer with an `adapter` slot (FC, modulated conv, toRGB), by qualified name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "adapter") and hasattr(m, "weight")}


def match_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names of adaptable layers fully matching any of the regular expressions `targets`."""
    patterns = [re.compile(t) for t in targets]
    return [name for name in _adaptable_layers(model) if any(p.fullmatch(name) for p in patterns)]


def add_adapters(
    model: nn.Module,
    rank: int = 1,
    alpha: float | None = None,
    targets: Iterable[str] = DEFAULT_TARGETS,
    style: str = "my3dgen",
    generator: torch.Generator | None = None,
) -> list[nn.Parameter]:
    """Freeze the model and attach a fresh adapter to every target layer.

    Returns the new trainable tensors (the only ones with requires_grad). alpha defaults to rank
    (scale 1). With `generator`, A's initialization is reproducible.
    """
    targets = tuple(targets)
    names = match_targets(model, targets)
    if not names:
        raise UserInputError(f"adapter targets: got {list(targets)}, which match no layer of this generator")
    for p in model.parameters():
        p.requires_grad_(False)
    layers = _adaptable_layers(model)
    params: list[nn.Parameter] = []
    for name in names:
        layer = layers[name]
        adapter = LoRA(layer.weight.shape, rank, float(rank if alpha is None else alpha), style)
        if generator is not None:
            bound = 1 / math.sqrt(adapter.lora_A.shape[1])  # kaiming_uniform(a=sqrt 5) bound
            with torch.no_grad():
                adapter.lora_A.uniform_(-bound, bound, generator=generator)
        adapter.to(device=layer.weight.device, dtype=layer.weight.dtype)
        layer.adapter = adapter
        params += [adapter.lora_A, adapter.lora_B]
    model._my3dgen_adapter_config = {"rank": rank, "alpha": float(rank if alpha is None else alpha),  # type: ignore
                                     "targets": list(targets), "style": style}
    return params


def adapter_layers(model: nn.Module) -> dict[str, LoRA]:
    return {name: m.adapter for name, m in _adaptable_layers(model).items() if isinstance(m.adapter, LoRA)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{layer}.lora_A` / `{layer}.lora_B` tensors of every attached adapter (contiguous, CPU)."""
    out = {}
    for name, adapter in adapter_layers(model).items():
        out[f"{name}.lora_A"] = adapter.lora_A.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = adapter.lora_B.detach().cpu().contiguous()
    return out


def count_adapter_parameters(model: nn.Module) -> int:
    return sum(a.lora_A.numel() + a.lora_B.numel() for a in adapter_layers(model).values())


def merge_adapters(model: nn.Module, safe: bool = True) -> nn.Module:
    """Add every adapter's delta into its base weight and detach the adapter (in place)."""
    for name, layer in _adaptable_layers(model).items():
        if not isinstance(layer.adapter, LoRA):
            continue
        with torch.no_grad():
            merged = layer.weight + layer.adapter(layer.weight)
            if safe and not torch.isfinite(merged).all():
                raise ValueError(f"merging the adapter of {name} gives non-finite weights")
            layer.weight.copy_(merged)
        layer.adapter = None
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Detach every adapter, leaving the base weights as they were (unload)."""
    for layer in _adaptable_layers(model).values():
        layer.adapter = None
    return model


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the base weights (names, shapes, float32 bytes), independent of file format.

    Adapters record it; loading on a generator with another fingerprint is refused. Converted bases
    store it when written (`eg3d.fingerprint`), so `generators.open_base` rarely calls this.
    """
    from my3dgen_cli.eg3d.fingerprint import state_fingerprint

    return state_fingerprint({k: v for k, v in model.state_dict().items() if ".adapter." not in k})


def save_adapter(
    model: nn.Module, path: str | Path, base_name: str, base_sha256: str, extra: dict[str, Any] | None = None
) -> Path:
    """Write the adapters as safetensors (atomically) with the metadata needed to re-attach them."""
    from safetensors.torch import save_file

    config = getattr(model, "_my3dgen_adapter_config", None)
    if config is None:
        raise ValueError("save_adapter: the model has no adapters")
    meta = {
        "format": ADAPTER_FORMAT,
        "my3dgen_version": __version__,
        "base_name": base_name,
        "base_sha256": base_sha256,
        "rank": str(config["rank"]),
        "alpha": str(config["alpha"]),
        "style": config["style"],
        "targets": json.dumps(config["targets"]),
        "extra": json.dumps(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(adapter_state_dict(model), str(tmp), metadata=meta)
    return path


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and parsed metadata of an adapter file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserInputError(f"{path}: not a readable safetensors adapter ({err})") from None
    if raw.get("format") != ADAPTER_FORMAT:
        raise UserInputError(f"{path}: got format {raw.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    meta: dict[str, Any] = dict(raw)
    meta["rank"] = int(raw["rank"])
    meta["alpha"] = float(raw["alpha"])
    meta["targets"] = json.loads(raw["targets"])
    meta["extra"] = json.loads(raw.get("extra", "{}"))
    return tensors, meta


def load_adapter(model: nn.Module, path: str | Path, base_sha256: str | None = None) -> dict[str, Any]:
    """Attach the adapters saved at `path` to `model`; refuse a base with another fingerprint.

    base_sha256: the model's fingerprint if already known (else computed). Returns the metadata.
    """
    tensors, meta = read_adapter(path)
    actual = base_sha256 or base_fingerprint(model)
    if meta["base_sha256"] != actual:
        raise IncompatibleAdapterError(
            f"{path} was made on base {meta['base_name']!r} (sha256 {meta['base_sha256'][:12]}), "
            f"not on this generator (sha256 {actual[:12]})"
        )
    add_adapters(model, rank=meta["rank"], alpha=meta["alpha"], targets=meta["targets"], style=meta["style"])
    layers = adapter_layers(model)
    expected = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    if set(tensors) != expected:
        missing = sorted(expected - set(tensors))[:1] or sorted(set(tensors) - expected)[:1]
        raise UserInputError(f"{path}: adapter tensors do not match the generator (first mismatch: {missing[0]})")
    with torch.no_grad():
        for name, adapter in layers.items():
            adapter.lora_A.copy_(tensors[f"{name}.lora_A"])
            adapter.lora_B.copy_(tensors[f"{name}.lora_B"])
    return meta

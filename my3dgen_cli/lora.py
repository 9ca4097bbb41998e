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

Trained extras. My3DGen's wrappers also leave the first block's constant, every bias of the
adapted layers and their noise strengths trainable (`EXTRA_TARGETS`, 24,791 values at full size).
An adapter can carry those tensors under their official names beside the factors: they replace the
base's values while the adapter is attached (the base's own are kept aside and put back by
`remove_adapters`), and stay in the weights when merged.
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
from my3dgen_cli.errors import IncompatibleAdapterError, UserInputError, reason, shown
from my3dgen_cli.fileio import atomic_path

ADAPTER_FORMAT = "my3dgen-lora/1"  # LoRA factors only: what older versions read
ADAPTER_FORMAT_EXTRAS = "my3dgen-lora/2"  # factors + trained extras (written only when there are extras)
CONV_STYLES = ("my3dgen", "peft")

# Every synthesis block of the backbone (conv0, conv1, torgb and their affine FCs) and both
# superresolution blocks. Mapping network, tri-plane decoder and renderer stay frozen (paper).
DEFAULT_TARGETS: tuple[str, ...] = (
    r"backbone\.synthesis\.b\d+\.(conv0|conv1|torgb)(\.affine)?",
    r"superresolution\.block[01]\.(conv0|conv1|torgb)(\.affine)?",
)
MAPPING_TARGETS: tuple[str, ...] = (r"backbone\.mapping\.(embed|fc\d+)",)
DECODER_TARGETS: tuple[str, ...] = (r"decoder\.net\.\d+",)
# The other tensors My3DGen trains (official names): b4.const, the conv / ToRGB / affine biases and the
# noise strengths of the backbone synthesis and both superresolution blocks.
EXTRA_TARGETS: tuple[str, ...] = (
    r"backbone\.synthesis\.b4\.const",
    r"(backbone\.synthesis\.b\d+|superresolution\.block[01])\.(conv0|conv1|torgb)(\.affine)?\.bias",
    r"(backbone\.synthesis\.b\d+|superresolution\.block[01])\.(conv0|conv1)\.noise_strength",
)


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


# Every target list this package defines: the only patterns an adapter written before adapters
# stored their layer names may carry (compared as strings; text from a file is never compiled).
BUILTIN_TARGETS: frozenset[str] = frozenset(DEFAULT_TARGETS + MAPPING_TARGETS + DECODER_TARGETS)
MAX_RANK = 4096


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
    layer_names: Sequence[str] | None = None,
) -> list[nn.Parameter]:
    """Freeze the model and attach a fresh adapter to every target layer.

    Returns the new trainable tensors (the only ones with requires_grad). alpha defaults to rank
    (scale 1). With `generator`, A's initialization is reproducible. `layer_names` (exact names, as an
    adapter file stores them) replaces matching `targets`.
    """
    targets = tuple(targets)
    layers = _adaptable_layers(model)
    if layer_names is not None:
        unknown = [n for n in layer_names if n not in layers]
        if unknown:
            raise UserInputError(f"adapter layer {unknown[0]!r}: this generator has no such adaptable layer")
        names = list(layer_names)
    else:
        names = match_targets(model, targets)
    if not names:
        raise UserInputError(f"adapter targets: got {list(targets)}, which match no layer of this generator")
    for p in model.parameters():
        p.requires_grad_(False)
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


def match_extras(model: nn.Module, targets: Iterable[str] = EXTRA_TARGETS) -> list[str]:
    """Names of the model's parameters fully matching any of `targets` (default: My3DGen's trained set)."""
    patterns = [re.compile(t) for t in targets]
    return [name for name, _ in model.named_parameters() if any(p.fullmatch(name) for p in patterns)]


def add_extras(model: nn.Module, names: Iterable[str]) -> list[nn.Parameter]:
    """Make the named base parameters part of the adapter: trainable, with the base's values kept aside.

    Call after `add_adapters` (which freezes every base weight). Returns the parameters (model order).
    """
    params = dict(model.named_parameters())
    saved: dict[str, torch.Tensor] = model.__dict__.setdefault("_my3dgen_extras", {})
    out = []
    for name in names:
        if name not in params:
            raise UserInputError(f"trained extra {name}: the generator has no such parameter")
        if name not in saved:
            saved[name] = params[name].detach().clone()
        params[name].requires_grad_(True)
        out.append(params[name])
    return out


def extra_names(model: nn.Module) -> list[str]:
    """Names of the base parameters the attached adapter replaces (its trained extras)."""
    return list(model.__dict__.get("_my3dgen_extras", {}))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{layer}.lora_A` / `{layer}.lora_B` of every attached adapter, then the trained extras under their
    official names (contiguous, CPU)."""
    out = {}
    for name, adapter in adapter_layers(model).items():
        out[f"{name}.lora_A"] = adapter.lora_A.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = adapter.lora_B.detach().cpu().contiguous()
    params = dict(model.named_parameters())
    for name in extra_names(model):
        out[name] = params[name].detach().cpu().contiguous()
    return out


def count_adapter_parameters(model: nn.Module) -> int:
    """Trainable values of the adapter: LoRA factors plus trained extras."""
    params = dict(model.named_parameters())
    lora = sum(a.lora_A.numel() + a.lora_B.numel() for a in adapter_layers(model).values())
    return lora + sum(params[n].numel() for n in extra_names(model))


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
    model.__dict__.pop("_my3dgen_extras", None)  # the trained extras already are the weights
    return model


def remove_adapters(model: nn.Module) -> nn.Module:
    """Detach every adapter and put the base's own values of the trained extras back (unload)."""
    for layer in _adaptable_layers(model).values():
        layer.adapter = None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in model.__dict__.pop("_my3dgen_extras", {}).items():
            params[name].copy_(value)
            params[name].requires_grad_(False)
    return model


def base_fingerprint(model: nn.Module) -> str:
    """sha256 over the base weights (names, shapes, float32 bytes), independent of file format.

    Adapters record it; loading on a generator with another fingerprint is refused. Converted bases
    store it when written (`eg3d.fingerprint`), so `generators.open_base` rarely calls this.
    """
    from my3dgen_cli.weights.fingerprint import state_fingerprint

    state = {k: v for k, v in model.state_dict().items() if ".adapter." not in k}
    state.update(model.__dict__.get("_my3dgen_extras", {}))  # the base's own values, not the trained ones
    return state_fingerprint(state)


def save_adapter(
    model: nn.Module, path: str | Path, base_name: str, base_sha256: str, extra: dict[str, Any] | None = None
) -> Path:
    """Write the adapters (and trained extras) as safetensors (atomically) with the metadata needed to
    re-attach them."""
    config = getattr(model, "_my3dgen_adapter_config", None)
    if config is None:
        raise ValueError("save_adapter: the model has no adapters")
    return write_adapter(path, adapter_state_dict(model), config, base_name, base_sha256, extra)


def write_adapter(path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], base_name: str,
                  base_sha256: str, extra: dict[str, Any] | None = None) -> Path:
    """Write adapter tensors (`<layer>.lora_A/B`, then extras under official names) atomically.

    config: {"rank", "alpha", "targets", "style"} as `add_adapters` takes them. The format is
    `ADAPTER_FORMAT` without extras (readable by older versions), `ADAPTER_FORMAT_EXTRAS` with.
    """
    from safetensors.torch import save_file

    has_extras = any(not _is_factor(k) for k in tensors)
    meta = {
        "format": ADAPTER_FORMAT_EXTRAS if has_extras else ADAPTER_FORMAT,
        "my3dgen_version": __version__,
        "base_name": base_name,
        "base_sha256": base_sha256,
        "rank": str(config["rank"]),
        "alpha": str(config["alpha"]),
        "style": config["style"],
        "targets": json.dumps(list(config["targets"])),
        "layers": json.dumps(_factor_layers(tensors)),
        "extra": json.dumps(extra or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(tmp), metadata=meta)
    return path


def _is_factor(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


def _factor_layers(tensors: Iterable[str]) -> list[str]:
    """The layer names an adapter wraps, in file order (each once)."""
    return list(dict.fromkeys(k.rsplit(".", 1)[0] for k in tensors if _is_factor(k)))


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and validated metadata of an adapter file; anything malformed is a one-line `UserInputError`.

    Checked: format tag, base name and fingerprint, rank, alpha, style, the wrapped layers (exact names;
    a file from before names were stored may carry only `BUILTIN_TARGETS`), extra (a JSON object), and
    every tensor (floating point, finite, factors 2-D and consistent with the rank).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise UserInputError(f"{path}: not a readable safetensors adapter ({reason(err)})") from None
    if raw.get("format") not in (ADAPTER_FORMAT, ADAPTER_FORMAT_EXTRAS):
        raise UserInputError(f"{path}: got format {shown(raw.get('format'))}, expected {ADAPTER_FORMAT!r} "
                             f"or {ADAPTER_FORMAT_EXTRAS!r}")
    meta: dict[str, Any] = dict(raw)
    for key in ("base_name", "base_sha256", "rank", "alpha", "style", "targets"):
        if key not in raw:
            raise UserInputError(f"{path}: adapter metadata has no {key!r}; the file is incomplete")
    if not re.fullmatch(r"[0-9a-f]{64}", raw["base_sha256"]):
        raise UserInputError(f"{path}: base_sha256 is {shown(raw['base_sha256'])}, expected 64 hex digits")
    meta["rank"] = _meta_number(path, raw, "rank", int)
    meta["alpha"] = _meta_number(path, raw, "alpha", float)
    if not 1 <= meta["rank"] <= MAX_RANK:
        raise UserInputError(f"{path}: rank is {meta['rank']}, expected 1 to {MAX_RANK}")
    if not math.isfinite(meta["alpha"]):
        raise UserInputError(f"{path}: alpha is {raw['alpha']!r}, expected a finite number")
    if raw["style"] not in CONV_STYLES:
        raise UserInputError(f"{path}: style is {shown(raw['style'])}, expected one of {', '.join(CONV_STYLES)}")
    meta["targets"] = _meta_json(path, raw, "targets", list)
    meta["extra"] = _meta_json(path, raw, "extra", dict, "{}")
    if not all(isinstance(t, str) for t in meta["targets"]):
        raise UserInputError(f"{path}: targets holds a non-string, expected a list of layer patterns")
    if "layers" in raw:
        meta["layers"] = _meta_json(path, raw, "layers", list)
        if not all(isinstance(n, str) for n in meta["layers"]):
            raise UserInputError(f"{path}: layers holds a non-string, expected a list of layer names")
        if set(meta["layers"]) != set(_factor_layers(tensors)):
            raise UserInputError(f"{path}: the layers in its metadata are not the layers of its tensors")
    else:
        unknown = [t for t in meta["targets"] if t not in BUILTIN_TARGETS]
        if unknown:
            raise UserInputError(f"{path}: targets pattern {shown(unknown[0])} is not one of my3dgen's own; an "
                                 "adapter without stored layer names may only use the built-in targets")
    _check_tensors(path, tensors, meta["rank"])
    return tensors, meta


def _meta_number(path: Path, raw: dict[str, str], key: str, kind: type) -> Any:
    try:
        return kind(raw[key])
    except (ValueError, OverflowError):
        raise UserInputError(f"{path}: {key} is {shown(raw[key])}, expected a number") from None


def _meta_json(path: Path, raw: dict[str, str], key: str, kind: type, default: str | None = None) -> Any:
    try:
        value = json.loads(raw.get(key, default) if default is not None else raw[key])
    except (ValueError, RecursionError):
        raise UserInputError(f"{path}: {key} metadata is not valid JSON") from None
    if not isinstance(value, kind):
        raise UserInputError(f"{path}: {key} metadata is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], rank: int) -> None:
    if not any(_is_factor(k) for k in tensors):
        raise UserInputError(f"{path}: holds no LoRA factors (<layer>.lora_A / .lora_B)")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise UserInputError(f"{path}: {name} has dtype {t.dtype}, expected floating point")
        if _is_factor(name) and t.ndim != 2:
            raise UserInputError(f"{path}: {name} has shape {tuple(t.shape)}, expected 2 dimensions")
        if not bool(torch.isfinite(t).all()):
            raise UserInputError(f"{path}: {name} holds NaN or Inf values")
    # The rank sizes the fresh factors `load_adapter` builds: never larger than what the file holds.
    if rank > max(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A")):
        raise UserInputError(f"{path}: rank is {rank}, larger than its factors")


def load_adapter(model: nn.Module, path: str | Path, base_sha256: str | None = None) -> dict[str, Any]:
    """Attach the adapters saved at `path` to `model` (and put its trained extras in place); refuse a
    base with another fingerprint, a tensor of another shape, or an extra outside `EXTRA_TARGETS`.

    base_sha256: the model's fingerprint if already known (else computed). Returns the metadata.
    """
    tensors, meta = read_adapter(path)
    actual = base_sha256 or base_fingerprint(model)
    if meta["base_sha256"] != actual:
        raise IncompatibleAdapterError(
            f"{path} was made on base {meta['base_name']!r} (sha256 {meta['base_sha256'][:12]}), "
            f"not on this generator (sha256 {actual[:12]})"
        )
    extras = [k for k in tensors if not _is_factor(k)]
    allowed = set(match_extras(model))
    params = dict(model.named_parameters())
    for name in extras:
        if name not in allowed or tuple(params[name].shape) != tuple(tensors[name].shape):
            got = tuple(tensors[name].shape)
            raise UserInputError(f"{path}: trained extra {name} (shape {got}) is not a bias, noise strength or "
                                 "const of this generator")
    # Exact layer names; an older file's targets are replaced by the equal built-in constants
    # (read_adapter checked each is one), so only this package's own patterns are ever compiled.
    builtin = {t: t for t in BUILTIN_TARGETS}
    targets = meta["targets"] if "layers" in meta else [builtin[t] for t in meta["targets"]]
    add_adapters(model, rank=meta["rank"], alpha=meta["alpha"], targets=targets, style=meta["style"],
                 layer_names=meta.get("layers"))
    layers = adapter_layers(model)
    expected = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    factors = {k for k in tensors if _is_factor(k)}
    if factors != expected:
        missing = sorted(expected - factors)[:1] or sorted(factors - expected)[:1]
        raise UserInputError(f"{path}: adapter tensors do not match the generator (first mismatch: {missing[0]})")
    with torch.no_grad():
        for name, adapter in layers.items():
            for ab in ("lora_A", "lora_B"):
                saved = tensors[f"{name}.{ab}"]
                if saved.shape != getattr(adapter, ab).shape:
                    raise UserInputError(f"{path}: {name}.{ab}: got shape {tuple(saved.shape)}, "
                                         f"expected {tuple(getattr(adapter, ab).shape)}")
                getattr(adapter, ab).copy_(saved)
        for name, param in zip(extras, add_extras(model, extras), strict=True):
            param.copy_(tensors[name])
    return meta

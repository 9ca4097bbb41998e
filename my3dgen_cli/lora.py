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

As in peft: `AdapterConfig` is what an adapter is (rank, alpha, style, which layers, which extras),
`get_adapter_state` / `set_adapter_state` its values. The file holding both is `adapter_file.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from my3dgen_cli.errors import UserInputError

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

    def adapted(self, weight: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
        """gain * (weight + delta) as one matrix product (torch.addmm: gain * W + gain * scale * B @ A).

        What a trained layer computes per pass: one op and one autograd node instead of four of each (product,
        reshape, scale, sum), on each of ~35 layers of every rendered view. Same values up to float rounding.
        """
        flat = weight.reshape(weight.shape[0], -1)
        return torch.addmm(flat, self.lora_B, self.lora_A, beta=gain, alpha=gain * self.scale).reshape(weight.shape)

    def conv_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The delta of a conv weight as two convolutions, a [R, I, k, k] then b [O, R, 1, 1] (scale in b):
        conv(x, delta) == conv1x1(conv(x, a), b). For eg3d/lowrank_conv.py."""
        out_channels, in_channels, kh, kw = self.weight_shape
        a = self.lora_A.reshape(-1, in_channels, kh, kw)
        b = (self.lora_B * self.scale).reshape(out_channels, -1, 1, 1)
        return a, b

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


@dataclass(frozen=True)
class AdapterConfig:
    """What an adapter is, apart from its values (peft's `LoraConfig` for EG3D).

    rank, alpha: the delta is alpha/rank * B @ A (alpha None: rank, scale 1). style: the conv
    decomposition (`CONV_STYLES`). targets: layer-name regexes a new adapter wraps (only patterns
    from code are compiled, never text read from a file). layers: the exact names of the wrapped
    layers, as an adapter file stores them (None: the layers `targets` match). extras: official names
    of the base parameters the adapter trains and replaces (`EXTRA_TARGETS`).
    """

    rank: int = 1
    alpha: float | None = None
    style: str = "my3dgen"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    layers: tuple[str, ...] | None = None
    extras: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: got {self.rank}, expected >= 1")
        if self.style not in CONV_STYLES:
            raise ValueError(f"style: got {self.style!r}, expected one of {CONV_STYLES}")
        object.__setattr__(self, "alpha", float(self.rank if self.alpha is None else self.alpha))
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "extras", tuple(self.extras))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank  # type: ignore[arg-type]


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
    config: AdapterConfig | None = None,
) -> list[nn.Parameter]:
    """Freeze the model and attach a fresh adapter to every target layer.

    Returns the new trainable tensors (the only ones with requires_grad). alpha defaults to rank
    (scale 1). With `generator`, A's initialization is reproducible. `layer_names` (exact names, as an
    adapter file stores them) replaces matching `targets`. `config` replaces all of rank, alpha,
    targets, style and layer_names (its extras are attached by `add_extras` / `set_adapter_state`).
    """
    if config is None:
        config = AdapterConfig(rank, alpha, style, tuple(targets), None if layer_names is None else tuple(layer_names))
    layers = _adaptable_layers(model)
    if config.layers is not None:
        unknown = [n for n in config.layers if n not in layers]
        if unknown:
            raise UserInputError(f"adapter layer {unknown[0]!r}: this generator has no such adaptable layer")
        names = list(config.layers)
    else:
        names = match_targets(model, config.targets)
    if not names:
        raise UserInputError(f"adapter targets: got {list(config.targets)}, which match no layer of this generator")
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for name in names:
        layer = layers[name]
        adapter = LoRA(layer.weight.shape, config.rank, float(config.alpha), config.style)  # type: ignore[arg-type]
        if generator is not None:
            bound = 1 / math.sqrt(adapter.lora_A.shape[1])  # kaiming_uniform(a=sqrt 5) bound
            with torch.no_grad():
                adapter.lora_A.uniform_(-bound, bound, generator=generator)
        adapter.to(device=layer.weight.device, dtype=layer.weight.dtype)
        layer.adapter = adapter
        params += [adapter.lora_A, adapter.lora_B]
    model._my3dgen_adapter_config = replace(config, extras=())  # type: ignore[assignment]
    return params


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The config of the adapter attached to `model` (extras: the parameters it replaces now); None without."""
    config = getattr(model, "_my3dgen_adapter_config", None)
    return None if config is None else replace(config, extras=tuple(extra_names(model)))


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


def is_factor(name: str) -> bool:
    """True for the name of a LoRA factor (`<layer>.lora_A` / `.lora_B`), False for a trained extra."""
    return name.endswith((".lora_A", ".lora_B"))


def get_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`{layer}.lora_A` / `{layer}.lora_B` of every attached adapter, then the trained extras under their
    official names (contiguous, CPU): peft's `get_peft_model_state_dict`."""
    out = {}
    for name, adapter in adapter_layers(model).items():
        out[f"{name}.lora_A"] = adapter.lora_A.detach().cpu().contiguous()
        out[f"{name}.lora_B"] = adapter.lora_B.detach().cpu().contiguous()
    params = dict(model.named_parameters())
    for name in extra_names(model):
        out[name] = params[name].detach().cpu().contiguous()
    return out


def check_extras(model: nn.Module, state: dict[str, Any], where: str) -> list[str]:
    """The trained extras in `state` (names that are not factors), each refused (naming `where`) unless it
    is one of the model's `EXTRA_TARGETS` parameters with the same shape."""
    extras = [k for k in state if not is_factor(k)]
    allowed = set(match_extras(model))
    params = dict(model.named_parameters())
    for name in extras:
        if name not in allowed or tuple(params[name].shape) != tuple(state[name].shape):
            raise UserInputError(f"{where}: trained extra {name} (shape {tuple(state[name].shape)}) is not a bias, "
                                 "noise strength or const of this generator")
    return extras


def set_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "adapter state") -> None:
    """Put `state` (`get_adapter_state`'s layout) into the adapters attached to `model`: peft's
    `set_peft_model_state_dict`. The factors must be exactly those of the attached layers with their
    shapes; the extras become trainable with the base's own values kept aside (`add_extras`).
    Anything else is a one-line `UserInputError` naming `where` (e.g. the file it came from).
    """
    extras = check_extras(model, state, where)
    layers = adapter_layers(model)
    expected = {f"{n}.lora_{ab}" for n in layers for ab in "AB"}
    factors = {k for k in state if is_factor(k)}
    if factors != expected:
        first = sorted(expected - factors)[:1] or sorted(factors - expected)[:1]
        raise UserInputError(f"{where}: adapter tensors do not match the generator (first mismatch: {first[0]})")
    with torch.no_grad():
        for name, adapter in layers.items():
            for ab in ("lora_A", "lora_B"):
                saved, own = state[f"{name}.{ab}"], getattr(adapter, ab)
                if saved.shape != own.shape:
                    raise UserInputError(f"{where}: {name}.{ab}: got shape {tuple(saved.shape)}, "
                                         f"expected {tuple(own.shape)}")
                own.copy_(saved)
        for name, param in zip(extras, add_extras(model, extras), strict=True):
            param.copy_(state[name])


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
    model.__dict__.pop("_my3dgen_adapter_config", None)  # no adapter left: adapter_config() says None
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
    model.__dict__.pop("_my3dgen_adapter_config", None)
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



"""Options, Enums, checks and helpers shared by several commands, declared once (no torch at import)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from my3dgen_cli.errors import UserInputError

# The shared options, declared once: every command that has one of them spells it and means it this way.
OutOpt = Annotated[Path | None, typer.Option("--output", "--out", "-o", help="Output file or folder.",
                                             show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts (nothing else on stdout).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Results only: no progress, no notes.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never use the network (as MY3DGEN_OFFLINE=1).")]


def choices(name: str, doc: str, *values: str) -> Any:
    """A str Enum of an option's fixed values, so `--help` lists them (members named as the values, "+" as "_plus")."""
    enum = Enum(name, {v.replace("+", "_plus"): v for v in values}, type=str, module=__name__)
    enum.__doc__ = doc
    return enum


Amp = choices("Amp", "Autocast of a render or of training: exact fp32, or bf16/fp16 (fp16: CUDA only).", "off", "bf16",
              "fp16")
Space = choices("Space", "A latent space: w (one vector for every layer) or w+ (one per layer).", "w", "w+")
Budget = choices("Budget", "personalize's step presets (personalize.pipeline.BUDGETS).", "quick", "standard", "paper")
SymLoss = choices("SymLoss", "The distance of the symmetry term: ArcFace identity or LPIPS.", "id", "lpips")
InvertInit = choices("InvertInit", "Where an inversion starts: the anchors' mean or the nearest anchor.", "mean",
                     "nearest")
Blend = choices("Blend", "How interpolate blends latents.", "linear", "slerp")
ExportFormat = choices("ExportFormat", "What export writes: a checked ONNX graph or a merged safetensors base.", "onnx",
                       "safetensors")

IdentityOpt = Annotated[
    str | None, typer.Option("--identity", help="Identity (adapter + anchors); base model without.", show_default=False)
]
BaseOpt = Annotated[
    str | None,
    typer.Option("--base", help="Base generator: zoo name, local base or file (default: the identity's, else the "
                 "one a .latent records, else eg3d-ffhq512-128).",
                 show_default=False),
]
AdapterOpt = Annotated[
    Path | None,
    typer.Option("--adapter", help="An adapter file (e.g. from `invert --tune`) instead of the identity's.",
                 show_default=False),
]


@dataclass(frozen=True)
class ModelOptions:
    """The options of every command that opens a generator: which one, where outputs go, how to report."""

    identity: str | None
    base: str | None
    adapter: Path | None
    out: Path | None
    force: bool
    json_mode: bool
    device: str
    offline: bool = False

    def output(self) -> Any:
        """The output sink (JSON with --json, else human)."""
        from my3dgen_cli.cli import output_for

        return output_for(self.json_mode)

    def model(self) -> Any:
        """The generator choice (use.sources.ModelChoice) the library functions take."""
        from my3dgen_cli.use.sources import ModelChoice

        return ModelChoice(self.identity, self.base, self.adapter, self.device, True if self.offline else None)

    def open(self) -> tuple[Any, Any, Any]:
        """(G, BaseRef, torch.device): see `use.sources.open_model`."""
        return self.model().open()


# (parameter name, option, default) in the order `--help` lists them, after the command's own options.
_MODEL_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("identity", IdentityOpt, None),
    ("base", BaseOpt, None),
    ("adapter", AdapterOpt, None),
    ("out", OutOpt, None),
    ("force", ForceOpt, False),
    ("json_mode", JsonOpt, False),
    ("device", DeviceOpt, "auto"),
    ("offline", OfflineOpt, False),
)


def model_options(*, adapter: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the shared options, declared once here, as one `opts: ModelOptions` argument.

    The command's signature (which Typer reads through `inspect.signature`) becomes its own
    parameters without `opts`, then these options; so `--help` lists them exactly as if each
    command spelled them out. `adapter=False` leaves out --adapter (opts.adapter is then None).
    """
    shared = [(name, opt, default) for name, opt, default in _MODEL_OPTIONS if adapter or name != "adapter"]

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        sig = inspect.signature(fn, eval_str=True)
        own = [p for name, p in sig.parameters.items() if name != "opts"]
        if len(own) == len(sig.parameters):
            raise TypeError(f"{fn.__name__} must take an `opts: ModelOptions` parameter")
        added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=opt)
                 for name, opt, default in shared]

        @functools.wraps(fn)
        def run(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name, _, _ in shared}
            return fn(opts=ModelOptions(**{"adapter": None, **values}), **kwargs)

        run.__signature__ = sig.replace(parameters=own + added)  # type: ignore[attr-defined]
        return run

    return wrap


# Limits shared by every command with the option, so `render --fps 0` and `interpolate --fps 0` fail alike.
MAX_FRAMES = 10_000  # video frames / orbit views: a typo such as 1000000 would render for days
FPS_RANGE = (0.1, 120.0)
BATCH_RANGE = (1, 1024)
TRUNCATION_RANGE = (0.0, 2.0)
MAX_STEPS = 1_000_000
MAX_RANK = 512  # LoRA rank: the widest EG3D layer has 512 channels
LR_RANGE = (1e-8, 10.0)


def check_range(name: str, value: float | int | None, lo: float | None = None, hi: float | None = None) -> None:
    """The one check of a numeric option, before any work: finite and within [lo, hi] (None = unbounded).

    Raises UserInputError "NAME: got VALUE, expected LO..HI" (or ">= LO", "<= HI"); None values pass (unset).
    """
    import math

    if value is None:
        return

    def shown(v: float) -> str:
        return str(int(v)) if math.isfinite(v) and float(v).is_integer() else f"{v:g}"

    if lo is not None and hi is not None:
        expected = f"{shown(lo)}..{shown(hi)}"
    elif lo is not None:
        expected = f"{shown(lo)} or more"
    else:
        expected = f"{shown(hi)} or less" if hi is not None else "a finite number"
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise UserInputError(f"{name}: got {shown(value)}, expected {expected}")


# Seeds and anchor indices: "7", "1,5,9", EG3D's "0-3" (gen_samples.py) and our "0:3"; every range
# includes both ends. Seeds stop at 2**32 - 1 as in EG3D (numpy's RandomState); MAX_INDICES keeps a
# typo such as 0-99999999 from queueing years of renders.
MAX_SEED = 2**32 - 1
MAX_INDICES = 10_000
INDEX_FORMS = "7, 1,5,9, 0-3 or 0:3 (ranges include both ends)"


def parse_indices(spec: str, label: str = "--seed", maximum: int = MAX_SEED) -> list[int]:
    """Non-negative integers from "7", "1,5,9", "0-3" or "0:3" (both ends inclusive), mixed by commas.

    Order is kept. Raises UserInputError (one line starting with `label`) for anything else: a reversed
    range, a repeated value, a value above `maximum`, or more than MAX_INDICES values.
    """
    import re

    values: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        m = re.fullmatch(r"([0-9]{1,20})(?:\s*([-:])\s*([0-9]{1,20}))?", part)
        if not m:
            raise UserInputError(f"{label}: got {part!r}, expected {INDEX_FORMS}")
        start = int(m.group(1))
        stop = int(m.group(3)) if m.group(3) is not None else start
        if stop < start:
            raise UserInputError(f"{label}: got {part!r}, a range runs up (START{m.group(2)}END with START <= END)")
        if stop > maximum:
            raise UserInputError(f"{label}: got {stop} in {part!r}, expected at most {maximum}")
        if len(values) + stop - start + 1 > MAX_INDICES:
            raise UserInputError(f"{label}: {spec!r} names more than {MAX_INDICES} values; give a smaller range")
        values += range(start, stop + 1)
    if len(set(values)) != len(values):
        twice = next(v for k, v in enumerate(values) if v in values[:k])
        raise UserInputError(f"{label}: {twice} is given twice in {spec!r}")
    return values


def expand_keys(specs: Iterable[str]) -> list[str]:
    """Latent keys with seed/anchor lists spread out: "seed:0-2" -> seed:0, seed:1, seed:2 (files unchanged)."""
    out: list[str] = []
    for spec in specs:
        kind = next((k for k in ("seed", "anchor") if spec.startswith(f"{k}:")), None)
        if kind is None:
            out.append(spec)
        else:
            out += [f"{kind}:{v}" for v in parse_indices(spec[len(kind) + 1:], f"latent {spec}")]
    return out


def written(rows: list[tuple[str, Path]]) -> str:
    """Human summary lines: 'wrote <what>: <path>'."""
    return "\n".join(f"wrote {what}: {path}" for what, path in rows)

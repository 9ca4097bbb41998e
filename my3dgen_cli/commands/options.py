"""Options and helpers shared by invert, render and interpolate (no torch at import)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from my3dgen_cli.errors import UserInputError

OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output file or folder.", show_default=False)]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
IdentityOpt = Annotated[
    str | None, typer.Option("--identity", help="Identity (adapter + anchors); base model without.", show_default=False)
]
BaseOpt = Annotated[
    str | None,
    typer.Option("--base", help="Base generator: zoo name, local base or file (default: the identity's).",
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

    def output(self) -> Any:
        """The output sink (JSON with --json, else human)."""
        from my3dgen_cli.cli import output_for

        return output_for(self.json_mode)

    def open(self) -> tuple[Any, Any, Any]:
        """(G, BaseRef, torch.device): see `open_model`."""
        return open_model(self.base, self.identity, self.adapter, self.device)


# (parameter name, option, default) in the order `--help` lists them, after the command's own options.
_MODEL_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    ("identity", IdentityOpt, None),
    ("base", BaseOpt, None),
    ("adapter", AdapterOpt, None),
    ("out", OutOpt, None),
    ("force", ForceOpt, False),
    ("json_mode", JsonOpt, False),
    ("device", DeviceOpt, "auto"),
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


def check_free(paths: Iterable[Path], force: bool) -> None:
    """Refuse to overwrite: the first existing path is named unless --force."""
    for p in paths:
        if p.exists() and not force:
            raise UserInputError(f"{p} already exists (use --force to overwrite)")
        if p.exists() and p.is_dir():
            raise UserInputError(f"{p} is a folder, expected a file path")


def open_model(base: str | None, identity: str | None, adapter: Path | None, device: str) -> tuple[Any, Any, Any]:
    """(G, BaseRef, torch.device) with the identity's adapter, or `adapter` when given."""
    from my3dgen_cli.devices import pick_device
    from my3dgen_cli.generators import open_base, open_generator

    dev = pick_device(device)
    if adapter is None:
        G, ref, _ = open_generator(base=base, identity=identity, device=dev)
        return G, ref, dev
    from my3dgen_cli.adapter_file import load_adapter, read_adapter

    if base is None:
        base = read_adapter(adapter).base_name
    G, ref = open_base(base, device=dev)
    load_adapter(G, adapter, base_sha256=ref.sha256)
    G.to(dev)
    for p in G.parameters():
        p.requires_grad_(False)
    return G.eval(), ref, dev


def check_latent_files(specs: Iterable[str]) -> None:
    """Name a missing latent file, or a broken .npy one, before the (slow) generator is opened, not after."""
    from my3dgen_cli.latents import NPY_SUFFIX, camera_beside, read_npy

    for spec in specs:
        if spec.startswith(("seed:", "anchor:")):
            continue
        if not Path(spec).is_file():
            raise UserInputError(f"latent: {spec} does not exist (expected a .latent or .npy file, anchor:K or seed:S)")
        if Path(spec).suffix.lower() == NPY_SUFFIX:
            read_npy(spec)
            camera_beside(spec)


def resolve_key(spec: str, G: Any, identity: str | None, device: Any, truncation: float) -> tuple[str, Any, Any]:
    """A latent named on the command line -> (name, ws [1, num_ws, w_dim], camera [1, 25] or None).

    spec: a `.latent` or `.npy` file (latents_import.open_latent), `anchor:K` (needs --identity) or `seed:S`.
    """
    from my3dgen_cli.latents import open_latent
    from my3dgen_cli.use.render import latent_from_seed

    if spec.startswith("seed:"):
        try:
            seed = int(spec[5:])
        except ValueError:
            raise UserInputError(f"latent: got {spec!r}, expected seed:INTEGER") from None
        return f"seed{seed}", latent_from_seed(G, seed, truncation), None
    if spec.startswith("anchor:"):
        try:
            k = int(spec[7:])
        except ValueError:
            raise UserInputError(f"latent: got {spec!r}, expected anchor:INTEGER") from None
        return (f"anchor{k}", *anchor(identity, k, device))
    lat = open_latent(spec, G.num_ws, G.w_dim)
    return Path(spec).stem, lat.ws.to(device), None if lat.camera is None else lat.camera.to(device)


def anchor(identity: str | None, k: int, device: Any) -> tuple[Any, Any]:
    """(ws [1, num_ws, w_dim], camera [1, 25]) of the identity's anchor k."""
    if identity is None:
        raise UserInputError("anchors belong to an identity: add --identity NAME")
    from my3dgen_cli.identity import identity_anchors

    ws, cams = identity_anchors(identity, device)
    if ws is None:
        raise UserInputError(f"identity {identity!r} has no anchors.safetensors")
    if not 0 <= k < ws.shape[0]:
        raise UserInputError(f"anchor: got {k}, expected 0..{ws.shape[0] - 1} (identity {identity!r})")
    return ws[k:k + 1], cams[k:k + 1]


def written(rows: list[tuple[str, Path]]) -> str:
    """Human summary lines: 'wrote <what>: <path>'."""
    return "\n".join(f"wrote {what}: {path}" for what, path in rows)

"""Import a snapshot written by the official My3DGen code (luchaoqi/my3dgen) as an identity.

    my3dgen identities import network-snapshot-000500.pkl --name ana [--base eg3d-ffhq512-128]

A My3DGen snapshot is an EG3D training-loop pickle whose G_ema has its backbone synthesis wrapped in
`LoraNet` and its superresolution in `SuperresolutionHybrid8XDCWrapper`; each wrapper holds the module
it wraps under one attribute (`WRAPPERS`), and the conv, ToRGB and affine layer wrappers own the
factors `lora_A`, `lora_B` of their layer's weight. Only the live module tree (`_modules`,
`_parameters`, `_buffers`) is read: every wrapper also keeps, in `_init_args`, a stale copy of the
module it wrapped (values at wrap time), which the factors and trained tensors are never taken from.

How My3DGen's formulas map onto ours (lora.py; s = lora_alpha / r in both):
- modulated conv: W + s (B A).view(out, in, k, k), inner dimension r*k: our "my3dgen" style as is;
- ToRGB: the same delta on the 1x1 weight, then the 1/sqrt(in) style gain: our ToRGB as is;
- affine FC: My3DGen adds s x A^T B^T *after* the weight gain g = 1/sqrt(512), our delta is added to
  the stored weight *before* it, so B is stored as B / g (exact up to float rounding).
The other trained tensors (b4.const, biases, noise strengths: lora.EXTRA_TARGETS) become the adapter's
trained extras. Every other tensor must equal the base's (else: made on another base). Without a
base, the snapshot's frozen weights become a local base `<name>-base`, with the wrap-time values of
the extras from the outermost stale copy when it agrees with the live weights (else the trained
values, so the adapter's extras change nothing there).
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli import __version__
from my3dgen_cli.errors import IncompatibleAdapterError, UnsafeCheckpointError, UserInputError
from my3dgen_cli.weights.pickle_records import short_repr

# Wrapper class -> the attribute holding the module it wraps (a path segment the plain names drop).
WRAPPERS = {
    "LoraNet": "synthesis",
    "SynthesisBlockWrapper": "synthesis_block",
    "SynthesisLayerWrapper": "synthesis_layer",
    "ToRGBLayerWrapper": "to_rgb_layer",
    "FullyConnectedLayerWrapper": "fully_connected_layer",
    "SuperresolutionHybrid8XDCWrapper": "superresolution_module",
}
LAYER_WRAPPERS = ("SynthesisLayerWrapper", "ToRGBLayerWrapper", "FullyConnectedLayerWrapper")
FACTORS = ("lora_A", "lora_B")
DROPPED = ("dataset_label_std",)  # registered by the training loop, never read by the generator
_XZ_MAGIC = b"\xfd7zXZ\x00"
# Trained weights are close to incompressible (../shared's snapshot: 2.2x); a file decompressing to
# more than this many times its size is refused before it fills the memory.
_XZ_MAX_RATIO = 64
_NETWORK = "G_ema"


@dataclass
class LiveTensor:
    snapshot_name: str  # the name in the snapshot's state dict (for messages)
    value: torch.Tensor


@dataclass
class Snapshot:
    """The live tensors of a My3DGen G_ema, under plain EG3D names."""

    config: dict[str, Any]
    tensors: dict[str, LiveTensor]  # plain name -> tensor (frozen and trained)
    factors: dict[str, dict[str, LiveTensor]]  # plain layer name -> {"lora_A", "lora_B"}
    wrappers: dict[str, dict[str, Any]]  # plain layer name -> the layer wrapper's attributes (r, lora_alpha, ...)
    wrap_time: dict[str, torch.Tensor] = field(default_factory=dict)  # outermost stale copies, plain names


@dataclass
class ImportResult:
    name: str
    folder: Path
    base: str
    base_created: bool
    rank: int
    alpha: float
    lora_parameters: int
    extra_parameters: int
    adapter_bytes: int
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "folder": str(self.folder), "base": self.base, "base_created": self.base_created,
                "rank": self.rank, "alpha": self.alpha, "lora_parameters": self.lora_parameters,
                "extra_parameters": self.extra_parameters,
                "parameters": self.lora_parameters + self.extra_parameters, "adapter_bytes": self.adapter_bytes,
                "notes": self.notes}


# --- reading -----------------------------------------------------------------------------------


def read_snapshot_record(path: str | Path) -> Any:
    """The G_ema record of a snapshot (`.pkl`, or xz-compressed as `.pkl.xz`), read with the safe reader."""
    from my3dgen_cli.weights.safe_unpickle import PersistentObject, safe_load

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file, expected a My3DGen network snapshot (.pkl or .pkl.xz)")
    with path.open("rb") as raw:
        compressed = raw.read(len(_XZ_MAGIC)) == _XZ_MAGIC
    try:
        with (lzma.open(path) if compressed else path.open("rb")) as f:
            data = safe_load(f, stream_limit=_XZ_MAX_RATIO * path.stat().st_size)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except UserInputError as err:
        raise UserInputError(f"{path}: {err}") from None
    except (lzma.LZMAError, EOFError) as err:
        raise UserInputError(f"{path}: not a readable xz file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get(_NETWORK), PersistentObject):
        raise UserInputError(f"{path}: expected a network snapshot (a dict with a {_NETWORK} network)")
    return data[_NETWORK]


def parse_snapshot(g_ema: Any) -> Snapshot:
    """The live tensors of a G_ema record under plain names, its LoRA factors and wrapper attributes.

    Raises UserInputError naming the first tensor that is not where a known wrapper puts it.
    """
    from my3dgen_cli.weights.official_pkl import checkpoint_from_record

    config = checkpoint_from_record(g_ema).config()
    snap = Snapshot(config, {}, {}, {})
    _walk(g_ema, "", "", snap)
    if not snap.factors:
        raise UserInputError("holds no My3DGen LoRA wrappers (a plain EG3D network: use it as a base with "
                             "`--base FILE` or `my3dgen fetch NAME --from FILE`)")
    for prefix in ("backbone.synthesis", "superresolution"):
        snap.wrap_time.update(_wrap_time_copy(g_ema, prefix))
    return snap


def _state(obj: Any, where: str) -> dict[str, Any]:
    from my3dgen_cli.weights.safe_unpickle import ForeignObject, PersistentObject

    if isinstance(obj, (PersistentObject, ForeignObject)) and isinstance(obj.state, dict):
        return obj.state
    raise UserInputError(f"module '{where or '<root>'}' is a {type(obj).__name__}, expected a network module")


def _class_name(obj: Any) -> str:
    name = getattr(obj, "class_name", None) or getattr(obj, "qualname", "")
    return str(name).rsplit(".", 1)[-1]


def _tables(state: dict[str, Any], where: str) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """(persistent tensors, child modules) of one module's state."""
    tables = {}
    for key in ("_parameters", "_buffers", "_modules"):
        table = state.get(key, {})
        if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
            raise UserInputError(f"module '{where or '<root>'}' has a malformed {key}")
        tables[key] = table
    skip = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(skip, (set, frozenset, list, tuple)) or not all(isinstance(n, str) for n in skip):
        raise UserInputError(f"module '{where or '<root>'}' has a malformed buffer set")
    skip = set(skip)  # a list's `in` would take time quadratic in the file
    tensors = [*tables["_parameters"].items(), *((n, v) for n, v in tables["_buffers"].items() if n not in skip)]
    children = [(n, c) for n, c in tables["_modules"].items() if c is not None]
    return [(n, v) for n, v in tensors if v is not None], children


def _walk(root: Any, snap_prefix: str, plain_prefix: str, snap: Snapshot) -> None:
    """Depth first through the live tree; a wrapper's wrapped module keeps the wrapper's plain path.

    With a stack of its own, not recursion: a file's module chain may be thousands deep."""
    stack = [(root, snap_prefix, plain_prefix)]
    seen: set[int] = set()
    while stack:
        obj, snap_prefix, plain_prefix = stack.pop()
        where = snap_prefix.rstrip(".")
        if id(obj) in seen:
            raise UserInputError(f"module '{where}' appears twice in the module tree")
        seen.add(id(obj))
        state = _state(obj, where)
        cls = _class_name(obj)
        tensors, children = _tables(state, where)
        for name, value in tensors:
            snap_name = snap_prefix + name
            if not isinstance(value, torch.Tensor):
                raise UserInputError(f"{snap_name} is a {type(value).__name__}, expected a tensor")
            if name in FACTORS and cls in LAYER_WRAPPERS:
                layer = plain_prefix.rstrip(".")
                snap.factors.setdefault(layer, {})[name] = LiveTensor(snap_name, value.detach())
                snap.wrappers[layer] = {k: state.get(k) for k in ("r", "lora_alpha", "scaling", "merged")}
                continue
            if cls in WRAPPERS:
                _unknown(snap_name, value, f"a {cls} holds only lora_A and lora_B")
            snap.tensors[plain_prefix + name] = LiveTensor(snap_name, value.detach())
        for name, child in reversed(children):  # popped in the tree's own order
            wrapped = WRAPPERS.get(cls) == name
            stack.append((child, f"{snap_prefix}{name}.", plain_prefix if wrapped else f"{plain_prefix}{name}."))


def _unknown(snap_name: str, value: torch.Tensor, why: str) -> None:
    shape = ", ".join(str(int(s)) for s in value.shape)
    raise UserInputError(f"unknown My3DGen LoRA layout: {snap_name} (shape ({shape})): {why}")


def _wrap_time_copy(g_ema: Any, prefix: str) -> dict[str, torch.Tensor]:
    """Plain tensors of the module the outermost wrapper at `prefix` wrapped, as they were at wrap time
    (its `_init_args[0]`, taken after the inner wrappers were added: all B still zero); empty when there
    is no such copy."""
    obj = g_ema
    for part in prefix.split("."):
        obj = _state(obj, prefix).get("_modules", {}).get(part)
        if obj is None:
            return {}
    args = _state(obj, prefix).get("_init_args")
    if _class_name(obj) not in WRAPPERS or not isinstance(args, (tuple, list)) or not args:
        return {}
    copy = Snapshot({}, {}, {}, {})
    try:
        _walk(args[0], f"{prefix}.", f"{prefix}.", copy)
    except UserInputError:
        return {}
    if any(bool(pair["lora_B"].value.any()) for pair in copy.factors.values() if "lora_B" in pair):
        return {}  # not taken at wrap time (B starts at zero)
    return {name: t.value for name, t in copy.tensors.items()}


# --- checking ----------------------------------------------------------------------------------


@dataclass
class Converted:
    """What the snapshot becomes: our adapter tensors, the frozen weights, the trained extras."""

    rank: int
    alpha: float
    factors: dict[str, torch.Tensor]  # `<layer>.lora_A/B` in our parametrization
    extras: dict[str, torch.Tensor]  # official names -> trained values
    frozen: dict[str, torch.Tensor]  # official names -> frozen values (mapping, decoder, weights, buffers)


def convert_snapshot(snap: Snapshot) -> Converted:
    """Check every live tensor against the generator of the snapshot's config and convert the factors.

    Raises UserInputError naming the first tensor of an unknown layout (a name with no place in the
    plain generator, a factor of another shape, another rank per layer, a merged wrapper).
    """
    from my3dgen_cli.lora import DEFAULT_TARGETS, match_extras, match_targets
    from my3dgen_cli.weights.instantiate import skeleton

    try:
        model = skeleton(snap.config)
    except (ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"{_NETWORK} has a config this version cannot build ({err})") from None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, t in snap.tensors.items():
        if name in DROPPED:
            continue
        if name not in expected:
            _unknown(t.snapshot_name, t.value, "no tensor of an EG3D generator has that place")
        if tuple(t.value.shape) != expected[name]:
            _unknown(t.snapshot_name, t.value, f"{name} has shape {expected[name]} in this config")
    missing = [name for name in expected if name not in snap.tensors]
    if missing:
        raise UserInputError(f"{_NETWORK} has no {missing[0]} (in the live module tree)")
    layers = match_targets(model, DEFAULT_TARGETS)
    modules = dict(model.named_modules())
    rank, alpha = _rank_and_alpha(snap, layers)
    factors: dict[str, torch.Tensor] = {}
    for layer in layers:
        pair = snap.factors[layer]
        weight_shape = expected[f"{layer}.weight"]
        k = weight_shape[-1] if len(weight_shape) == 4 else 1
        inner, n_in = rank * k, int(torch.Size(weight_shape[1:]).numel())
        for ab, shape in (("lora_A", (inner, n_in)), ("lora_B", (weight_shape[0], inner))):
            t = pair[ab]
            if tuple(t.value.shape) != shape:
                _unknown(t.snapshot_name, t.value, f"rank {rank} on {layer} needs shape {shape}")
        b = pair["lora_B"].value.double()
        if len(weight_shape) == 2:  # affine FC: My3DGen's delta skips the weight gain, ours passes through it
            b = b / float(modules[layer].weight_gain)
        factors[f"{layer}.lora_A"] = pair["lora_A"].value.float().contiguous()
        factors[f"{layer}.lora_B"] = b.float().contiguous()
    extra_names = set(match_extras(model))
    extras = {n: snap.tensors[n].value.float() for n in expected if n in extra_names}
    frozen = {n: snap.tensors[n].value for n in expected if n not in extra_names}
    return Converted(rank, alpha, factors, extras, frozen)


def _rank_and_alpha(snap: Snapshot, layers: list[str]) -> tuple[int, float]:
    """The one (r, lora_alpha) of every wrapped layer; the wrapped layers must be My3DGen's 26."""
    for layer, pair in snap.factors.items():
        if layer not in layers or set(pair) != set(FACTORS):
            first = next(iter(pair.values()))
            why = "My3DGen wraps the backbone synthesis and superresolution layers only, each with lora_A and lora_B"
            _unknown(first.snapshot_name, first.value, why)
    absent = [layer for layer in layers if layer not in snap.factors]
    if absent:
        raise UserInputError(f"unknown My3DGen LoRA layout: {absent[0]} has no LoRA wrapper")
    first = snap.wrappers[layers[0]]
    for layer in layers:
        attrs = snap.wrappers[layer]
        t = snap.factors[layer]["lora_A"]
        r, alpha, merged = attrs["r"], attrs["lora_alpha"], attrs["merged"]
        if merged:
            _unknown(t.snapshot_name, t.value, "its wrapper is merged (the delta is already in the weight)")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
            _unknown(t.snapshot_name, t.value, f"wrapper r={short_repr(r)}, lora_alpha={short_repr(alpha)}: "
                                               "expected r >= 1, alpha > 0")
        if (r, alpha) != (first["r"], first["lora_alpha"]):
            _unknown(t.snapshot_name, t.value, f"r={r}, lora_alpha={alpha} differ from {layers[0]}'s "
                                               f"r={first['r']}, lora_alpha={first['lora_alpha']}")
    return int(first["r"]), float(first["lora_alpha"])


def check_base(converted: Converted, base_state: dict[str, torch.Tensor], base_name: str) -> None:
    """Refuse (one line) when a frozen tensor of the snapshot differs from the base's."""
    for name, value in converted.frozen.items():
        if name not in base_state or tuple(base_state[name].shape) != tuple(value.shape):
            raise IncompatibleAdapterError(f"the snapshot was made on another base than {base_name!r}: "
                                           f"{name} has another shape or is missing there")
        ours = base_state[name].detach().to("cpu", torch.float32)
        if not torch.equal(ours, value.to(torch.float32)):
            diff = float((ours - value.float()).abs().max())
            raise IncompatibleAdapterError(f"the snapshot was made on another base than {base_name!r}: "
                                           f"{name} differs (max |diff| {diff:.3g}); pass the base it was "
                                           "trained on with --base, or none to import its own")


def own_base_state(snap: Snapshot, converted: Converted) -> tuple[dict[str, torch.Tensor], str]:
    """The base a snapshot carries: its frozen weights, plus the extras' values before training from the
    outermost stale copy when that copy agrees with every live frozen weight (else the trained values).
    Returns (state in module order, a note for the user)."""
    copy = snap.wrap_time
    agrees = bool(copy) and all(n in copy for n in converted.extras) and all(
        torch.equal(copy[n].float(), v.float()) for n, v in converted.frozen.items() if n in copy)
    state = {**converted.frozen}
    if agrees:
        state.update({n: copy[n].float() for n in converted.extras})
        note = "base biases, noise strengths and const: the values the snapshot's wrappers started from"
    else:
        state.update(converted.extras)
        note = "the snapshot keeps no untrained biases: the base holds the trained ones"
    order = list(converted.frozen) + [n for n in converted.extras if n not in converted.frozen]
    return {n: state[n] for n in order}, note


# --- the command -------------------------------------------------------------------------------


def check_import_target(path: str | Path, name: str, base: str | None = None, force: bool = False) -> None:
    """The cheap checks of `import_snapshot`, before the snapshot is read (the CLI runs them before its progress
    bar): the names are valid, the file is there, and without --force nothing of that name would be replaced."""
    from my3dgen_cli.generators import local_bases_dir
    from my3dgen_cli.identity import check_name, identity_paths

    check_name(name)
    if not Path(path).is_file():
        raise UserInputError(f"{path}: no such file")
    ip = identity_paths(name)
    if ip.adapter.is_file() and not force:
        raise UserInputError(f"identity {name!r} already exists ({ip.root}); pass --force to replace it")
    if base is None:
        base_name = check_name(f"{name}-base")
        base_file = local_bases_dir() / f"{base_name}.safetensors"
        if base_file.exists() and not force:
            raise UserInputError(f"local base {base_name!r} already exists ({base_file}); pass --force to replace "
                                 f"it, or --base {base_name} to import on it")


def import_snapshot(path: str | Path, name: str, base: str | None = None, force: bool = False,
                    offline: bool | None = None) -> ImportResult:
    """`identities import`: read, check and convert a My3DGen snapshot; write identities/<name>/adapter.safetensors
    (and, without `base`, a local base `<name>-base`). Nothing is written before every check passed."""
    from my3dgen_cli.adapter_file import AdapterFile, write_adapter
    from my3dgen_cli.generators import local_bases_dir, open_base
    from my3dgen_cli.identity import building_identity, identity_paths
    from my3dgen_cli.lora import DEFAULT_TARGETS, AdapterConfig
    from my3dgen_cli.weights.checkpoint import sha256_file
    from my3dgen_cli.weights.converted import ConvertedBase, write_converted_base
    from my3dgen_cli.weights.fingerprint import state_fingerprint

    check_import_target(path, name, base, force)
    path = Path(path)
    ip = identity_paths(name)
    try:
        snap = parse_snapshot(read_snapshot_record(path))
        converted = convert_snapshot(snap)
    except UserInputError as err:
        msg = str(err)
        raise UserInputError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    notes: list[str] = []
    base_file = None
    if base is not None:
        G, ref = open_base(base, offline=offline)
        check_base(converted, G.state_dict(), ref.name)
        base_name, base_sha = ref.name, ref.sha256
        del G
    else:
        base_name = f"{name}-base"
        base_file = local_bases_dir() / f"{base_name}.safetensors"
        state, note = own_base_state(snap, converted)
        notes.append(note)
        base_sha = state_fingerprint(state)
    sha = sha256_file(path)
    if base_file is not None:
        config = {**snap.config, "source": {"file": path.name, "sha256": sha, "network": _NETWORK,
                                            "format": "my3dgen-snapshot", "frozen_weights_only": True}}
        write_converted_base(base_file, ConvertedBase(state, config))
    config = AdapterConfig(converted.rank, converted.alpha, "my3dgen", DEFAULT_TARGETS)
    lora_n = sum(t.numel() for t in converted.factors.values())
    extra_n = sum(t.numel() for t in converted.extras.values())
    meta = {"imported_from": {"file": path.name, "sha256": sha, "format": "my3dgen-snapshot", "network": _NETWORK},
            "parameters": lora_n + extra_n, "lora_parameters": lora_n, "extra_parameters": extra_n,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "version": __version__}
    with building_identity(name) as new:  # an old identity of this name stays whole until the swap
        tensors = {**converted.factors, **converted.extras}
        write_adapter(new.adapter, AdapterFile(tensors, config, base_name, base_sha, meta))
    return ImportResult(name, ip.root, base_name, base_file is not None, converted.rank, converted.alpha, lora_n,
                        extra_n, ip.adapter.stat().st_size, notes)

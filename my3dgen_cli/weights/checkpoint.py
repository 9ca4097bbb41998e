"""EG3D checkpoints: official `.pkl` files read without running them, and our converted format.

Official network pickle (NVlabs/eg3d `training_loop.py` writes it with plain `pickle.dump`)::

    {"G": <net>, "D": <net>, "G_ema": <net>, "augment_pipe": <net>, "training_set_kwargs": {...}}

A network saved again on its own (`pickle.dump(G_ema)`, or a dict holding only some of the keys) is
read too. The training loop registers `dataset_label_std` (the camera labels' std) on G before
copying it to G_ema, so every official snapshot carries it; the generator never reads it, so it is
dropped by name (`IGNORED_TENSORS`) and the converted JSON lists it under "dropped". Any other
tensor the generator does not have is still an error.

Each `<net>` is a `torch_utils.persistence` record: class name, the Python source of its module (which
the official loader executes; we never do, see `safe_unpickle`) and the module `__dict__`. We walk
`_parameters`, `_buffers` and `_modules` of that `__dict__` to get the state dict under the official
dotted names, in `nn.Module.state_dict()` order.

Converted format (what the cache keeps, see docs/checkpoints.md)::

    <name>.safetensors   tensors under the official names; header metadata: format, format_version,
                         class_name, source_sha256, conversion_id
    <name>.json          {"init_kwargs", "rendering_kwargs", "neural_rendering_resolution",
                          "class_name", "source", "format", "fingerprint", "dropped"?}: the layout of
                         eg3d_parity/config.json, so `build_generator(config)` takes it as is;
                         "fingerprint" is the weights' hash for adapters (see fingerprint.py)

A base published as a plain `.safetensors` (official names, no config) is converted the same way
with the named config its zoo entry gives (`convert_safetensors`).

The two files are written atomically one after the other and carry the same `conversion_id`, so a
weights file is never paired with the config of another conversion.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from my3dgen_cli.errors import UnsafeCheckpointError, UserInputError, reason
from my3dgen_cli.fileio import write_atomic, write_text_atomic
from my3dgen_cli.weights.fingerprint import KEY as FINGERPRINT_KEY
from my3dgen_cli.weights.fingerprint import record as fingerprint_record
from my3dgen_cli.weights.fingerprint import state_fingerprint, weights_stamp
from my3dgen_cli.weights.instantiate import assign_state, skeleton
from my3dgen_cli.weights.safe_unpickle import EasyDictRecord, ForeignObject, PersistentObject, safe_load

FORMAT = "my3dgen-eg3d"
FORMAT_VERSION = 1

# Official module of each top-level network class, so class_name reads like eg3d_parity/config.json.
_CLASS_MODULES = {"TriPlaneGenerator": "training.triplane"}
# Positional parameters of TriPlaneGenerator.__init__ (triplane.py), for pickles made with positional args.
_TRIPLANE_ARGS = ("z_dim", "c_dim", "w_dim", "img_resolution", "img_channels")
_EXPECTED = "expected an EG3D network pickle (.pkl)"
_GENERATOR_CLASS = "TriPlaneGenerator"
# Tensors of an official snapshot that the generator never reads, dropped by name (and why).
IGNORED_TENSORS = {
    "dataset_label_std": "the camera labels' std over the training set, registered by training_loop.py",
}
_CONFIG_KEYS = ("init_kwargs", "rendering_kwargs", "neural_rendering_resolution", "class_name")


@dataclass(frozen=True)
class OfficialCheckpoint:
    """One network of an official EG3D pickle, as plain data.

    state_dict: official dotted names -> tensors (parameters and persistent buffers, module order,
        dtype as stored). init_kwargs / rendering_kwargs: plain dicts, lists and numbers.
    neural_rendering_resolution: the attribute of the pickled network (64 or 128 for released models).
    class_name: "training.triplane.TriPlaneGenerator" for an EG3D generator.
    """

    state_dict: dict[str, torch.Tensor]
    init_kwargs: dict[str, Any]
    rendering_kwargs: dict[str, Any]
    neural_rendering_resolution: int
    class_name: str
    dropped: tuple[str, ...] = ()  # names of IGNORED_TENSORS found in the file (not in state_dict)

    def config(self, source: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON-ready config (same layout as eg3d_parity/config.json)."""
        return {
            "init_kwargs": self.init_kwargs,
            "rendering_kwargs": self.rendering_kwargs,
            "neural_rendering_resolution": self.neural_rendering_resolution,
            "class_name": self.class_name,
            "source": dict(source or {}),
            "dropped": list(self.dropped),
        }


# --- official pickle ---------------------------------------------------------------------------


def read_official_pkl(path: str | Path, network: str = "G_ema") -> OfficialCheckpoint:
    """Read `network` ("G_ema", "G") from an official EG3D `.pkl` without executing anything in it.

    The file is a training snapshot (a dict with G, D, G_ema, ...), a dict holding only some of
    those, or one generator pickled on its own (then that generator is read, whatever `network`).
    Tensors in `IGNORED_TENSORS` are left out of the state dict and named in `dropped`.

    Raises:
        UserInputError: no such file, not a pickle, truncated, no `network` in it, or a network that
            is not an EG3D generator (a discriminator, another class).
        UnsafeCheckpointError: the pickle names a global outside the allow-list (`safe_unpickle`).
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such file, {_EXPECTED}")
    with path.open("rb") as f:
        head = f.read(4)
        if head.startswith(b"PK\x03\x04"):
            raise UserInputError(f"{path}: is a zip archive (torch.save?), {_EXPECTED}")
        if not head:
            raise UserInputError(f"{path}: is empty, {_EXPECTED}")
        f.seek(0)
        try:
            data = safe_load(f)
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(f"{path}: {err}") from None
        except UserInputError as err:
            raise UserInputError(f"{path}: {err}") from None
    if isinstance(data, PersistentObject):  # one network saved on its own
        net, where = data, "the pickled network"
    elif isinstance(data, dict):
        if network not in data:
            keys = ", ".join(sorted(map(str, data))) or "none"
            raise UserInputError(f"{path}: has no '{network}' network (keys: {keys}), {_EXPECTED}")
        net, where = data[network], f"'{network}'"
    else:
        kind = type(data).__name__
        raise UserInputError(f"{path}: got a pickled {kind}, expected a dict with G, D and G_ema")
    if not isinstance(net, PersistentObject):
        kind = type(net).__name__
        raise UserInputError(f"{path}: {where} is a {kind}, expected a persistent network record")
    if net.class_name != _GENERATOR_CLASS:
        raise UserInputError(
            f"{path}: {where} is a {net.class_name}, expected an EG3D generator ({_GENERATOR_CLASS})"
        )
    try:
        return checkpoint_from_record(net)
    except UserInputError as err:
        raise UserInputError(f"{path}: {where}: {err}") from None


def checkpoint_from_record(net: PersistentObject) -> OfficialCheckpoint:
    state = net.state
    init_kwargs = _plain(state.get("_init_kwargs", {}), "init_kwargs")
    if not isinstance(init_kwargs, dict):
        raise UserInputError(f"init_kwargs is a {type(init_kwargs).__name__}, expected a dict")
    init_args = _plain(state.get("_init_args", ()), "init_args")
    if init_args:
        if len(init_args) > len(_TRIPLANE_ARGS):
            raise UserInputError(
                f"{net.class_name} was built with {len(init_args)} positional arguments; "
                "expected keyword arguments only"
            )
        init_kwargs = {**dict(zip(_TRIPLANE_ARGS, init_args, strict=False)), **init_kwargs}
    rendering_kwargs = _plain(
        state.get("rendering_kwargs", init_kwargs.get("rendering_kwargs", {})), "rendering_kwargs"
    )
    if not isinstance(rendering_kwargs, dict):
        raise UserInputError(f"rendering_kwargs is a {type(rendering_kwargs).__name__}, expected a dict")
    nrr = _plain(state.get("neural_rendering_resolution"), "neural_rendering_resolution")
    if isinstance(nrr, bool) or not isinstance(nrr, int) or nrr <= 0:
        raise UserInputError(f"neural_rendering_resolution is {nrr!r}, expected a positive int")
    module = _CLASS_MODULES.get(net.class_name)
    class_name = f"{module}.{net.class_name}" if module else net.class_name
    state_dict = _flatten(net)
    dropped = tuple(name for name in IGNORED_TENSORS if state_dict.pop(name, None) is not None)
    return OfficialCheckpoint(state_dict, init_kwargs, rendering_kwargs, nrr, class_name, dropped)


def _module_state(obj: Any, where: str) -> dict[str, Any]:
    if isinstance(obj, (PersistentObject, ForeignObject)) and isinstance(obj.state, dict):
        return obj.state
    raise UserInputError(f"module '{where or '<root>'}' is a {type(obj).__name__}, expected a network module")


def _flatten(root: Any) -> dict[str, torch.Tensor]:
    """State dict of a module record, in `nn.Module.state_dict()` order: own parameters, own
    persistent buffers, then each child, depth first."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("", root)]
    while stack:
        prefix, obj = stack.pop()
        if id(obj) in seen:
            raise UserInputError(f"module '{prefix.rstrip('.')}' appears twice in the module tree")
        seen.add(id(obj))
        state = _module_state(obj, prefix.rstrip("."))
        skip = state.get("_non_persistent_buffers_set") or set()
        if not isinstance(skip, (set, frozenset, list, tuple)):
            raise UserInputError(f"module '{prefix.rstrip('.') or '<root>'}' has a malformed buffer set")
        buffers = [(n, v) for n, v in _items(state, "_buffers", prefix) if n not in skip]
        for name, value in [*_items(state, "_parameters", prefix), *buffers]:
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise UserInputError(f"{prefix}{name} is a {type(value).__name__}, expected a tensor")
            # detach(): a fresh tensor object, so nothing set on the unpickled one comes along.
            out[prefix + name] = value.detach()
        children = [
            (f"{prefix}{name}.", child)
            for name, child in _items(state, "_modules", prefix)
            if child is not None
        ]
        stack.extend(reversed(children))
    return out


def _items(state: dict[str, Any], key: str, prefix: str) -> list[tuple[str, Any]]:
    table = state.get(key, {})
    if not isinstance(table, dict) or not all(isinstance(k, str) for k in table):
        raise UserInputError(f"module '{prefix.rstrip('.') or '<root>'}' has a malformed {key}")
    return list(table.items())


_MAX_CONFIG_DEPTH = 32


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    """EasyDicts, numpy scalars and tuples -> dicts, Python numbers and lists (JSON-ready)."""
    if depth > _MAX_CONFIG_DEPTH:  # a config is a few levels deep; a 5000-deep list is a hostile file
        raise UserInputError(f"{where.split('.')[0].split('[')[0]} nests more than {_MAX_CONFIG_DEPTH} levels, "
                             "expected plain config values")
    if isinstance(value, (EasyDictRecord, dict)):
        return {str(k): _plain(v, f"{where}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise UserInputError(f"{where} holds a {type(value).__name__}, expected plain values")


# --- shapes ------------------------------------------------------------------------------------


def expected_shapes(config: str | dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Official names -> shapes of the generator `build_generator(config)` builds (without its
    random init: no cost)."""
    return {name: tuple(t.shape) for name, t in _generator_of(config).state_dict().items()}


def _generator_of(config: str | dict[str, Any]) -> torch.nn.Module:
    """`skeleton(config)`; a config this generator cannot build is the file's fault (UserInputError)."""
    try:
        return skeleton(config)
    except (ValueError, KeyError, TypeError) as err:
        raise UserInputError(f"its config cannot be built: {type(err).__name__}: {err}") from None


def check_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Raise `UserInputError` naming the first missing key, shape mismatch or unexpected key.

    Keys are compared in the order of `expected` (the generator's module order), then the leftovers.
    """
    problems: list[str] = []
    for name, shape in expected.items():
        if name not in state_dict:
            problems.append(f"missing {name} (expected shape {_shape(shape)})")
        elif tuple(state_dict[name].shape) != tuple(shape):
            problems.append(f"{name}: got shape {_shape(state_dict[name].shape)}, expected {_shape(shape)}")
    problems += [
        f"unexpected {name} (shape {_shape(t.shape)})"
        for name, t in state_dict.items()
        if name not in expected
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserInputError(f"weights do not fit the generator: {problems[0]}{more}")


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


# --- configs ------------------------------------------------------------------------------------

# rendering_kwargs that only the official loss reads (pose-conditioning swap, density regularisation):
# two files that differ only there hold the same generator. Everything else is compared.
_TRAINING_ONLY = frozenset({"gpc_reg_prob", "density_reg", "density_reg_p_dist", "reg_type"})
_ABSENT = object()


class ConfigMismatchError(UserInputError):
    """A file holds a generator of another config than the one it is imported as."""


def config_differences(found: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """`key: file value vs expected value` for every generator setting of `expected` that `found`
    sets otherwise (init kwargs, rendering kwargs, neural rendering resolution).

    Keys only `found` has are not compared (the generator reads only what `expected` names), nor
    are `_TRAINING_ONLY` rendering kwargs.
    """
    diffs: list[str] = []
    for section in ("init_kwargs", "rendering_kwargs"):
        got = found.get(section) or {}
        want = {k: v for k, v in (expected.get(section) or {}).items() if k != "rendering_kwargs"}
        _diff_dicts(got, want, section, diffs)
    got_nrr, want_nrr = found.get("neural_rendering_resolution"), expected.get("neural_rendering_resolution")
    if not _same(got_nrr, want_nrr):
        diffs.append(f"neural_rendering_resolution: {got_nrr!r} vs {want_nrr!r}")
    return diffs


def _diff_dicts(got: Any, want: dict[str, Any], where: str, diffs: list[str]) -> None:
    for key, value in want.items():
        if key in _TRAINING_ONLY:
            continue
        other = got.get(key, _ABSENT) if isinstance(got, dict) else _ABSENT
        if isinstance(value, dict) and isinstance(other, dict):
            _diff_dicts(other, value, f"{where}.{key}", diffs)
        elif not _same(other, value):
            shown = "missing" if other is _ABSENT else repr(other)
            diffs.append(f"{where}.{key}: {shown} vs {value!r}")


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: 1 == 1.0, [0, 0, 0.2] == (0, 0, 0.2); a bool is never a number."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b if type(a) is type(b) or {type(a), type(b)} <= {int, float} else False


def config_names(config: dict[str, Any]) -> list[str]:
    """The named configs (`configs.NAMED_CONFIGS`) that `config` matches: how to call a file's config."""
    from my3dgen_cli.eg3d.configs import NAMED_CONFIGS

    return [name for name, make in NAMED_CONFIGS.items() if not config_differences(config, make())]


def check_config(config: dict[str, Any], expected: str, src: str | Path) -> None:
    """Raise `ConfigMismatchError` (one line, both configs named, the differing keys) unless the
    config found in `src` is the named config `expected`."""
    from my3dgen_cli.eg3d.configs import resolve_config

    try:
        want = resolve_config(expected).to_dict()
    except ValueError as err:
        raise UserInputError(f"{src}: {err}") from None
    diffs = config_differences(config, want)
    if diffs:
        names = config_names(config)
        found = " / ".join(names) if names else "an unnamed config"
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise ConfigMismatchError(
            f"{src}: holds a generator of {found}, not {expected}: "
            f"{'; '.join(diffs[:3])}{more} (file vs {expected})"
        )


# --- converted format --------------------------------------------------------------------------


def save_converted(
    state_dict: dict[str, torch.Tensor],
    config: dict[str, Any],
    dst: str | Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `dst` (.safetensors) and `dst.with_suffix(".json")`, each atomically; return `dst`.

    config: {"init_kwargs", "rendering_kwargs", "neural_rendering_resolution", "class_name"} and
        optionally "source" (e.g. {"file", "sha256", "network"}) and "dropped" (names of tensors of the
        source file left out, `IGNORED_TENSORS`). dtype: None keeps each tensor's dtype.
    """
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise UserInputError(f"{dst}: got suffix '{dst.suffix}', expected '.safetensors'")
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise UserInputError(f"config has no {missing[0]}; expected keys {', '.join(_CONFIG_KEYS)}")
    source = dict(config.get("source") or {})
    conversion_id = uuid.uuid4().hex
    doc = {key: config[key] for key in _CONFIG_KEYS}
    doc["source"] = source
    if config.get("dropped"):
        doc["dropped"] = list(config["dropped"])
    doc["format"] = {"name": FORMAT, "version": FORMAT_VERSION, "weights": dst.name}
    doc["format"]["conversion_id"] = conversion_id
    doc = _plain(doc, "config")
    try:
        json.dumps(doc, allow_nan=False)  # refuse before anything is written
    except ValueError as err:
        raise UserInputError(f"config is not JSON-ready: {err}") from None
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "class_name": str(config["class_name"]),
        "source_sha256": str(source.get("sha256", "")),
        "conversion_id": conversion_id,
    }
    tensors = _contiguous_unshared(state_dict, dtype)
    fingerprint = state_fingerprint(tensors)  # what base_fingerprint gives once loaded (fp32)
    write_atomic(dst, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    stamp = weights_stamp(dst)
    if stamp is not None:
        doc[FINGERPRINT_KEY] = fingerprint_record(fingerprint, stamp)
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


def load_converted(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a converted checkpoint (`.safetensors` or its `.json`); tensors come from a memory map.

    Returns (state_dict, config) with config as saved by `save_converted`.
    """
    path = Path(path)
    weights = path.with_suffix(".safetensors")
    config_path = path.with_suffix(".json")
    for p in (weights, config_path):
        if not p.is_file():
            raise UserInputError(f"{p}: no such file; a converted checkpoint is a .safetensors plus a .json")
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError for any malformed file
        raise UserInputError(f"{weights}: not a readable safetensors file ({type(err).__name__})") from None
    if metadata.get("format") != FORMAT:
        got = metadata.get("format")
        raise UserInputError(f"{weights}: got format {got!r}, expected {FORMAT!r} (convert it first)")
    version = metadata.get("format_version", "0")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise UserInputError(
            f"{weights}: format version {version!r} is newer than this "
            f"my3dgen reads ({FORMAT_VERSION}); upgrade my3dgen"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise UserInputError(f"{config_path}: not valid JSON ({reason(err)})") from None
    if not isinstance(config, dict) or any(k not in config for k in _CONFIG_KEYS):
        raise UserInputError(f"{config_path}: expected keys {', '.join(_CONFIG_KEYS)}")
    saved_id = (config.get("format") or {}).get("conversion_id")
    if saved_id != metadata.get("conversion_id"):
        other = weights.name
        raise UserInputError(f"{config_path}: belongs to another conversion than {other}; convert again")
    from my3dgen_cli.eg3d.configs import resolve_config

    try:  # bounds and types, before a generator of that size is built
        resolve_config(config)
    except (ValueError, TypeError, KeyError) as err:
        raise UserInputError(f"{config_path}: not a usable generator config ({err})") from None
    for name, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserInputError(f"{weights}: {name} holds NaN or Inf values; convert the base again")
    return state_dict, config


def load_generator(path: str | Path, device: torch.device | str | None = None) -> torch.nn.Module:
    """A generator in eval mode with the weights of `path` loaded strictly.

    path: a converted `.safetensors` (its `.json` beside it) or an official `.pkl` (read with the
    safe reader, `G_ema`; nothing is written). Weights are cast to the generator's dtype (fp16
    storage loads into fp32 parameters). device: where to move the generator (None: CPU).
    The generator is built without random initialisation and takes the file's tensors as its own
    (`instantiate.py`); fp32 weights of a converted file stay memory-mapped (read on first use).
    """
    path = Path(path)
    if path.suffix == ".pkl":
        ckpt = read_official_pkl(path)
        state_dict, config = ckpt.state_dict, ckpt.config(source={"file": path.name, "network": "G_ema"})
    else:
        state_dict, config = load_converted(path)
    try:
        generator = _generator_of(config)
        check_state_dict(state_dict, {name: tuple(t.shape) for name, t in generator.state_dict().items()})
    except UserInputError as err:
        raise UserInputError(f"{path}: {err}") from None
    generator = assign_state(generator, state_dict)
    if device is not None:
        generator = generator.to(device)
    return generator.eval()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert_pkl(
    src: str | Path, dst: str | Path, *, config: str | None = None, source_name: str | None = None
) -> Path:
    """Official `.pkl` -> converted `dst` (.safetensors + .json), after checking every name and shape
    against `build_generator(config)`. Tensors keep their dtype (fp32 for released models).

    config: the named config the file must hold (a zoo entry's `config`); another one raises
    `ConfigMismatchError` before anything is written. None: take the file's own config as it is.
    source_name: the file name to record in the JSON (default: `src`'s; the zoo passes the
    artifact's usual name, since it converts a download under a temporary name).
    """
    src, dst = Path(src), Path(dst)
    ckpt = read_official_pkl(src)
    found = ckpt.config(source={"file": source_name or src.name, "sha256": sha256_file(src), "network": "G_ema"})
    if config is not None:
        check_config(found, config, src)
    return _save_checked(ckpt.state_dict, found, src, dst)


def convert_safetensors(src: str | Path, dst: str | Path, config: str) -> Path:
    """A plain `.safetensors` of official-named tensors (a base published without a pickle) ->
    converted `dst`, with the named EG3D `config` (the zoo entry's `config` field: a safetensors
    file carries no init or rendering kwargs). Header metadata of `src` is ignored; dtypes kept."""
    from my3dgen_cli.eg3d.configs import resolve_config

    src, dst = Path(src), Path(dst)
    try:
        doc = resolve_config(config).to_dict()
    except ValueError as err:
        raise UserInputError(f"{src}: {err}") from None
    try:
        with safe_open(str(src), framework="pt", device="cpu") as f:
            state_dict = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError for any malformed file
        raise UserInputError(f"{src}: not a readable safetensors file ({type(err).__name__})") from None
    doc["source"] = {"file": src.name, "sha256": sha256_file(src), "format": "safetensors", "config": config}
    return _save_checked(state_dict, doc, src, dst)


def _save_checked(state_dict: dict[str, torch.Tensor], config: dict[str, Any], src: Path, dst: Path) -> Path:
    """save_converted after every name and shape fits `config` and every float is finite."""
    try:
        check_state_dict(state_dict, expected_shapes(config))
    except UserInputError as err:
        raise UserInputError(f"{src}: {err}") from None
    for name, t in state_dict.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UserInputError(f"{src}: {name} holds NaN or infinity; the file is damaged")
    return save_converted(state_dict, config, dst)

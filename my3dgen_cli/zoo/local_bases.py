"""Local bases: EG3D generators the user has that are not registry artifacts (a training snapshot, a
fine-tuned or reduced-width generator, the demo's rebuilt base), kept as
`<cache>/bases/NAME.safetensors` + `.json` and opened by `--base NAME`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from my3dgen_cli.errors import ArtifactError, My3DGenError, UserInputError
from my3dgen_cli.zoo import store
from my3dgen_cli.zoo.registry import NAME_RE, load_registry


def bases_dir() -> Path:
    """`generators.local_bases_dir()`, without importing torch (listing the cache stays quick)."""
    return store.root() / "bases"


def is_local_base(name: str) -> bool:
    """True when `name` is a local base (`bases/NAME.safetensors`)."""
    return "/" not in name and "\\" not in name and not name.startswith(".") and (
        bases_dir() / f"{name}.safetensors").is_file()


def import_local_base(name: str, src: str | os.PathLike[str], *, registry: Sequence[str] = ()) -> Path:
    """Convert an EG3D `.pkl` the user has (a training snapshot, a fine-tuned or reduced-width
    generator) into the local base `name`: `<cache>/bases/<name>.safetensors` + `.json`, with the
    file's own config. `--base name` then opens it (generators.resolve_base_path).

    A registry name is refused (a local base would shadow it), and so is an existing local base
    (identities made on it would stop matching). Nothing is written unless the file converts.
    """
    from my3dgen_cli.weights.checkpoint import convert_pkl

    src, dst = Path(src).expanduser(), check_local_base(name, src, registry=registry)
    with store.locked(f"base-{name}"):
        if dst.exists() or dst.with_suffix(".json").exists():
            raise _exists(name, dst)
        return convert_pkl(src, dst)


def check_local_base(name: str, src: str | os.PathLike[str], *, registry: Sequence[str] = ()) -> Path:
    """The path `import_local_base(name, src)` would write, after its checks (UserInputError): called before
    any progress line, so a refusal is its one line alone."""
    from my3dgen_cli.generators import local_bases_dir

    src = Path(src).expanduser()
    if not NAME_RE.match(name):
        raise UserInputError(f"local base name: got {name!r}, expected lowercase letters, digits, '.', '_', '-'")
    if name in load_registry(registry):
        raise UserInputError(
            f"{name} is a registry artifact; import the file as it (`my3dgen fetch {name} --from {src}`, "
            "checked against its config) or give the local base another name"
        )
    if src.suffix != ".pkl" or not src.is_file():
        raise UserInputError(f"--from: got {str(src)!r}, expected an existing EG3D network pickle (.pkl)")
    dst = local_bases_dir() / f"{name}.safetensors"
    if dst.exists() or dst.with_suffix(".json").exists():  # checked before the lock too: a refusal writes nothing
        raise _exists(name, dst)
    return dst


def _exists(name: str, dst: Path) -> UserInputError:
    return UserInputError(
        f"a local base {name} exists already ({dst}); delete it and its .json to replace it, or pick another name"
    )


def remove_local_base(name: str) -> dict[str, Any]:
    """Delete the local base `name` (`bases/NAME.safetensors` and its `.json`); identities made on it stop opening."""
    if not is_local_base(name):
        raise ArtifactError(f"{name} is not a local base (`my3dgen cache ls` shows what is)")
    weights = bases_dir() / f"{name}.safetensors"
    removed = []
    with store.locked(f"base-{name}"):
        for path in (weights, weights.with_suffix(".json")):
            if path.is_file():
                path.unlink()
                removed.append(str(path))
    return {"name": name, "removed": removed, "forgot_recorded_hash": False}


def verify_local_bases() -> list[dict[str, Any]]:
    """Reread every local base (`bases/NAME.safetensors` + `.json`): it must open as a converted base, and its
    weights must still have the fingerprint recorded when it was first opened (identities made on it record it)."""
    from my3dgen_cli.weights.converted import read_converted_base
    from my3dgen_cli.weights.fingerprint import KEY, state_fingerprint

    folder = bases_dir()
    results = []
    for weights in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        status, detail = "ok", "opens; no fingerprint recorded yet"
        try:
            base = read_converted_base(weights, full_check=True)
            state, config = base.state_dict, base.config
        except My3DGenError as err:
            results.append({"name": weights.stem, "status": "corrupt", "detail": str(err)})
            continue
        recorded = config.get(KEY)
        if isinstance(recorded, dict) and isinstance(recorded.get("sha256"), str):
            if state_fingerprint(state) == recorded["sha256"]:
                detail = "weights match their recorded fingerprint"
            else:
                status, detail = "corrupt", "weights no longer match their recorded fingerprint"
        results.append({"name": weights.stem, "status": status, "detail": detail})
    return results

"""One way to get a generator: base weights + optional identity adapter, on a device.

A base is named by
- a path to a converted `.safetensors` (with its `.json` beside it) or an official `.pkl`;
- a local base saved with `save_local_base` (e.g. the demo's `demo-tiny-v2`), kept in
  `<cache>/bases/<name>.safetensors`;
- a zoo name such as `eg3d-ffhq512-128` (fetched and converted on demand unless offline).
An identity's adapter records its base's name and weight fingerprint, so `--identity ana` alone is
enough, and a base with other weights is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from my3dgen_cli import paths
from my3dgen_cli.errors import UnknownArtifactError, UserInputError

if TYPE_CHECKING:
    from my3dgen_cli.adapter_file import AdapterFile

DEFAULT_BASE = "eg3d-ffhq512-128"


@dataclass
class BaseRef:
    name: str
    path: Path
    sha256: str  # weight fingerprint (lora.base_fingerprint)


def local_bases_dir() -> Path:
    return paths.cache_dir() / "bases"


def resolve_base_path(base: str, offline: bool | None = None) -> tuple[str, Path]:
    """(display name, converted or .pkl path) for a base given as path, local name or zoo name."""
    candidate = Path(base).expanduser()
    if candidate.suffix in (".safetensors", ".pkl"):
        if not candidate.is_file():
            raise UserInputError(f"base generator file not found: {candidate}")
        return candidate.stem, candidate
    local = local_bases_dir() / f"{base}.safetensors"
    if local.is_file():
        return base, local
    from my3dgen_cli import zoo

    return base, zoo.resolve_base(base, offline=offline)


def save_local_base(G: torch.nn.Module, name: str) -> Path:
    """Keep a generator's weights as a named local base (converted format)."""
    from my3dgen_cli.identity import check_name
    from my3dgen_cli.weights.converted import ConvertedBase, write_converted_base

    dst = local_bases_dir() / f"{check_name(name)}.safetensors"
    state = {k: v for k, v in G.state_dict().items() if ".adapter." not in k}
    write_converted_base(dst, ConvertedBase(state, G.config.to_dict()))
    return dst


def open_base(base: str, device: torch.device | str | None = None, offline: bool | None = None):
    """(generator in eval mode, BaseRef) for a base name or path.

    The fingerprint comes from the base's JSON when stored for this very weights file (no hashing);
    otherwise (an official .pkl, an older conversion, a file changed since) it is computed and, for
    a converted base, stored for next time.
    """
    from my3dgen_cli.eg3d import load_generator
    from my3dgen_cli.lora import base_fingerprint
    from my3dgen_cli.weights.fingerprint import store_fingerprint, stored_fingerprint, weights_stamp

    name, path = resolve_base_path(base, offline=offline)
    stamp = weights_stamp(path)  # before reading: a file replaced meanwhile never borrows a value
    G = load_generator(path, device=device)
    sha256 = stored_fingerprint(path, stamp)
    if sha256 is None:
        sha256 = base_fingerprint(G)
        if stamp is not None:  # no valid record for this file: load_generator checked every weight finite
            store_fingerprint(path, sha256, stamp, finite=True)
    return G, BaseRef(name=name, path=path, sha256=sha256)


def unknown_recorded_base(owner: str, base: str) -> UnknownArtifactError:
    """The error for an identity or adapter whose recorded base is not known here (`personalize --base FILE` records
    the file's stem): it says to pass the file, instead of only "unknown artifact"."""
    return UnknownArtifactError(f"{owner} was trained on base {base!r}, which is not a base known here; if it was a "
                                "file (personalize --base FILE), pass that file with --base")


def open_generator(
    base: str | None = None,
    identity: str | None = None,
    device: torch.device | str | None = None,
    offline: bool | None = None,
    adapter: str | Path | None = None,
) -> tuple[torch.nn.Module, BaseRef, AdapterFile | None]:
    """Generator with the identity's adapter attached (if any): (G, base, the adapter file read or None).

    adapter: an adapter file (e.g. from `invert --tune`) attached instead of the identity's; the base
    defaults to the one the adapter names.
    """
    from my3dgen_cli.adapter_file import load_adapter, read_adapter
    from my3dgen_cli.identity import require_identity

    adapter_path = Path(adapter) if adapter is not None else None
    if adapter_path is None and identity is not None:
        adapter_path = require_identity(identity).adapter
    recorded = adapter_path is not None and base is None
    if recorded:
        base = read_adapter(adapter_path).base_name
    try:
        G, ref = open_base(base or DEFAULT_BASE, device=device, offline=offline)
    except UnknownArtifactError:
        if not recorded:
            raise
        owner = f"identity {identity!r}" if identity is not None and adapter is None else f"adapter {adapter_path}"
        raise unknown_recorded_base(owner, str(base)) from None
    meta = None
    if adapter_path is not None:
        meta = load_adapter(G, adapter_path, base_sha256=ref.sha256)
        G.to(device) if device is not None else None
    for p in G.parameters():
        p.requires_grad_(False)
    return G.eval(), ref, meta

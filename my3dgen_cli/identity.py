"""Identity folders and latent files: what a user keeps after personalizing.

    identities/<name>/
        adapter.safetensors    LoRA tensors + metadata (base name and fingerprint, rank, alpha, targets,
                               training config, version)
        anchors.safetensors    ws [N, num_ws, w_dim] + cameras [N, 25] of the training photos
        previews/              photo vs reconstruction grid, crops
        log.json, loss.png     training log
        checkpoints/           resumable state (removed when training finishes): step-NNNNNN.pt
                               (training) and anchors.partial.safetensors (the anchors of the photo
                               chunks projected so far; removed when anchors.safetensors is written)

A `.latent` file (safetensors) holds ws [1, num_ws, w_dim] (w is stored broadcast to every row),
the camera label [1, 25] and metadata: identity, base, space ("w" or "w+"), version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli import __version__, paths
from my3dgen_cli.errors import UserInputError, reason, shown
from my3dgen_cli.fileio import atomic_path

LATENT_FORMAT = "my3dgen-latent/1"
ANCHORS_FORMAT = "my3dgen-anchors/1"
PARTIAL_ANCHORS_FORMAT = "my3dgen-partial-anchors/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    """Identity names become folder names: letters, digits, '.', '_' and '-' (max 64)."""
    if not _NAME.match(name):
        raise UserInputError(f"identity name: got {name!r}, expected letters, digits, '.', '_' or '-' (max 64)")
    return name


@dataclass(frozen=True)
class IdentityPaths:
    root: Path

    @property
    def adapter(self) -> Path:
        return self.root / "adapter.safetensors"

    @property
    def anchors(self) -> Path:
        return self.root / "anchors.safetensors"

    @property
    def previews(self) -> Path:
        return self.root / "previews"

    @property
    def log(self) -> Path:
        return self.root / "log.json"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def partial_anchors(self) -> Path:
        return self.checkpoints / "anchors.partial.safetensors"

    def resumable(self) -> bool:
        """True when an unfinished run left something `--resume` continues from: a training
        checkpoint, partial anchors, or finished anchors without an adapter yet."""
        return (any(self.checkpoints.glob("step-*.pt")) or self.partial_anchors.is_file()
                or (self.anchors.is_file() and not self.adapter.is_file()))


def identity_paths(name: str) -> IdentityPaths:
    return IdentityPaths(paths.identities_dir() / check_name(name))


def require_identity(name: str) -> IdentityPaths:
    """Paths of an existing identity (one with an adapter), else a clear error listing the known ones."""
    ip = identity_paths(name)
    if not ip.adapter.is_file():
        known = ", ".join(list_identities()) or "none yet"
        raise UserInputError(f"no identity named {name!r} (known: {known}); make one with `my3dgen personalize`")
    return ip


def list_identities() -> list[str]:
    root = paths.identities_dir()
    if not root.is_dir():
        return []
    # Dot-folders are identities being built or retired by `building_identity`, not identities.
    return sorted(p.name for p in root.iterdir()
                  if not p.name.startswith(".") and (p / "adapter.safetensors").is_file())


def build_paths(name: str) -> IdentityPaths:
    """The fixed hidden folder where `personalize` builds identity `name` (kept between runs for --resume)."""
    return IdentityPaths(identity_paths(name).root.with_name(f".{check_name(name)}.build"))


def _swap_in(building: Path, final: Path, tag: str) -> None:
    """Put the folder `building` at `final`. An old `final` is renamed `.NAME.old-*` first and, once the new
    one is in place, renamed `.NAME.trash-*` and deleted: an `.old-*` folder is always a whole identity."""
    retired = final.with_name(f".{final.name}.old-{tag}")
    if final.exists():
        os.replace(final, retired)
    os.replace(building, final)
    if retired.exists():
        trash = final.with_name(f".{final.name}.trash-{tag}")
        os.replace(retired, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _restore_retired(final: Path) -> None:
    """A kill between the two renames of `_swap_in` leaves no `final` and the old identity whole as
    `.NAME.old-*`: put it back before building again."""
    if final.exists():
        return
    retired = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if retired:
        os.replace(retired[-1], final)


@contextmanager
def building_identity(name: str, *, resumable: bool = False, swap: bool = True) -> Iterator[IdentityPaths]:
    """Build an identity in a hidden folder beside `identities/<name>` and swap it in only when complete.

    A failure or Ctrl-C inside the block leaves the old identity (if any) exactly as it was; after
    the block, readers see either the old folder or the new one. Without `resumable` the half-built
    folder is a fresh `.NAME.new-*` and is removed on failure (import). With `resumable` it is
    `build_paths(name)`, reused if it exists and kept on failure, so a later run can continue it
    (personalize --resume). swap=False: only yield the folder (the ranks of a torchrun group other
    than rank 0, which never write).
    """
    final = identity_paths(check_name(name)).root
    final.parent.mkdir(parents=True, exist_ok=True)
    if swap:
        _restore_retired(final)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    building = build_paths(name).root if resumable else final.with_name(f".{name}.new-{tag}")
    building.mkdir(exist_ok=resumable)
    try:
        yield IdentityPaths(building)
        if swap:
            _swap_in(building, final, tag)
    finally:
        if not resumable:
            shutil.rmtree(building, ignore_errors=True)


def save_anchors(path: Path, ws: torch.Tensor, cameras: torch.Tensor, photos: list[str],
                 extra: dict[str, Any] | None = None) -> Path:
    """ws [N, num_ws, w_dim], cameras [N, 25], one photo name per row."""
    from safetensors.torch import save_file

    if ws.shape[0] != cameras.shape[0] or ws.shape[0] != len(photos):
        raise ValueError(f"anchors: got {ws.shape[0]} latents, {cameras.shape[0]} cameras, {len(photos)} photos")
    meta = {"format": ANCHORS_FORMAT, "photos": json.dumps(photos), "extra": json.dumps(extra or {}),
            "my3dgen_version": __version__}
    with atomic_path(path) as tmp:
        tensors = {"ws": ws.detach().cpu().float().contiguous(), "cameras": cameras.detach().cpu().float().contiguous()}
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_anchors(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """ws [N, num_ws, w_dim], cameras [N, 25] and photo names, checked (format, dtypes, shapes, finite)."""
    if not path.is_file():
        raise UserInputError(f"anchors not found: {path}")
    tensors, meta = _read_artifact(path, "anchors", ANCHORS_FORMAT, ("ws", "cameras"))
    ws, cameras = tensors["ws"], tensors["cameras"]
    photos = _json_meta(path, meta, "photos", "[]", list)
    if ws.ndim != 3 or ws.shape[0] < 1 or cameras.shape != (ws.shape[0], 25) or len(photos) != ws.shape[0]:
        raise UserInputError(f"{path}: got ws {list(ws.shape)}, cameras {list(cameras.shape)} and {len(photos)} "
                             "photos, expected [N, num_ws, w_dim], [N, 25] and N photo names")
    return ws, cameras, [str(p) for p in photos]


def _read_artifact(path: Path, kind: str, fmt: str, names: tuple[str, ...]) -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, str]]:
    """The named float tensors and metadata of a my3dgen safetensors file with format tag `fmt`.

    One-line UserInputError naming the file: unreadable, another format, a missing tensor, a non-float
    dtype, NaN/Inf values.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != fmt:
                raise UserInputError(f"{path}: got format {shown(meta.get('format'))}, expected {fmt!r}")
            missing = [n for n in names if n not in f.keys()]
            if missing:
                raise UserInputError(f"{path}: has no {missing[0]!r} tensor, expected a {kind} file")
            tensors = {n: f.get_tensor(n) for n in names}
    except UserInputError:
        raise
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as err:
        raise UserInputError(f"{path}: not a readable {kind} file ({reason(err)})") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise UserInputError(f"{path}: {name} has dtype {t.dtype}, expected floating point")
        if not bool(torch.isfinite(t).all()):
            raise UserInputError(f"{path}: {name} holds NaN or Inf values")
    return {n: t.float() for n, t in tensors.items()}, meta


def _json_meta(path: Path, meta: dict[str, str], key: str, default: str, kind: type) -> Any:
    try:
        value = json.loads(meta.get(key, default))
    except (ValueError, RecursionError):
        raise UserInputError(f"{path}: {key} metadata is not valid JSON") from None
    if not isinstance(value, kind):
        raise UserInputError(f"{path}: {key} metadata is a {type(value).__name__}, expected a {kind.__name__}")
    return value


def identity_anchors(identity: str | None, device: Any) -> tuple[Any, Any] | tuple[None, None]:
    """(ws [K, num_ws, w_dim], cameras [K, 25]) of an identity, or (None, None) without one / without anchors."""
    if identity is None:
        return None, None
    path = identity_paths(identity).anchors
    if not path.is_file():
        return None, None
    ws, cams, _ = load_anchors(path)
    return ws.to(device), cams.to(device)


def save_partial_anchors(path: Path, ws: torch.Tensor, fingerprint: dict[str, Any]) -> Path:
    """ws [M, num_ws, w_dim] of the first M photos, and the settings that made them (JSON metadata)."""
    from safetensors.torch import save_file

    meta = {"format": PARTIAL_ANCHORS_FORMAT, "fingerprint": json.dumps(fingerprint), "my3dgen_version": __version__}
    with atomic_path(path) as tmp:
        save_file({"ws": ws.detach().cpu().float().contiguous()}, str(tmp), metadata=meta)
    return path


def load_partial_anchors(path: Path) -> tuple[torch.Tensor, dict[str, Any]] | None:
    """(ws, fingerprint) from save_partial_anchors; None when there is no such file."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != PARTIAL_ANCHORS_FORMAT:
                raise UserInputError(f"{path}: got format {meta.get('format')!r}, expected {PARTIAL_ANCHORS_FORMAT!r}")
            return f.get_tensor("ws"), json.loads(meta.get("fingerprint", "{}"))
    except UserInputError:
        raise
    except (SafetensorError, OSError, ValueError) as err:  # ValueError: bad JSON metadata
        raise UserInputError(f"{path}: not readable partial anchors ({err}); run without --resume to start over"
                             ) from None


@dataclass
class Latent:
    ws: torch.Tensor  # [1, num_ws, w_dim]
    camera: torch.Tensor  # [1, 25]
    identity: str | None
    base: str
    space: str
    extra: dict[str, Any]


def save_latent(path: str | Path, ws: torch.Tensor, camera: torch.Tensor, base: str, identity: str | None = None,
                space: str = "w+", extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    if space not in ("w", "w+"):
        raise ValueError(f"latent space: got {space!r}, expected 'w' or 'w+'")
    if ws.ndim != 3 or ws.shape[0] != 1 or camera.shape != (1, 25):
        raise ValueError(f"latent: got ws {tuple(ws.shape)} and camera {tuple(camera.shape)}, "
                         "expected (1, num_ws, w_dim) and (1, 25)")
    meta = {"format": LATENT_FORMAT, "identity": identity or "", "base": base, "space": space,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "my3dgen_version": __version__, "extra": json.dumps(extra or {})}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({"ws": ws.detach().cpu().float().contiguous(), "camera": camera.detach().cpu().float().contiguous()},
                  str(tmp), metadata=meta)
    return path


def load_latent(path: str | Path) -> Latent:
    """A `.latent` file, checked: format, ws [1, num_ws, w_dim] and camera [1, 25] float and finite, space."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"latent file not found: {path}")
    tensors, meta = _read_artifact(path, ".latent", LATENT_FORMAT, ("ws", "camera"))
    ws, camera = tensors["ws"], tensors["camera"]
    if ws.ndim != 3 or ws.shape[0] != 1 or 0 in ws.shape or tuple(camera.shape) != (1, 25):
        raise UserInputError(f"{path}: got ws {list(ws.shape)} and camera {list(camera.shape)}, "
                             "expected [1, num_ws, w_dim] and [1, 25] (one latent per file)")
    space = meta.get("space", "w+")
    if space not in ("w", "w+"):
        raise UserInputError(f"{path}: got space {shown(space)}, expected 'w' or 'w+'")
    extra = _json_meta(path, meta, "extra", "{}", dict)
    return Latent(ws, camera, meta.get("identity") or None, meta.get("base", ""), space, extra)

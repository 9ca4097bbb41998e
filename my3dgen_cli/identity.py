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

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli import paths
from my3dgen_cli.errors import UserInputError, shown
from my3dgen_cli.tagged_files import json_meta, read_tagged, write_tagged

LATENT_FORMAT = "my3dgen-latent/1"
ANCHORS_FORMAT = "my3dgen-anchors/1"
PARTIAL_ANCHORS_FORMAT = "my3dgen-partial-anchors/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_name(name: str) -> str:
    """Identity names become folder names: letters, digits, '.', '_' and '-' (max 64)."""
    if not _NAME.match(name):
        raise UserInputError(f"identity name: got {shown(name)}, expected a letter or digit, then letters, digits, "
                             "'.', '_' or '-' (64 at most)")
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
        if ip.root.is_dir():  # a folder of that name, without a readable adapter file: say so, as `identities` does
            raise UserInputError(f"identity {name!r} is broken: {ip.adapter} is not a file (`my3dgen identities` "
                                 "says why and what to do)")
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


@contextmanager
def identity_lock(name: str) -> Iterator[None]:
    """Hold `identities/.NAME.lock` while one process builds identity `name`; a second builder is refused.

    Two `personalize` runs of one name once shared the build folder: the second emptied it while the first was
    writing, and the result was whichever swapped in last, or an identity without its anchors (`fileio.held_lock`).
    """
    from my3dgen_cli.fileio import held_lock

    path = identity_paths(check_name(name)).root.with_name(f".{name}.lock")
    with held_lock(path, f"identity {name!r} is being built"):
        yield


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
    `build_paths(name)`, reused if it exists and kept on failure when it holds a file, so a later run can
    continue it (personalize --resume); a failure before anything was saved leaves no folder. swap=False:
    only yield the folder (the ranks of a torchrun group other than rank 0, which never write).
    """
    final = identity_paths(check_name(name)).root
    final.parent.mkdir(parents=True, exist_ok=True)
    # personalize (resumable) holds identity_lock from before it prepares its build folder; an import takes it here
    with contextlib.nullcontext() if resumable or not swap else identity_lock(name):
        if swap:
            _restore_retired(final)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        building = build_paths(name).root if resumable else final.with_name(f".{name}.new-{tag}")
        building.mkdir(exist_ok=resumable)
        try:
            yield IdentityPaths(building)
            if swap:
                _swap_in(building, final, tag)
        except BaseException:
            if resumable and swap and not any(f.is_file() for f in building.rglob("*")):
                shutil.rmtree(building, ignore_errors=True)  # nothing to resume: no phantom unfinished identity
            raise
        finally:
            if not resumable:
                shutil.rmtree(building, ignore_errors=True)


# --- anchors: ws + cameras of the training photos -----------------------------------------------


@dataclass
class Anchors:
    """What `anchors.safetensors` holds: ws [N, num_ws, w_dim], cameras [N, 25] float32, one photo name
    per row, and `extra` (JSON object: base, space)."""

    ws: torch.Tensor
    cameras: torch.Tensor
    photos: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def write_anchors(path: Path, anchors: Anchors) -> Path:
    """Write `anchors` atomically (format `ANCHORS_FORMAT`); rows, cameras and photos must agree."""
    ws, cameras, photos = anchors.ws, anchors.cameras, anchors.photos
    if ws.shape[0] != cameras.shape[0] or ws.shape[0] != len(photos):
        raise ValueError(f"anchors: got {ws.shape[0]} latents, {cameras.shape[0]} cameras, {len(photos)} photos")
    meta = {"format": ANCHORS_FORMAT, "photos": json.dumps(list(photos)), "extra": json.dumps(anchors.extra or {})}
    return write_tagged(path, {"ws": ws.float(), "cameras": cameras.float()}, meta)


def read_anchors(path: Path) -> Anchors:
    """An anchors file, checked: format, ws [N, num_ws, w_dim] and cameras [N, 25] float and finite, N photo
    names (strings), extra a JSON object."""
    tensors, meta = read_tagged(path, "anchors file", (ANCHORS_FORMAT,), ("ws", "cameras"))
    ws, cameras = tensors["ws"].float(), tensors["cameras"].float()
    photos = json_meta(path, meta, "photos", list, "[]")
    if ws.ndim != 3 or ws.shape[0] < 1 or cameras.shape != (ws.shape[0], 25) or len(photos) != ws.shape[0]:
        raise UserInputError(f"{path}: got ws {list(ws.shape)}, cameras {list(cameras.shape)} and {len(photos)} "
                             "photos, expected [N, num_ws, w_dim], [N, 25] and N photo names")
    if not all(isinstance(name, str) for name in photos):
        raise UserInputError(f"{path}: photos holds a non-string, expected a list of photo names")
    return Anchors(ws, cameras, photos, json_meta(path, meta, "extra", dict, "{}"))


def identity_anchors(identity: str | None, device: Any) -> tuple[Any, Any] | tuple[None, None]:
    """(ws [K, num_ws, w_dim], cameras [K, 25]) of an identity, or (None, None) without one / without anchors."""
    if identity is None:
        return None, None
    path = identity_paths(identity).anchors
    if not path.is_file():
        return None, None
    anchors = read_anchors(path)
    return anchors.ws.to(device), anchors.cameras.to(device)


# --- partial anchors: the photo chunks projected so far (checkpoints/) ---------------------------


@dataclass
class PartialAnchors:
    """What `checkpoints/anchors.partial.safetensors` holds: ws [M, num_ws, w_dim] of the first M photos,
    and the settings that made them (`fingerprint`, a JSON object: see personalize/anchor_chunks.py)."""

    ws: torch.Tensor
    fingerprint: dict[str, Any]


# Types of the fingerprint's entries (anchor_chunks.anchor_fingerprint); others are compared as they are.
_FINGERPRINT_TYPES: dict[str, type | tuple[type, ...]] = {
    "photos": list, "base": str, "base_sha256": str, "anchor_steps": int, "anchor_space": str,
    "anchor_lr": (int, float), "chunk": int, "anchor_lpips": bool,
}


def write_partial_anchors(path: Path, partial: PartialAnchors) -> Path:
    """Write `partial` atomically (format `PARTIAL_ANCHORS_FORMAT`)."""
    meta = {"format": PARTIAL_ANCHORS_FORMAT, "fingerprint": json.dumps(partial.fingerprint)}
    return write_tagged(path, {"ws": partial.ws.float()}, meta)


def read_partial_anchors(path: Path) -> PartialAnchors | None:
    """A partial-anchors file, checked as `read_anchors` checks anchors (format, ws [M, num_ws, w_dim] float
    and finite, the fingerprint a JSON object with entries of the right types); None when there is no
    such file (nothing to resume). Errors say how to start over."""
    if not path.is_file():
        return None
    try:
        tensors, meta = read_tagged(path, "partial anchors file", (PARTIAL_ANCHORS_FORMAT,), ("ws",))
        ws = tensors["ws"].float()
        if ws.ndim != 3 or 0 in ws.shape:
            raise UserInputError(f"{path}: got ws {list(ws.shape)}, expected [M, num_ws, w_dim]")
        fingerprint = json_meta(path, meta, "fingerprint", dict)
        for key, kind in _FINGERPRINT_TYPES.items():
            value = fingerprint.get(key)
            if key in fingerprint and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
                wanted = kind.__name__ if isinstance(kind, type) else "number"
                raise UserInputError(f"{path}: fingerprint {key} is {shown(value)}, expected {wanted}")
        if not all(isinstance(name, str) for name in fingerprint.get("photos", [])):
            raise UserInputError(f"{path}: fingerprint photos holds a non-string, expected photo names")
    except UserInputError as err:
        raise UserInputError(f"{err}; pass --force instead of --resume to start over") from None
    return PartialAnchors(ws, fingerprint)


# --- .latent: one latent and its camera ------------------------------------------------------------


@dataclass
class Latent:
    """What a `.latent` file holds (also what an `.npy` latent is read as, `latents.read_npy_latent`).

    ws [1, num_ws, w_dim] (a w latent broadcast to every row), camera [1, 25] (None only for an `.npy`
    without a camera beside it), base: the base's name, identity: the identity it was made with,
    space "w" or "w+", extra: JSON object.
    """

    ws: torch.Tensor
    camera: torch.Tensor
    base: str = ""
    identity: str | None = None
    space: str = "w+"
    extra: dict[str, Any] = field(default_factory=dict)


def write_latent(path: str | Path, latent: Latent) -> Path:
    """Write `latent` atomically (format `LATENT_FORMAT`, with the time it was made)."""
    ws, camera = latent.ws, latent.camera
    if latent.space not in ("w", "w+"):
        raise ValueError(f"latent space: got {latent.space!r}, expected 'w' or 'w+'")
    if ws.ndim != 3 or ws.shape[0] != 1 or camera is None or camera.shape != (1, 25):
        got = None if camera is None else tuple(camera.shape)
        raise ValueError(f"latent: got ws {tuple(ws.shape)} and camera {got}, expected (1, num_ws, w_dim) and (1, 25)")
    meta = {"format": LATENT_FORMAT, "identity": latent.identity or "", "base": latent.base, "space": latent.space,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "extra": json.dumps(latent.extra or {})}
    return write_tagged(path, {"ws": ws.float(), "camera": camera.float()}, meta)


def read_latent(path: str | Path) -> Latent:
    """A `.latent` file, checked: format, ws [1, num_ws, w_dim] and camera [1, 25] float and finite, space,
    extra a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"latent file not found: {path}")
    tensors, meta = read_tagged(path, ".latent file", (LATENT_FORMAT,), ("ws", "camera"))
    ws, camera = tensors["ws"].float(), tensors["camera"].float()
    if ws.ndim != 3 or ws.shape[0] != 1 or 0 in ws.shape or tuple(camera.shape) != (1, 25):
        raise UserInputError(f"{path}: got ws {list(ws.shape)} and camera {list(camera.shape)}, "
                             "expected [1, num_ws, w_dim] and [1, 25] (one latent per file)")
    space = meta.get("space", "w+")
    if space not in ("w", "w+"):
        raise UserInputError(f"{path}: got space {shown(space)}, expected 'w' or 'w+'")
    extra = json_meta(path, meta, "extra", dict, "{}")
    return Latent(ws, camera, meta.get("base", ""), meta.get("identity") or None, space, extra)

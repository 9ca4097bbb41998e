"""What a command names: latents (files, `anchor:K` of an identity, `seed:S`), photos to invert, the generator.

    G, ref, dev = open_model(base, identity, adapter, "auto")
    name, ws, camera = resolve_key("anchor:3", G, identity, dev, truncation=0.7)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from my3dgen_cli.errors import UserInputError


@dataclass(frozen=True)
class ModelChoice:
    """Which generator a command uses: a base, an identity's adapter or an adapter file, on a device.
    offline: never download (a base by name, the loss networks); None = `MY3DGEN_OFFLINE`."""

    identity: str | None = None
    base: str | None = None
    adapter: Path | None = None
    device: str = "auto"
    offline: bool | None = None

    def open(self) -> tuple[Any, Any, Any]:
        """(G, BaseRef, torch.device): see `open_model`."""
        return open_model(self.base, self.identity, self.adapter, self.device, self.offline)

    def or_base(self, base: str | None) -> ModelChoice:
        """This choice, or, when it names no base, identity or adapter, the base `base` (the one the
        latents were made on: a `.latent` records it) instead of the default."""
        if base and self.base is None and self.identity is None and self.adapter is None:
            return replace(self, base=base)
        return self


def open_model(base: str | None, identity: str | None, adapter: Path | None, device: str,
               offline: bool | None = None) -> tuple[Any, Any, Any]:
    """(G, BaseRef, torch.device) with the identity's adapter, or `adapter` when given (frozen, eval mode)."""
    from my3dgen_cli.devices import pick_device
    from my3dgen_cli.generators import open_generator

    dev = pick_device(device)
    G, ref, _ = open_generator(base=base, identity=identity, device=dev, adapter=adapter, offline=offline)
    return G, ref, dev


def check_images(images: Iterable[Path]) -> None:
    """Name a missing image, or a folder given as one, before the generator is opened."""
    for p in images:
        if p.is_dir():
            raise UserInputError(f"{p} is a folder, expected an image file")
        if not p.is_file():
            raise UserInputError(f"image not found: {p}")


def check_latent_files(specs: Iterable[str]) -> str | None:
    """Name a missing or broken latent file before the (slow, perhaps downloaded) generator is opened, not
    after; the base the first `.latent` records (None without one)."""
    from my3dgen_cli.identity import read_latent
    from my3dgen_cli.latents import NPY_SUFFIX, camera_beside, read_npy

    recorded = None
    for spec in specs:
        if spec.startswith(("seed:", "anchor:")):
            continue
        if Path(spec).is_dir():
            raise UserInputError(f"latent: {spec} is a folder, expected a .latent or .npy file")
        if not Path(spec).is_file():
            raise UserInputError(f"latent: {spec} does not exist (expected a .latent or .npy file, anchor:K or seed:S)")
        if Path(spec).suffix.lower() == NPY_SUFFIX:
            read_npy(spec)
            camera_beside(spec)
        else:
            recorded = recorded or read_latent(spec).base or None
    return recorded


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


def photo_targets(images: Sequence[Path], size: int, rig: Any, yaw: float | None = None, pitch: float | None = None,
                  labels: Path | None = None) -> list[tuple[str, Any, Any]]:
    """[(stem, target [1, 3, size, size], camera [1, 25])] of photos to invert: aligned crops with yaw/pitch
    (on `rig`) or `labels` (a dataset.json listing them), else faces detected and cropped."""
    import torch
    import torch.nn.functional as F

    from my3dgen_cli.faces.prepare import find_label, load_crop, prepare_faces, read_dataset_json

    check_images(images)
    if yaw is not None or pitch is not None:
        cam = rig.lookat(yaw or 0.0, pitch or 0.0)
        return [(p.stem, load_crop(p, size), cam) for p in images]
    if labels is not None:
        table = read_dataset_json(labels)
        out = []
        for p in images:
            label = find_label(table, p)
            if label is None:
                raise UserInputError(f"{p.name} is not listed in {labels}")
            out.append((p.stem, load_crop(p, size), torch.from_numpy(label).reshape(1, 25)))
        return out
    faces = prepare_faces(images, min_faces=len(images))
    imgs, cams = faces.images(), faces.cameras()
    if imgs.shape[-1] != size:
        imgs = F.interpolate(imgs, size=(size, size), mode="area")
    return [(f.stem, imgs[i:i + 1], cams[i:i + 1]) for i, f in enumerate(faces)]

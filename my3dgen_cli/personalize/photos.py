"""The photo front end of `personalize`: files and folders -> crops, cameras and names (`Photos`).

Detection, cropping and camera estimation are the faces module's; this module only gathers its
result, adds a My3DGen dataset folder's own latents (latents.dataset_latents) and mirrors photos.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli.errors import UserInputError
from my3dgen_cli.latents import DatasetLatents, dataset_latents


@dataclass
class Photos:
    """Training photos: images [N, 3, 512, 512] in [-1, 1], cameras [N, 25], names, skipped files, and the
    latents of a My3DGen dataset folder (the anchors, one per photo in this order) when it came with them."""

    images: torch.Tensor
    cameras: torch.Tensor
    names: list[str]
    skipped: list[str] = field(default_factory=list)
    latents: DatasetLatents | None = None

    def mirrored(self) -> Photos:
        """Photos plus their horizontally flipped copies seen from the mirror cameras."""
        from my3dgen_cli.eg3d.camera import mirror_camera

        return Photos(torch.cat([self.images, self.images.flip(-1)]),
                      torch.cat([self.cameras, mirror_camera(self.cameras)]),
                      self.names + [f"{n}-mirror" for n in self.names], self.skipped)


def read_photos(inputs: str | Path | list[str | Path], labels: str | Path | None = None,
                aligned: bool | None = None, on_progress: Any = None, reproject: bool = False) -> Photos:
    """The photo front end: files/folders -> Photos through the faces module.

    A folder holding an EG3D `dataset.json` is read as aligned crops with known cameras (as EG3D's
    own datasets) unless `aligned=False`; `labels` names a dataset.json explicitly. A My3DGen dataset
    folder (images with `.npy` latents, latents_import) also gives its latents, checked one-to-one
    against the images and the dataset.json, unless `reproject`.
    """
    from my3dgen_cli.faces import prepare as faces

    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    for item in items:
        if not Path(item).exists():
            raise UserInputError(f"photos: {item} does not exist")
    if labels is None:
        found = [Path(i) / "dataset.json" for i in items if (Path(i) / "dataset.json").is_file()]
        labels = found[0] if found else None
    if aligned is None:
        aligned = labels is not None
    files = [f for i in items for f in ([Path(i)] if Path(i).is_file() else sorted(Path(i).iterdir()))
             if f.suffix.lower() in faces.IMAGE_SUFFIXES and not f.name.startswith(".")]
    if not files:
        raise UserInputError(f"photos: no image files in {', '.join(str(i) for i in items)} "
                             f"(expected {', '.join(faces.IMAGE_SUFFIXES)})")
    latents = None if reproject else dataset_latents([Path(i) for i in items], files,
                                                     None if labels is None else Path(labels), bool(aligned))
    fs = faces.prepare_faces(items, min_faces=1, labels=labels, aligned=bool(aligned), on_progress=on_progress)
    if latents is not None and fs.skipped:  # every photo has its latent: one unusable photo breaks the pairing
        raise UserInputError(f"{fs.skipped[0]} (in a dataset with latents; fix it or pass --reproject)")
    names = [f.stem for f in fs]
    return Photos(fs.images(), fs.cameras(), names, [str(s) for s in fs.skipped],
                  None if latents is None else latents.ordered(names))

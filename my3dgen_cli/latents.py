"""Latents made by other tools: EG3D-projector / PTI / My3DGen `.npy` files and My3DGen dataset folders.

Researchers arrive with `.npy` latents instead of our `.latent` files:
- oneThousand1000/EG3D-projector (and PTI's embeddings) writes `X_w.npy` and `X_w_plus.npy` for an image
  `X.png`, both float32 (1, 14, 512) (a w latent is its one row repeated 14 times);
- My3DGen's dataset folders hold `image_N.png` + `image_N_latent.npy` + an EG3D `dataset.json`.

Accepted arrays: (1, num_ws, w_dim), (num_ws, w_dim), and a single w as (1, w_dim) or (w_dim,) (broadcast
to every row); float16/32/64, all finite. They are read with `np.load(allow_pickle=False)` only, after
a size check, so a file can never run code or fill memory. "w" vs "w+": identical rows are a w latent.

Image of a latent (the camera's key in dataset.json): the latent's stem without one trailing `_latent`,
`_w_plus` or `_w` (the first that matches, in that order), + `.png`; a latent without these suffixes
keeps its whole stem. The camera comes from the `dataset.json` in the latent's folder, matched by file
name and then by stem (as `faces.read_dataset_json` tables are everywhere); no such file or no entry:
no stored camera. A dataset.json that is there but broken is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from my3dgen_cli.errors import UserInputError, reason

NPY_SUFFIX = ".npy"
LATENT_SUFFIXES = ("_latent", "_w_plus", "_w")  # My3DGen, then the projector's two spaces
MAX_NPY_BYTES = 4 * 1024 * 1024  # a full-size w+ in float64 is 57 KB; anything this big is not a latent
FLOAT_DTYPES = (np.float16, np.float32, np.float64)


def image_stem(latent: str | Path) -> str:
    """The stem of the image a latent file belongs to (module docstring: the matching rule)."""
    stem = Path(latent).stem
    for suffix in LATENT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def latents_of_image(folder: Path, stem: str) -> list[Path]:
    """The latent files in `folder` that belong to image `stem` (the inverse of `image_stem`)."""
    return [p for p in (folder / f"{stem}{s}{NPY_SUFFIX}" for s in LATENT_SUFFIXES) if p.is_file()]


def read_npy(path: str | Path) -> np.ndarray:
    """A latent array from a `.npy` file: float32, finite, one of the accepted shapes (not yet sized to a G).

    One-line UserInputError naming the file for anything else: too big, not a plain .npy, pickled or
    object data, a non-float dtype, a shape that no latent has, NaN/Inf.
    """
    path = Path(path)
    expected = "a float (1, num_ws, w_dim), (num_ws, w_dim), (1, w_dim) or (w_dim,) latent array"
    if not path.is_file():
        raise UserInputError(f"latent file not found: {path}")
    size = path.stat().st_size
    if size > MAX_NPY_BYTES:
        raise UserInputError(f"{path}: got {size:,} bytes, expected a latent .npy of at most {MAX_NPY_BYTES:,}")
    try:
        array = np.load(path, allow_pickle=False)
    # Pickled / object data, truncated, not an .npy at all, a header that is not a Python literal: numpy's
    # header parser raises ValueError, SyntaxError, tokenize.TokenError, ... for a size-capped file, each
    # the file's fault.
    except Exception as err:  # noqa: BLE001
        raise UserInputError(f"{path}: not a readable .npy array ({reason(err)}); "
                             f"expected {expected}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive: np.load returns a lazy NpzFile
        if hasattr(array, "close"):
            array.close()
        raise UserInputError(f"{path}: got an .npz archive, expected one .npy array: {expected}")
    if array.dtype.type not in FLOAT_DTYPES:
        raise UserInputError(f"{path}: got dtype {array.dtype}, expected float16, float32 or float64: {expected}")
    squeezable = array.ndim == 3 and array.shape[0] == 1
    if not (array.ndim in (1, 2) or squeezable) or array.size == 0:
        raise UserInputError(f"{path}: got shape {array.shape}, expected {expected}")
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise UserInputError(f"{path}: got NaN or Inf values (or beyond float32), expected a finite latent")
    return array


def to_ws(array: np.ndarray, num_ws: int, w_dim: int, where: str | Path) -> Any:
    """A `read_npy` array as ws [1, num_ws, w_dim] float32 (a single w broadcast to every row)."""
    import torch

    if array.shape in ((1, num_ws, w_dim), (num_ws, w_dim)):
        rows = array.reshape(num_ws, w_dim)
    elif array.shape in ((1, w_dim), (w_dim,)):
        rows = np.broadcast_to(array.reshape(1, w_dim), (num_ws, w_dim))
    else:
        raise UserInputError(f"{where}: got shape {array.shape}, expected (1, {num_ws}, {w_dim}), "
                             f"({num_ws}, {w_dim}), (1, {w_dim}) or ({w_dim},) for this generator")
    return torch.from_numpy(np.ascontiguousarray(rows)).reshape(1, num_ws, w_dim)


def latent_space(ws: Any) -> str:
    """"w" when every row of ws [1, num_ws, w_dim] is the same (one w broadcast), else "w+"."""
    return "w" if bool((ws == ws[:, :1]).all()) else "w+"


def camera_beside(latent: str | Path) -> Any:
    """The camera [1, 25] of a latent file's image from the dataset.json in its folder; None without one."""
    import torch

    from my3dgen_cli.faces.prepare import find_label, read_dataset_json

    latent = Path(latent)
    dataset = latent.parent / "dataset.json"
    if not dataset.is_file():
        return None
    label = find_label(read_dataset_json(dataset), Path(f"{image_stem(latent)}.png"))
    return None if label is None else torch.from_numpy(label).reshape(1, 25)


def read_npy_latent(path: str | Path, num_ws: int, w_dim: int) -> Any:
    """An `.npy` latent as an identity.Latent (ws [1, num_ws, w_dim], camera from dataset.json or None).

    A foreign format (EG3D-projector, PTI, My3DGen): no format tag, and my3dgen never writes one."""
    from my3dgen_cli.identity import Latent

    ws = to_ws(read_npy(path), num_ws, w_dim, path)
    extra = {"source": str(path), "image": f"{image_stem(path)}.png"}
    return Latent(ws, camera_beside(path), space=latent_space(ws), extra=extra)


def open_latent(path: str | Path, num_ws: int, w_dim: int) -> Any:
    """A latent file of either kind (`.npy` by suffix, else `.latent`), checked against the generator's size.

    Latent.camera is None for an `.npy` whose image has no entry in a dataset.json beside it.
    """
    from my3dgen_cli.identity import read_latent

    if Path(path).suffix.lower() == NPY_SUFFIX:
        return read_npy_latent(path, num_ws, w_dim)
    latent = read_latent(path)
    if tuple(latent.ws.shape) != (1, num_ws, w_dim):
        raise UserInputError(f"{path}: got ws {list(latent.ws.shape)}, expected [1, {num_ws}, {w_dim}] "
                             "for this generator")
    return latent


# --- My3DGen dataset folders (personalize) --------------------------------------------------------


@dataclass(frozen=True)
class DatasetLatents:
    """The latents of a My3DGen dataset folder, one per image (not yet sized to a generator)."""

    folder: Path
    images: tuple[Path, ...]
    files: tuple[Path, ...]
    arrays: tuple[np.ndarray, ...]

    def ordered(self, stems: list[str]) -> DatasetLatents:
        """The same latents in the order of these image stems (the photos' order)."""
        index = {image.stem: k for k, image in enumerate(self.images)}
        picks = [index[s] for s in stems]
        return DatasetLatents(self.folder, *(tuple(seq[k] for k in picks)
                                             for seq in (self.images, self.files, self.arrays)))

    def ws(self, num_ws: int, w_dim: int) -> Any:
        """ws [N, num_ws, w_dim] float32 for a generator of this size (one-line error naming the file)."""
        import torch

        return torch.cat([to_ws(a, num_ws, w_dim, f) for a, f in zip(self.arrays, self.files, strict=True)])


def is_latent_dataset(folder: Path) -> bool:
    """A folder with a dataset.json and at least one `.npy` latent named after an image (`image_stem`)."""
    if not (folder.is_dir() and (folder / "dataset.json").is_file()):
        return False
    return any(p.is_file() and p.stem != image_stem(p) for p in folder.glob(f"*{NPY_SUFFIX}"))


def read_latent_dataset(folder: Path, images: list[Path], labels: Path) -> DatasetLatents:
    """The latents of `images` (a My3DGen dataset folder's photos), checked one-to-one against `labels`.

    Every image must be listed in the dataset.json (by file name) and have exactly one latent file
    (`latents_of_image`); every label must name an image of the folder and every latent file an image.
    Anything else is one line naming the first mismatch, before any file is written.
    """
    from my3dgen_cli.faces.prepare import read_dataset_json

    table = read_dataset_json(labels)
    listed = {Path(name).name for name in table}
    names = {p.name for p in images}
    for image in images:
        if image.name not in listed:
            raise UserInputError(f"{labels}: no label for {image.name}, expected one per image of {folder}")
    extra = sorted(listed - names)
    if extra:
        raise UserInputError(f"{labels}: label for {extra[0]!r}, which is not an image in {folder} "
                             f"({len(extra)} such label(s)); expected one label per image")
    stems = {p.stem for p in images}
    orphans = sorted(p.name for p in folder.glob(f"*{NPY_SUFFIX}") if p.stem != image_stem(p)
                     and image_stem(p) not in stems)
    if orphans:
        raise UserInputError(f"{folder / orphans[0]}: got a latent without its image {image_stem(orphans[0])}.png, "
                             "expected one latent per image of the folder")
    files = []
    for image in images:
        found = latents_of_image(folder, image.stem)
        if len(found) != 1:
            got = "none" if not found else " and ".join(p.name for p in found)
            raise UserInputError(f"{folder}: got {got} as the latent of {image.name}, expected one "
                                 f"{image.stem}_latent.npy (or pass --reproject to project the photos)")
        files.append(found[0])
    return DatasetLatents(folder, tuple(images), tuple(files), tuple(read_npy(f) for f in files))


def dataset_latents(items: list[Path], images: list[Path], labels: Path | None, aligned: bool) -> DatasetLatents | None:
    """The latents of `personalize`'s input when it is one My3DGen dataset folder (`is_latent_dataset`), else None.

    images: the folder's photos; labels: the dataset.json in use (the folder's own unless --labels).
    """
    folders = [item for item in items if is_latent_dataset(item)]
    if not folders:
        return None
    if len(items) > 1:
        raise UserInputError(f"{folders[0]} is a My3DGen dataset (images with .npy latents): personalize it alone, "
                             "or pass --reproject to project all the photos")
    if not aligned:
        raise UserInputError(f"--detect: the latents of {folders[0]} belong to its crops as they are; drop --detect "
                             "or pass --reproject")
    return read_latent_dataset(folders[0], images, labels or folders[0] / "dataset.json")

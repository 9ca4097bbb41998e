"""Photos in: find the face, cut EG3D's 512 px crop, estimate its camera.

    from my3dgen_cli.faces.prepare import prepare_faces
    faces = prepare_faces(["photos/"], min_faces=1)      # a folder and/or files
    faces.cameras()   # (N, 25) EG3D labels     faces.images()   # (N, 3, 512, 512) in [-1, 1]
    faces.skipped     # [Skipped(source, reason)] for files that gave no usable face

Each photo: EXIF orientation applied, converted to RGB (alpha over white), shrunk to at most
`DETECT_MAX_SIDE` pixels for detection, MTCNN run on the photo and on its mirror and the two
results averaged (`symmetric.py`) (so a mirrored photo gives exactly the mirrored crop and the camera at -yaw),
then the crop and pose of `faces_align`. With `labels` (an EG3D dataset.json) the cameras come
from the file instead of the estimate. Input files are only ever read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from my3dgen_cli.errors import UserInputError, reason
from my3dgen_cli.faces.align import (
    CROP_SIZE,
    CropTransform,
    crop_transform,
    estimate_pose,
    warp_crop,
)
from my3dgen_cli.faces.symmetric import find_face

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MIN_FACE_PX = 96  # crops cut from fewer source pixels than this are refused as too small
MIN_ALIGNED_PX = 16  # an aligned crop smaller than this holds no face (tiny test bases render 64 px)


@dataclass(frozen=True)
class Face:
    """One usable photo. Angles in degrees (camera.py convention); coordinates in pixels."""

    source: Path
    crop: np.ndarray  # (512, 512, 3) uint8 RGB
    camera: np.ndarray  # (25,) float32 EG3D label
    yaw: float
    pitch: float
    landmarks: np.ndarray | None  # (5, 2) in the (EXIF-rotated) source photo; None if not detected
    crop_landmarks: np.ndarray | None  # (5, 2) in the crop
    score: float | None  # detector confidence
    estimated: bool  # True: camera from the 5-point pose; False: from dataset.json

    @property
    def stem(self) -> str:
        return self.source.stem

    @property
    def crop_name(self) -> str:
        """File name of the crop and its key in dataset.json."""
        return f"{self.stem}.png"

    def image(self) -> Image.Image:
        return Image.fromarray(self.crop)


@dataclass(frozen=True)
class Skipped:
    source: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class FaceSet:
    faces: list[Face] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.faces)

    def __iter__(self) -> Iterator[Face]:
        return iter(self.faces)

    def __getitem__(self, i: int) -> Face:
        return self.faces[i]

    def cameras(self) -> Any:
        """(N, 25) float32 torch tensor of camera labels."""
        import torch

        return torch.from_numpy(np.stack([f.camera for f in self.faces]).astype(np.float32))

    def images(self) -> Any:
        """(N, 3, 512, 512) float32 torch tensor in [-1, 1] (EG3D's image range)."""
        import torch

        x = torch.from_numpy(np.stack([f.crop for f in self.faces])).permute(0, 3, 1, 2)
        return x.float() / 127.5 - 1.0

    def dataset_json(self) -> dict[str, Any]:
        """EG3D's dataset.json: {"labels": [[crop file name, [25 floats]], ...]}."""
        return {"labels": [[f.crop_name, [float(v) for v in f.camera]] for f in self.faces]}


# --- reading -----------------------------------------------------------------------------------


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (sorted, not recursive, hidden files left out)."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out += sorted(
                p for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
        else:
            out.append(path)
    return out


def load_photo(path: Path) -> np.ndarray:
    """A photo as (H, W, 3) uint8 RGB: EXIF orientation applied, alpha over white, grey expanded.

    Raises UserInputError with the reason when the file cannot be read as an image.
    """
    if not path.is_file():
        raise UserInputError("no such file" if not path.exists() else "not a file")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray((arr * 255.0 / max(arr.max(), 1.0)).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise UserInputError("not an image file (unrecognized format)") from None
    except Image.DecompressionBombError as err:
        raise UserInputError(f"image too large ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserInputError(f"unreadable image ({err})") from None


def load_crop(path: Path, size: int) -> Any:
    """An aligned square crop (already EG3D's framing) -> [1, 3, size, size] float tensor in [-1, 1]."""
    import torch

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise UserInputError(f"{path}: not a readable image ({err.__class__.__name__})") from None
    if im.width != im.height:
        raise UserInputError(f"{path}: got a {im.width}x{im.height} image, expected a square aligned crop "
                             "(leave out --yaw/--pitch/--labels to detect and crop the face)")
    if im.width != size:
        im = im.resize((size, size), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 127.5 - 1
    return x.unsqueeze(0)


def read_dataset_json(source: str | Path | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Camera labels of an EG3D dataset.json (path or parsed dict): {file name: (25,) float32}."""
    if isinstance(source, Mapping):
        data, where = source, "labels"
    else:
        where = str(source)
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:
            raise UserInputError(f"{where}: cannot read dataset.json ({reason(err)})") from None
    labels = data.get("labels") if isinstance(data, Mapping) else None
    if not isinstance(labels, list):
        raise UserInputError(f'{where}: got no "labels" list, expected {{"labels": [[name, [25 floats]]]}}')
    out: dict[str, np.ndarray] = {}
    for entry in labels:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise UserInputError(f"{where}: got label entry {str(entry)[:60]}, expected [name, [25 floats]]")
        name, raw = entry
        numbers = isinstance(raw, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        if not numbers or len(raw) != 25:
            got = f"{len(raw)} values" if numbers else str(raw)[:40]
            raise UserInputError(f"{where}: label of {name!r}: got {got}, expected 25 floats")
        value = np.asarray(raw, dtype=np.float64)
        if not np.isfinite(value).all() or np.abs(value).max() > np.finfo(np.float32).max:
            raise UserInputError(f"{where}: label of {name!r}: got a non-finite value, expected 25 finite floats")
        if name in out:
            raise UserInputError(f"{where}: {name!r} is listed twice, expected one label per image")
        out[name] = value.astype(np.float32)
    return out


def find_label(labels: Mapping[str, np.ndarray], path: Path) -> np.ndarray | None:
    """Match by relative name, then file name, then stem (a .jpg photo may be listed as .png)."""
    by_name = {Path(k).name: v for k, v in labels.items()}
    by_stem = {Path(k).stem: v for k, v in labels.items()}
    return by_name.get(path.name, by_stem.get(path.stem))


def _camera(yaw: float, pitch: float) -> np.ndarray:
    from my3dgen_cli.eg3d.camera import lookat_camera

    return lookat_camera(yaw, pitch)[0].numpy()


def _angles(label: np.ndarray) -> tuple[float, float]:
    import torch

    from my3dgen_cli.eg3d.camera import camera_angles

    yaw, pitch = camera_angles(torch.from_numpy(label.astype(np.float32)).reshape(1, 25))
    return float(yaw[0]), float(pitch[0])


def prepare_face(
    path: str | Path,
    *,
    face_index: int | None = None,
    label: np.ndarray | None = None,
    aligned: bool = False,
    detector: Any = None,
    image: np.ndarray | None = None,
) -> Face:
    """One photo -> Face. Raises UserInputError(reason) when the photo gives no usable face.

    aligned: the photo already is an EG3D crop (only resized to 512; needs `label`).
    image: the decoded photo, when the caller has it (else read from `path`).
    """
    path = Path(path)
    image = load_photo(path) if image is None else image
    if aligned:
        if label is None:
            raise UserInputError("an aligned photo needs its camera label from dataset.json")
        if min(image.shape[:2]) < MIN_ALIGNED_PX:
            raise UserInputError(f"crop too small: {image.shape[1]}x{image.shape[0]} px, expected at least "
                                 f"{MIN_ALIGNED_PX} px on each side")
        crop = np.asarray(Image.fromarray(image).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.LANCZOS))
        yaw, pitch = _angles(label)
        return Face(path, crop, label.astype(np.float32), yaw, pitch, None, None, None, estimated=False)
    if min(image.shape[:2]) < MIN_FACE_PX:
        raise UserInputError(f"photo too small: {image.shape[1]}x{image.shape[0]} px, expected at least "
                             f"{MIN_FACE_PX} px on each side")
    landmarks, score = find_face(image, face_index, detector)
    tf: CropTransform = crop_transform(landmarks)
    if tf.size < MIN_FACE_PX:
        raise UserInputError(
            f"face too small: the crop would come from {tf.size:.0f} px, expected at least {MIN_FACE_PX} px"
        )
    crop = warp_crop(image, tf)
    crop_lm = tf.to_crop(landmarks)
    if label is None:
        yaw, pitch = estimate_pose(crop_lm)
        camera, estimated = _camera(yaw, pitch), True
    else:
        camera, estimated = label.astype(np.float32), False
        yaw, pitch = _angles(camera)
    return Face(path, crop, camera, yaw, pitch, landmarks, crop_lm, score, estimated)


def prepare_faces(
    inputs: str | Path | Sequence[str | Path],
    *,
    min_faces: int = 1,
    face_index: int | None = None,
    labels: str | Path | Mapping[str, Any] | None = None,
    aligned: bool = False,
    detector: Any = None,
    on_progress: Any = None,
) -> FaceSet:
    """Photos (files and/or folders) -> FaceSet of aligned crops + cameras, and what was skipped.

    face_index: which face per photo, 0 = largest (default). labels: an EG3D dataset.json (path
    or parsed) whose cameras replace the estimates; photos it does not list are skipped.
    on_progress(path) is called after each photo. Raises UserInputError when fewer than
    `min_faces` photos are usable (the message lists why the others were skipped).
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if face_index is not None and face_index < 0:
        raise UserInputError(f"face index: got {face_index}, expected 0 or more")
    if aligned and labels is None:
        raise UserInputError("aligned photos need their cameras: pass the dataset.json (labels)")
    table = read_dataset_json(labels) if labels is not None else None
    paths = expand_inputs(inputs)
    result = FaceSet()
    stems: set[str] = set()
    for path in paths:
        try:
            if path.stem in stems:
                raise UserInputError(f"another photo has the stem {path.stem!r} (crops keep the stem)")
            label = None
            if table is not None:
                label = find_label(table, path)
                if label is None:
                    raise UserInputError("not listed in dataset.json")
            result.faces.append(
                prepare_face(path, face_index=face_index, label=label, aligned=aligned, detector=detector)
            )
            stems.add(path.stem)
        except UserInputError as err:
            result.skipped.append(Skipped(path, str(err)))
        if on_progress is not None:
            on_progress(path)
    if len(result.faces) < min_faces:
        why = "; ".join(str(s) for s in result.skipped[:5]) + (" ..." if len(result.skipped) > 5 else "")
        raise UserInputError(
            f"got {len(result.faces)} usable photo(s) of {len(paths)}, expected at least {min_faces}"
            + (f" (skipped: {why})" if why else "")
        )
    return result

"""Photos in: find the face, cut EG3D's 512 px crop, estimate its camera.

    from my3dgen_cli.faces.prepare import prepare_faces
    faces = prepare_faces(["photos/"], min_faces=1)      # a folder and/or files
    faces.cameras()   # (N, 25) EG3D labels     faces.images()   # (N, 3, 512, 512) in [-1, 1]
    faces.skipped     # [Skipped(source, reason)] for files that gave no usable face

Each photo: EXIF orientation applied, converted to RGB (alpha over white), shrunk to at most
`DETECT_MAX_SIDE` pixels for detection, MTCNN run on the photo and on its mirror and the two
results averaged (so a mirrored photo gives exactly the mirrored crop and the camera at -yaw),
then the crop and pose of `faces_align`. With `labels` (an EG3D dataset.json) the cameras come
from the file instead of the estimate. Input files are only ever read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from my3dgen_cli.errors import UserInputError
from my3dgen_cli.faces.align import (
    CROP_SIZE,
    CropTransform,
    crop_transform,
    estimate_pose,
    mirror_points,
    warp_crop,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
DETECT_MAX_SIDE = 1024  # larger photos are shrunk (antialiased) for detection only
MIN_FACE_PX = 96  # crops cut from fewer source pixels than this are refused as too small
OUTPUT_NAMES = ("contact_sheet.png", "dataset.json")  # written beside the crops (<stem>.png)
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


def read_dataset_json(source: str | Path | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Camera labels of an EG3D dataset.json (path or parsed dict): {file name: (25,) float32}."""
    if isinstance(source, Mapping):
        data, where = source, "labels"
    else:
        where = str(source)
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UserInputError(f"{where}: cannot read dataset.json ({err})") from None
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


# --- detection with mirror averaging -----------------------------------------------------------


def _box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect_symmetric(image: np.ndarray, detector: Any = None) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Faces as (box (4,), landmarks (5, 2), score), largest first, mirror-averaged.

    The detector runs on the photo and on its mirror; matching detections (IoU > 0.3) are
    averaged, so detect_symmetric(mirror) is the mirror of detect_symmetric(photo).
    """
    from my3dgen_cli.faces.detect import default_detector

    detector = detector or default_detector()
    w = image.shape[1]
    direct = [(d.box, d.landmarks, d.score) for d in detector.detect(image)]
    mirrored = []
    for d in detector.detect(image[:, ::-1].copy()):  # a copy: ascontiguousarray keeps a 1-px-wide view reversed
        box = np.array([w - d.box[2], d.box[1], w - d.box[0], d.box[3]])
        mirrored.append((box, mirror_points(d.landmarks, w), d.score))
    pairs = sorted(
        ((_box_iou(a[0], b[0]), i, j) for i, a in enumerate(direct) for j, b in enumerate(mirrored)),
        key=lambda t: -t[0],
    )
    used_a: set[int] = set()
    used_b: set[int] = set()
    faces = []
    for iou, i, j in pairs:
        if iou > 0.3 and i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            (ba, la, sa), (bb, lb, sb) = direct[i], mirrored[j]
            faces.append(((ba + bb) / 2, (la + lb) / 2, (sa + sb) / 2))
    faces += [direct[i] for i in range(len(direct)) if i not in used_a]
    faces += [mirrored[j] for j in range(len(mirrored)) if j not in used_b]
    return sorted(faces, key=lambda f: -float((f[0][2] - f[0][0]) * (f[0][3] - f[0][1])))


def _detect(image: np.ndarray, face_index: int | None, detector: Any) -> tuple[np.ndarray, float]:
    """Landmarks (5, 2) and score of the chosen face in full-resolution coordinates."""
    h, w = image.shape[:2]
    shrink = min(1.0, DETECT_MAX_SIDE / max(h, w))
    small = image
    if shrink < 1.0:
        size = (max(round(w * shrink), 1), max(round(h * shrink), 1))
        small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    faces = detect_symmetric(small, detector)
    if not faces:
        raise UserInputError("no face found")
    index = 0 if face_index is None else face_index
    if index >= len(faces):
        raise UserInputError(f"face index {index} requested, only {len(faces)} face(s) found")
    _, lm, score = faces[index]
    scale = np.array([w / small.shape[1], h / small.shape[0]])
    return lm * scale, float(score)


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
    landmarks, score = _detect(image, face_index, detector)
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


# --- writing -----------------------------------------------------------------------------------


def contact_sheet(faces: FaceSet, tile: int = 256, columns: int = 6) -> Image.Image:
    """A grid of the crops with landmarks and the camera (yaw/pitch) written on each."""
    n = max(len(faces), 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * tile, rows * tile), (32, 32, 32))
    font = ImageFont.load_default(size=max(tile // 16, 10))
    for k, face in enumerate(faces):
        img = face.image().resize((tile, tile), Image.Resampling.LANCZOS)
        draw = ImageDraw.Draw(img)
        if face.crop_landmarks is not None:
            for x, y in face.crop_landmarks * (tile / CROP_SIZE):
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(0, 255, 0))
        source = "est" if face.estimated else "json"
        text = f"{face.stem}\nyaw {face.yaw:+.1f}  pitch {face.pitch:+.1f} ({source})"
        draw.multiline_text((5, 5), text, fill=(255, 255, 0), font=font, stroke_width=2, stroke_fill=(0,) * 3)
        sheet.paste(img, ((k % cols) * tile, (k // cols) * tile))
    return sheet


def check_outdir(outdir: str | Path, inputs: Sequence[str | Path]) -> None:
    """Refuse an output folder that is an input folder or holds an input photo."""
    out = Path(outdir).resolve()
    for item in inputs:
        path = Path(item).resolve()
        if out == (path if path.is_dir() else path.parent):
            raise UserInputError(f"output folder {outdir} holds input photos; choose another folder")


def write_faces(faces: FaceSet, outdir: str | Path, inputs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Write crops (<stem>.png), contact_sheet.png and dataset.json into `outdir`, atomically.

    Refuses an `outdir` that holds any of the photos (inputs are never overwritten).
    Returns the written paths.
    """
    from my3dgen_cli.fileio import write_atomic, write_text_atomic

    out = Path(outdir)
    check_outdir(out, [*inputs, *(f.source for f in faces), *(s.source for s in faces.skipped)])
    crops = []
    for face in faces:
        target = out / face.crop_name
        write_atomic(target, lambda p, f=face: f.image().save(p, format="PNG"))
        crops.append(str(target))
    sheet = out / OUTPUT_NAMES[0]
    write_atomic(sheet, lambda p: contact_sheet(faces).save(p, format="PNG"))
    dataset = out / OUTPUT_NAMES[1]
    write_text_atomic(dataset, json.dumps(faces.dataset_json(), indent=1) + "\n")
    return {"crops": crops, "contact_sheet": str(sheet), "dataset_json": str(dataset)}

"""Face detection on a photo and on its mirror, averaged: a mirrored photo gives exactly the mirrored face.

    landmarks, score = find_face(image, face_index=None, detector=None)   # (5, 2) in photo pixels
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from my3dgen_cli.errors import UserInputError
from my3dgen_cli.faces.align import mirror_points

DETECT_MAX_SIDE = 1024  # larger photos are shrunk (antialiased) for detection only


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


def find_face(image: np.ndarray, face_index: int | None, detector: Any) -> tuple[np.ndarray, float]:
    """Landmarks (5, 2) and score of face `face_index` (0 = largest), in full-resolution coordinates.

    Detection runs on the photo shrunk to at most DETECT_MAX_SIDE pixels.
    """
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

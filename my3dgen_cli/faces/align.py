"""EG3D-style face crop and head pose from 5 landmarks.

Crop (EG3D `dataset_preprocessing/ffhq/crop_images_in_the_wild.py` + Deep3DFaceRecon
`align_img`): fit the standard 5-point 3D face to the landmarks with a linear least-squares
affine camera (their "POS"), giving a translation t (where the face model's origin lands) and a
scale s (pixels per decimetre). EG3D rescales the photo by 300 / s, cuts 1024 around t and keeps
the centre 700, resized to 512: a square of side 700 / 300 * s source pixels centred on t. We
cut the same square, but rotated so that the eyes are level (EG3D's FFHQ images were aligned so;
its in-the-wild script keeps the photo's roll). Outside the photo the square is filled by
reflection, as FFHQ's alignment does.

Pose: the standard 3D face placed in EG3D's world (x right, y up, face looking along +z) is
projected by EG3D's LookAt camera (radius 2.7, pivot (0, 0, 0.2), focal 4.2647) for a grid of
(yaw, pitch); the pose whose projection best matches the crop's landmarks up to a 2D similarity
wins (coarse-to-fine search). Yaw and pitch use `my3dgen_cli.eg3d.camera`'s convention (degrees,
0 = frontal, yaw > 0 shows more of the subject's left cheek, pitch > 0 looks down on the face).

Coordinates are continuous pixels (see `faces_detect`): the mirror of x is W - x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

CROP_SIZE = 512
_EG3D_RESCALE = 300.0  # `rescale_factor` in crop_images_in_the_wild.py
_EG3D_CENTER_CROP = 700.0  # `center_crop_size` there
_SUPERSAMPLE = 2  # warp at 2x, then Lanczos down to CROP_SIZE

# The standard 5-point face used by Deep3DFaceRecon and EG3D's crop (decimetres; x right, y up,
# z towards the viewer): left eye, right eye, nose tip, left and right mouth corner (image left/right).
_LM3D_RAW = np.array(
    [
        [-0.31148657, 0.29036078, 0.13377953],
        [0.30979887, 0.28972036, 0.13179526],
        [0.0032535, -0.04617932, 0.55244243],
        [-0.25216928, -0.38133916, 0.22405732],
        [0.2484662, -0.38128236, 0.22235769],
    ]
)
_SWAP = [1, 0, 2, 4, 3]  # left <-> right when mirroring
# Made exactly left-right symmetric (differences were < 2 mm), so a mirrored photo gets a mirrored fit.
LM3D = (_LM3D_RAW + _LM3D_RAW[_SWAP] * np.array([-1.0, 1.0, 1.0])) / 2

# The face model in EG3D world units: decimetres -> world (the crop spans 700/300 dm, i.e. the
# image plane at the pivot's depth), origin at the world origin.
_WORLD_PER_DM = (2.7 - 0.2) / 4.2647 / (_EG3D_CENTER_CROP / _EG3D_RESCALE)


def mirror_points(points: np.ndarray, width: float) -> np.ndarray:
    """5 landmarks (5, 2) of an image of `width` -> those of its left-right mirror (order swapped)."""
    out = points[_SWAP].astype(np.float64).copy()
    out[:, 0] = width - out[:, 0]
    return out


def _rot(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


@dataclass(frozen=True)
class CropTransform:
    """A square of side `size` source pixels centred at `center`, turned by `roll` radians.

    Crop pixel u (continuous, 0..CROP_SIZE) shows source point center + size/CROP_SIZE * R(roll) (u - 256).
    """

    center: np.ndarray  # (2,)
    size: float
    roll: float

    def to_source(self, uv: np.ndarray) -> np.ndarray:
        """(N, 2) crop coordinates -> (N, 2) source coordinates."""
        return self.center + (self.size / CROP_SIZE) * (uv - CROP_SIZE / 2) @ _rot(self.roll).T

    def to_crop(self, xy: np.ndarray) -> np.ndarray:
        """(N, 2) source coordinates -> (N, 2) crop coordinates."""
        return (xy - self.center) @ _rot(self.roll) * (CROP_SIZE / self.size) + CROP_SIZE / 2


def fit_pos(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares affine camera from the 3D standard face to 2D points (y up).

    points: (5, 2) -> (t (2,): image of the model origin, s: mean norm of the two projection rows).
    """
    a = np.zeros((10, 8))
    a[0::2, 0:3], a[0::2, 3] = LM3D, 1.0
    a[1::2, 4:7], a[1::2, 7] = LM3D, 1.0
    k = np.linalg.lstsq(a, points.reshape(10), rcond=None)[0]
    s = (np.linalg.norm(k[0:3]) + np.linalg.norm(k[4:7])) / 2
    return np.array([k[3], k[7]]), float(s)


def crop_transform(landmarks: np.ndarray) -> CropTransform:
    """EG3D's crop square for 5 landmarks (5, 2), with the roll taken out along the eye line."""
    eyes = landmarks[1] - landmarks[0]
    roll = math.atan2(eyes[1], eyes[0])
    pivot = landmarks.mean(axis=0)
    level = (landmarks - pivot) @ _rot(roll)  # roll removed, still y down
    t, s = fit_pos(level * np.array([1.0, -1.0]))  # POS works with y up
    center = pivot + _rot(roll) @ (t * np.array([1.0, -1.0]))
    return CropTransform(center=center, size=_EG3D_CENTER_CROP / _EG3D_RESCALE * s, roll=roll)


def _region(image: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """image[y0:y1, x0:x1] with reflection where the window leaves the image."""
    h, w = image.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx0 >= cx1 or cy0 >= cy1:  # window entirely outside: nothing to reflect from
        return np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    inner = image[cy0:cy1, cx0:cx1]
    pad = ((cy0 - y0, y1 - cy1), (cx0 - x0, x1 - cx1), (0, 0))
    return np.pad(inner, pad, mode="reflect") if any(p for p in pad[0] + pad[1]) else inner


def warp_crop(image: np.ndarray, tf: CropTransform) -> np.ndarray:
    """Cut the crop: (H, W, 3) uint8 -> (CROP_SIZE, CROP_SIZE, 3) uint8, antialiased.

    Every step is left-right symmetric, so the crop of a mirrored photo with the mirrored
    transform is the mirrored crop.
    """
    corners = tf.to_source(np.array([[0, 0], [CROP_SIZE, 0], [0, CROP_SIZE], [CROP_SIZE, CROP_SIZE]], float))
    margin = 4 * tf.size / CROP_SIZE + 2  # filter support
    x0, y0 = (math.floor(v) for v in corners.min(axis=0) - margin)
    x1, y1 = (math.ceil(v) for v in corners.max(axis=0) + margin)
    region = Image.fromarray(np.ascontiguousarray(_region(image, x0, y0, x1, y1)))
    out = CROP_SIZE * _SUPERSAMPLE
    fx = fy = 1.0
    if tf.size > out:  # shrink with an antialiasing filter first; the rotation then works near 1:1
        new = (max(round(region.width * out / tf.size), 1), max(round(region.height * out / tf.size), 1))
        fx, fy = new[0] / region.width, new[1] / region.height
        region = region.resize(new, Image.Resampling.LANCZOS)
    # Affine map output pixel (continuous) -> region pixel (continuous); PIL samples at pixel centres.
    m = (tf.size / out) * _rot(tf.roll)
    origin = tf.center - m @ np.array([out / 2, out / 2]) - np.array([x0, y0])
    m = np.diag([fx, fy]) @ m
    origin = origin * np.array([fx, fy])
    data = (m[0, 0], m[0, 1], origin[0], m[1, 0], m[1, 1], origin[1])
    big = region.transform((out, out), Image.Transform.AFFINE, data, resample=Image.Resampling.BICUBIC)
    return np.asarray(big.resize((CROP_SIZE, CROP_SIZE), Image.Resampling.LANCZOS))


# --- pose --------------------------------------------------------------------------------------


def _project(yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """The standard face seen by EG3D LookAt cameras. yaw, pitch: (G,) degrees -> (G, 5, 2) in [0, 1]."""
    from my3dgen_cli.eg3d.camera import lookat_camera

    cams = lookat_camera(yaw, pitch).double().numpy()  # (G, 25)
    c2w = cams[:, :16].reshape(-1, 4, 4)
    focal = cams[0, 16]
    world = LM3D * _WORLD_PER_DM  # (5, 3)
    rel = world[None] - c2w[:, None, :3, 3]  # (G, 5, 3)
    cam = np.einsum("gpk,gkj->gpj", rel, c2w[:, :3, :3])  # R^T (X - o): camera coordinates
    return focal * cam[..., :2] / cam[..., 2:3] + 0.5


def _similarity_residual(model: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Residual of the best 2D similarity taking each model (G, 5, 2) onto target (5, 2). -> (G,)."""
    p = model[..., 0] + 1j * model[..., 1]
    q = target[:, 0] + 1j * target[:, 1]
    p = p - p.mean(axis=1, keepdims=True)
    q = q - q.mean()
    a = (np.conj(p) * q).sum(axis=1) / (np.abs(p) ** 2).sum(axis=1)  # scale * rotation
    return (np.abs(q[None] - a[:, None] * p) ** 2).sum(axis=1) / (np.abs(q) ** 2).sum()


# The fit minimizes residual / _NOISE + (yaw / _YAW_SPREAD)^2 + (pitch / _PITCH_SPREAD)^2: a weak
# prior towards frontal. Pitch from 5 points mixes with expression (a smile lifts the mouth corners
# like a downward tilt does); _NOISE is the median best-fit residual on 40 LFW faces (0.0019), the
# spreads are of the order of FFHQ's pose spread.
_NOISE = 0.002
_YAW_SPREAD = 40.0
_PITCH_SPREAD = 10.0


def _fit_pose(points: np.ndarray) -> tuple[float, float]:
    """Yaw, pitch (degrees) whose projection best matches crop points (5, 2) in [0, 1]."""
    best = (0.0, 0.0)
    for span, step in ((90.0, 3.0), (4.0, 0.25), (0.3, 0.02)):
        ys = np.arange(-span, span + step / 2, step) + best[0]
        ps = np.arange(-span, span + step / 2, step) + best[1]
        ps = ps[np.abs(ps) <= 80.0]
        yy, pp = (g.reshape(-1) for g in np.meshgrid(ys, ps, indexing="ij"))
        cost = _similarity_residual(_project(yy, pp), points) / _NOISE
        cost = cost + (yy / _YAW_SPREAD) ** 2 + (pp / _PITCH_SPREAD) ** 2
        i = int(np.argmin(cost))
        best = (float(yy[i]), float(pp[i]))
    return best


def estimate_pose(crop_landmarks: np.ndarray) -> tuple[float, float]:
    """Head pose (yaw, pitch) in degrees from 5 landmarks (5, 2) in crop pixels.

    Fitted on the landmarks and on their mirror, then averaged with the sign of yaw flipped for
    the mirror: the estimate of a mirrored photo is exactly (-yaw, pitch).
    """
    pts = crop_landmarks / CROP_SIZE
    y1, p1 = _fit_pose(pts)
    y2, p2 = _fit_pose(mirror_points(pts, 1.0))
    return (y1 - y2) / 2, (p1 + p2) / 2

"""EG3D cameras: LookAt poses from yaw/pitch, intrinsics and the 25-d label.

Convention (the one EG3D's FFHQ dataset.json uses, stated once here):
- World: the head sits near the origin and looks along +z; +y is up; +x is the image's right in
  the frontal view (the subject's own left).
- Camera: OpenCV cam2world, columns = camera x (image right), y (image down), z (forward),
  origin. The camera sits on a sphere of radius 2.7 around the *world origin* and looks at the
  pivot (0, 0, 0.2) (AFHQ: (0, 0, -0.06)). Pivot and radius belong to the base: its
  rendering_kwargs `avg_camera_pivot` / `avg_camera_radius`, read by `camera_rig(G)`;
  `lookat_camera` without them uses FFHQ's.
- Angles here are in degrees. yaw 0, pitch 0 is frontal. yaw > 0 moves the camera towards +x
  (it sees more of the subject's left cheek); pitch > 0 moves the camera up (it looks down on the
  face). EG3D's LookAt sampler takes radians with frontal at (pi/2, pi/2):
  eg3d_yaw = pi/2 + yaw, eg3d_pitch = pi/2 - pitch.
- Label: 16 floats of cam2world (row-major 4x4), then 9 floats of normalized intrinsics
  [[f, 0, cx], [0, f, cy], [0, 0, 1]] with FFHQ's f = 4.2647 and (cx, cy) = (0.5, 0.5).
  (`FOV_to_intrinsics(18.837)` gives 4.2634, not 4.2647; we use the dataset's value.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

FFHQ_FOCAL = 4.2647
FFHQ_PIVOT = (0.0, 0.0, 0.2)
AFHQ_PIVOT = (0.0, 0.0, -0.06)
CAMERA_RADIUS = 2.7
LABEL_DIM = 25


def intrinsics(focal: float = FFHQ_FOCAL, center: tuple[float, float] = (0.5, 0.5)) -> torch.Tensor:
    """Normalized 3x3 intrinsics (focal and principal point in units of image size)."""
    return torch.tensor([[focal, 0.0, center[0]], [0.0, focal, center[1]], [0.0, 0.0, 1.0]])


def _as_batch(value: float | Sequence[float] | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1)


def _device_of(*values: object) -> torch.device | None:
    """The device of the first tensor among `values` (None: all plain numbers, so the CPU)."""
    return next((v.device for v in values if isinstance(v, torch.Tensor)), None)


def lookat_cam2world(
    eg3d_yaw: torch.Tensor,
    eg3d_pitch: torch.Tensor,
    pivot: Sequence[float] = FFHQ_PIVOT,
    radius: float = CAMERA_RADIUS,
) -> torch.Tensor:
    """EG3D's LookAtPoseSampler with zero spread: radians, frontal at (pi/2, pi/2).

    eg3d_yaw, eg3d_pitch: (N,) float64. Returns (N, 4, 4) float64 OpenCV cam2world.
    """
    v = torch.clamp(eg3d_pitch, 1e-5, math.pi - 1e-5) / math.pi
    phi = torch.arccos(1 - 2 * v)
    theta = eg3d_yaw
    origin = torch.stack(
        [
            radius * torch.sin(phi) * torch.cos(math.pi - theta),
            radius * torch.cos(phi),
            radius * torch.sin(phi) * torch.sin(math.pi - theta),
        ],
        dim=-1,
    )  # (N, 3), on the sphere around the world origin, not around the pivot
    device = origin.device  # the constants below follow the angles' device
    target = torch.as_tensor(pivot, dtype=torch.float64, device=device).expand_as(origin)
    forward = torch.nn.functional.normalize(target - origin, dim=-1)
    world_up = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64, device=device).expand_as(forward)
    right = -torch.nn.functional.normalize(torch.cross(world_up, forward, dim=-1), dim=-1)
    up = torch.nn.functional.normalize(torch.cross(forward, right, dim=-1), dim=-1)
    cam2world = torch.eye(4, dtype=torch.float64, device=device).repeat(origin.shape[0], 1, 1)
    cam2world[:, :3, 0] = right
    cam2world[:, :3, 1] = up
    cam2world[:, :3, 2] = forward
    cam2world[:, :3, 3] = origin
    return cam2world


def make_label(cam2world: torch.Tensor, focal: float = FFHQ_FOCAL) -> torch.Tensor:
    """(N, 4, 4) cam2world -> (N, 25) float32 camera label."""
    n = cam2world.shape[0]
    k = intrinsics(focal).to(device=cam2world.device, dtype=torch.float64).reshape(1, 9).expand(n, 9)
    return torch.cat([cam2world.reshape(n, 16), k], dim=1).to(torch.float32)


def lookat_camera(
    yaw: float | Sequence[float] | torch.Tensor = 0.0,
    pitch: float | Sequence[float] | torch.Tensor = 0.0,
    *,
    radius: float = CAMERA_RADIUS,
    pivot: Sequence[float] = FFHQ_PIVOT,
    focal: float = FFHQ_FOCAL,
) -> torch.Tensor:
    """Camera label(s) for yaw/pitch in degrees (0, 0 = frontal). Returns (N, 25) float32.

    yaw and pitch broadcast against each other; scalars give N = 1.
    """
    device = _device_of(yaw, pitch)  # a tensor's device wins; plain numbers give CPU labels
    yaw_t, pitch_t = torch.broadcast_tensors(_as_batch(yaw, device), _as_batch(pitch, device))
    eg3d_yaw = math.pi / 2 + torch.deg2rad(yaw_t)
    eg3d_pitch = math.pi / 2 - torch.deg2rad(pitch_t)
    return make_label(lookat_cam2world(eg3d_yaw, eg3d_pitch, pivot, radius), focal)


def frontal_camera(n: int = 1, pivot: Sequence[float] = FFHQ_PIVOT, radius: float = CAMERA_RADIUS) -> torch.Tensor:
    """The conditioning camera EG3D's mapping network is given at inference: (n, 25)."""
    return lookat_camera(0.0, 0.0, pivot=pivot, radius=radius).expand(n, LABEL_DIM).clone()


@dataclass(frozen=True)
class CameraRig:
    """Where a base's cameras sit: on a sphere of `radius` about the world origin, aimed at `pivot`.

    A base was trained on its dataset's average camera (FFHQ: pivot (0, 0, 0.2); AFHQ: (0, 0,
    -0.06)); rendering it from another pivot frames the subject off-centre. `camera_rig(G)`
    reads a generator's own, so every command orbits each base the way it was trained.
    """

    pivot: tuple[float, float, float] = FFHQ_PIVOT
    radius: float = CAMERA_RADIUS
    focal: float = FFHQ_FOCAL

    def lookat(self, yaw: float | Sequence[float] | torch.Tensor = 0.0,
               pitch: float | Sequence[float] | torch.Tensor = 0.0) -> torch.Tensor:
        """`lookat_camera` on this rig: degrees (0, 0 = frontal) -> (N, 25) float32."""
        return lookat_camera(yaw, pitch, radius=self.radius, pivot=self.pivot, focal=self.focal)

    def frontal(self, n: int = 1) -> torch.Tensor:
        """The mapping network's conditioning camera on this rig: (n, 25)."""
        return frontal_camera(n, pivot=self.pivot, radius=self.radius)


FFHQ_RIG = CameraRig()


def camera_rig(source: Any = None) -> CameraRig:
    """The camera rig of a generator (its `rendering_kwargs`), of a rendering_kwargs dict, or FFHQ's (None).

    A CameraRig passes through unchanged. Raises ValueError when `avg_camera_pivot` is not 3
    finite numbers or `avg_camera_radius` not a positive number (missing included: the official
    code's silent default pivot (0, 0, 0) would frame every view off-centre).
    """
    if source is None:
        return FFHQ_RIG
    if isinstance(source, CameraRig):
        return source
    kwargs = source if isinstance(source, Mapping) else getattr(source, "rendering_kwargs", None)
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"camera_rig: got {type(source).__name__}, expected a generator or its rendering_kwargs")
    pivot, radius = kwargs.get("avg_camera_pivot"), kwargs.get("avg_camera_radius")
    try:
        pivot_t = () if isinstance(pivot, str) else tuple(float(v) for v in pivot)
    except (TypeError, ValueError):
        pivot_t = ()
    try:
        radius_f = float(radius)
    except (TypeError, ValueError):
        radius_f = float("nan")
    if len(pivot_t) != 3 or not all(map(math.isfinite, pivot_t)):
        raise ValueError(f"rendering_kwargs.avg_camera_pivot: got {pivot!r}, expected 3 numbers")
    if not (math.isfinite(radius_f) and radius_f > 0):
        raise ValueError(f"rendering_kwargs.avg_camera_radius: got {radius!r}, expected a positive number")
    return CameraRig(pivot_t, radius_f)  # type: ignore[arg-type]


def check_label(c: torch.Tensor) -> None:
    """Raise ValueError unless `c` is an (N, 25) camera label batch."""
    if c.ndim != 2 or c.shape[1] != LABEL_DIM:
        raise ValueError(f"camera label: got shape {tuple(c.shape)}, expected (N, {LABEL_DIM})")


def camera_angles(c: torch.Tensor, pivot: Sequence[float] = FFHQ_PIVOT) -> tuple[torch.Tensor, torch.Tensor]:
    """(yaw, pitch) in degrees of each camera's position, inverse of `lookat_camera`. c: (N, 25).

    Read from the camera origin, so it holds for any camera on EG3D's sphere.
    """
    check_label(c)
    origin = c[:, :16].reshape(-1, 4, 4)[:, :3, 3].to(torch.float64)
    radius = origin.norm(dim=-1)
    phi = torch.arccos(torch.clamp(origin[:, 1] / radius, -1.0, 1.0))
    eg3d_pitch = (1 - torch.cos(phi)) / 2 * math.pi
    eg3d_yaw = math.pi - torch.atan2(origin[:, 2], origin[:, 0])
    yaw = torch.rad2deg(eg3d_yaw - math.pi / 2)
    pitch = torch.rad2deg(math.pi / 2 - eg3d_pitch)
    return yaw.float(), pitch.float()


_MIRROR = torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0], dtype=torch.float64))


def mirror_camera(c: torch.Tensor) -> torch.Tensor:
    """The camera that sees the left-right mirror image: world x and camera x both negated.

    For a LookAt camera this is exactly the camera at -yaw, same pitch. c: (N, 25) -> (N, 25).
    """
    check_label(c)
    cam2world = c[:, :16].reshape(-1, 4, 4).to(torch.float64)
    flip = _MIRROR.to(cam2world.device)
    mirrored = flip @ cam2world @ flip
    return torch.cat([mirrored.reshape(-1, 16).to(c.dtype), c[:, 16:]], dim=1)

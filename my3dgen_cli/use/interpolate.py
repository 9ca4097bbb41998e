"""Morphing between latents (and their cameras) along a path of key frames.

    ws, cams = interpolate_path([ws_a, ws_b], [cam_a, cam_b], frames=30, mode="slerp")

Frames are spread evenly over the path's parameter t in [0, K-1] for K keys: frame 0 is exactly
key 0 and the last frame exactly key K-1. Latents: "linear" lerps each w row; "slerp" walks the
great circle of each row about the mean of the keys (so the path keeps the keys' distance from
the centre instead of cutting through it), falling back to lerp for nearly parallel rows.
Cameras: yaw and pitch are interpolated linearly (degrees) and rebuilt as LookAt cameras on the
base's rig (its pivot and radius); an explicit yaw sweep replaces the interpolated yaw.
"""

from __future__ import annotations

import torch

from my3dgen_cli.eg3d.camera import CameraRig, camera_angles, camera_rig

MODES = ("linear", "slerp")


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation of the last dimension, magnitudes interpolated linearly. a, b: [..., D]."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(eps), b / nb.clamp_min(eps)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    near = sin.abs() < 1e-4
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / safe)
    wb = torch.where(near, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(eps)
    return direction * lerp(na, nb, t)


def frame_times(keys: int, frames: int) -> list[float]:
    """`frames` values evenly spread over [0, keys - 1] (both ends included)."""
    if keys < 2:
        raise ValueError(f"interpolation: got {keys} keys, expected 2 or more")
    if frames < 2:
        raise ValueError(f"frames: got {frames}, expected 2 or more")
    return [(keys - 1) * k / (frames - 1) for k in range(frames)]


def interpolate_latents(keys: list[torch.Tensor], frames: int, mode: str = "linear") -> torch.Tensor:
    """keys: K tensors [1, num_ws, w_dim] -> [frames, num_ws, w_dim]."""
    if mode not in MODES:
        raise ValueError(f"mode: got {mode!r}, expected one of {MODES}")
    stack = torch.cat([k.float() for k in keys])  # [K, num_ws, w_dim]
    centre = stack.mean(0)
    out = []
    for t in frame_times(len(keys), frames):
        i = min(int(t), len(keys) - 2)
        u = t - i
        a, b = stack[i], stack[i + 1]
        if u == 0.0:
            out.append(a)
        elif u == 1.0:
            out.append(b)
        elif mode == "linear":
            out.append(lerp(a, b, u))
        else:
            out.append(centre + slerp(a - centre, b - centre, u))
    return torch.stack(out)


def interpolate_cameras(keys: torch.Tensor, frames: int, yaw_sweep: tuple[float, float] | None = None,
                        rig: CameraRig | None = None) -> torch.Tensor:
    """keys: cameras [K, 25] -> [frames, 25]; yaw_sweep (from, to) in degrees overrides the yaw.

    rig: the base's camera rig (`camera_rig(G)`) the in-between cameras are built on; None = FFHQ's.
    """
    yaws, pitches = camera_angles(keys)
    times = frame_times(keys.shape[0], frames)
    out_yaw, out_pitch = [], []
    for k, t in enumerate(times):
        i = min(int(t), keys.shape[0] - 2)
        u = t - i
        out_pitch.append(float(lerp(pitches[i], pitches[i + 1], u)))
        if yaw_sweep is None:
            out_yaw.append(float(lerp(yaws[i], yaws[i + 1], u)))
        else:
            out_yaw.append(yaw_sweep[0] + (yaw_sweep[1] - yaw_sweep[0]) * k / (frames - 1))
    cams = camera_rig(rig).lookat(out_yaw, out_pitch)
    if yaw_sweep is None:  # key frames use the keys' own cameras, bit for bit
        for k, t in enumerate(times):
            if float(t).is_integer():
                cams[k] = keys[int(t)].float()
    return cams

"""Rendering latents from many cameras: angle lists, orbits, batched views, depth.

    ws = latent_from_seed(G, 7, truncation=0.7)            # [1, num_ws, w_dim]
    cams, angles = cameras_for(parse_angles("-30:30:7"), [0.0], G)   # on G's own camera pivot/radius
    views = render_views(G, ws, cams, batch=4)
    views.images   # [N, 3, H, W] in [-1, 1]   views.depth  # [N, 1, r, r] in scene units

The backbone runs once per latent (`G.planes`); only the renderer and superresolution run per
view. Angles are degrees in camera.py's convention (yaw 0, pitch 0 = frontal; yaw > 0 shows the
subject's left cheek; pitch > 0 looks down on the face), on the base's camera rig (the pivot and
radius of its rendering_kwargs: `camera_rig(G)`). Sampling is deterministic, so the same latent
and camera always give the same pixels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from my3dgen_cli.eg3d.camera import CameraRig, camera_rig, check_label
from my3dgen_cli.errors import UserInputError

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)"
MAX_DEGREES = 180.0  # every angle option (render, interpolate, invert) stays within [-180, 180]
MAX_ANGLES = 10_000  # views per start:stop:count (a typo such as -30:30:10000000 would fill the memory)


def parse_angles(spec: str, name: str = "angle") -> list[float]:
    """Degrees from "30", "-30,0,30" or "start:stop:count" (inclusive, count >= 1); parts can mix."""
    values: list[float] = []
    for part in str(spec).split(","):
        part = part.strip()
        if re.fullmatch(_NUMBER, part):
            values.append(float(part))
            continue
        m = re.fullmatch(rf"({_NUMBER}):({_NUMBER}):(\d+)", part)
        if not m:
            raise UserInputError(f"--{name}: got {part!r}, expected degrees like 30, -30,0,30 or -30:30:7")
        start, stop, count = float(m.group(1)), float(m.group(2)), int(m.group(3))
        if not 1 <= count <= MAX_ANGLES:
            raise UserInputError(f"--{name}: got count {count} in {part!r}, expected 1..{MAX_ANGLES}")
        values += [start] if count == 1 else [start + (stop - start) * k / (count - 1) for k in range(count)]
    for v in values:
        check_degrees(v, name)
    return values


def check_degrees(value: float, name: str = "angle") -> float:
    """One angle limit for every command: finite and within [-MAX_DEGREES, MAX_DEGREES]."""
    if not math.isfinite(value) or abs(value) > MAX_DEGREES:
        raise UserInputError(f"--{name}: got {value:g}, expected degrees within [-{MAX_DEGREES:g}, {MAX_DEGREES:g}]")
    return value


def parse_sweep(spec: str, name: str = "yaw") -> tuple[float, float]:
    """An angle sweep "FROM:TO" in degrees (interpolate's --yaw), with parse_angles' number form and limits."""
    m = re.fullmatch(rf"\s*({_NUMBER})\s*:\s*({_NUMBER})\s*", str(spec))
    if not m:
        raise UserInputError(f"--{name}: got {spec!r}, expected FROM:TO degrees like -30:30")
    return check_degrees(float(m.group(1)), name), check_degrees(float(m.group(2)), name)


def cameras_for(yaws: list[float], pitches: list[float], rig: CameraRig | nn.Module | None = None
                ) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Every (yaw, pitch) pair, pitch-major: (cameras [N, 25], angles).

    rig: a generator (its own pivot and radius), a CameraRig, or None for FFHQ's.
    """
    pairs = [(y, p) for p in pitches for y in yaws]
    cams = camera_rig(rig).lookat([y for y, _ in pairs], [p for _, p in pairs])
    return cams, pairs


def orbit_angles(frames: int, yaw_range: float = 30.0, pitch_range: float = 10.0) -> list[tuple[float, float]]:
    """A closed loop of `frames` views: yaw = A sin(2 pi t), pitch = B cos(2 pi t) (EG3D's video path)."""
    if frames < 1:
        raise UserInputError(f"--orbit: got {frames} frames, expected 1 or more")
    return [(yaw_range * math.sin(2 * math.pi * k / frames), pitch_range * math.cos(2 * math.pi * k / frames))
            for k in range(frames)]


@torch.no_grad()
def latent_from_seed(G: nn.Module, seed: int, truncation: float = 0.7) -> torch.Tensor:
    """ws [1, num_ws, w_dim] for a seed: z ~ N(0, I) from torch.Generator(seed), conditioned on G's frontal camera."""
    device = G.backbone.mapping.w_avg.device
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(1, G.z_dim, generator=gen).to(device)
    return G.mapping(z, camera_rig(G).frontal().to(device), truncation_psi=truncation)


@dataclass
class Views:
    images: torch.Tensor  # [N, 3, H, W] in [-1, 1]
    depth: torch.Tensor  # [N, 1, r, r] scene units along the ray
    cameras: torch.Tensor  # [N, 25]


@torch.no_grad()
def render_views(G: nn.Module, ws: torch.Tensor, cameras: torch.Tensor, batch: int = 8,
                 planes: torch.Tensor | None = None, on_batch=None, *, amp: str | bool = "off",
                 compile: bool = False, channels_last: bool | None = None) -> Views:
    """Render one latent ws [1, num_ws, w_dim] from cameras [N, 25], `batch` views per pass.

    amp: "off" (exact fp32), "bf16" or "fp16" (CUDA) autocast (speed.autocast); compile: run a
    torch.compile'd synthesis (built once per generator; pays off from a few dozen views). Outputs
    stay on the device until the end (one copy to the host, no sync per batch). channels_last: NHWC
    convolutions (same values up to float order); None = on with autocast on CUDA
    (speed.use_channels_last).
    """
    from my3dgen_cli.speed import autocast, compiled_synthesis, use_channels_last

    check_label(cameras)
    if ws.ndim != 3 or ws.shape[0] != 1:
        raise ValueError(f"ws: got shape {list(ws.shape)}, expected [1, num_ws, w_dim]")
    if batch < 1:
        raise UserInputError(f"--batch: got {batch}, expected 1 or more")
    cameras = cameras.to(ws.device)
    synth = compiled_synthesis(G) if compile else G.synthesis
    nhwc = use_channels_last(channels_last, ws.device, amp)
    images, depths = [], []
    with autocast(ws.device, amp):
        if planes is None:
            planes = G.planes(ws, noise_mode="const", channels_last=nhwc)
        for start in range(0, cameras.shape[0], batch):
            c = cameras[start:start + batch]
            n = c.shape[0]
            out = synth(ws.expand(n, -1, -1), c, noise_mode="const", sampling="deterministic",
                        planes=planes.expand(n, -1, -1, -1, -1), channels_last=nhwc)
            images.append(out["image"].float())
            depths.append(out["image_depth"].float())
            if on_batch is not None:
                on_batch(n)
    return Views(torch.cat(images).cpu(), torch.cat(depths).cpu(), cameras.cpu())


def angle_tag(yaw: float, pitch: float) -> str:
    """File-name tag of a view: yaw+030_pitch-010 (integers when the angles are)."""
    def fmt(v: float) -> str:
        return f"{v:+04.0f}" if float(v).is_integer() else f"{v:+06.1f}"

    return f"yaw{fmt(yaw)}_pitch{fmt(pitch)}"

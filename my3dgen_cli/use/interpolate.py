"""Morphing between latents (and their cameras) along a path of key frames.

    ws, cams = interpolate_path([ws_a, ws_b], [cam_a, cam_b], frames=30, mode="slerp")

Frames are spread evenly over the path's parameter t in [0, K-1] for K keys: frame 0 is exactly
key 0 and the last frame exactly key K-1. Latents: "linear" lerps each w row; "slerp" walks the
great circle of each row about the mean of the keys (so the path keeps the keys' distance from
the centre instead of cutting through it), falling back to lerp for nearly parallel rows.
Cameras: yaw and pitch are interpolated linearly (degrees) and rebuilt as LookAt cameras on the
base's rig (its pivot and radius); an explicit yaw sweep replaces the interpolated yaw.
`run_interpolate(InterpolatePlan(...))` is `my3dgen interpolate`: keys in, frames and videos out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from my3dgen_cli.eg3d.camera import CameraRig, camera_angles, camera_rig
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.output import Output
from my3dgen_cli.use.sources import ModelChoice

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


@dataclass(frozen=True)
class InterpolatePlan:
    """What `my3dgen interpolate` was asked for: the keys, the path, where the frames and videos go.

    keys: .latent/.npy files, anchor:K (of model.identity) or seed:S, two or more. `out`: a folder
    (default ./interpolation: frames, video, gif and strip) or one .mp4/.gif (the video alone).
    """

    model: ModelChoice
    keys: tuple[str, ...]
    frames: int = 30
    mode: str = "linear"
    space: str = "w+"  # w+: per layer; w: each key's rows replaced by their mean
    yaw_sweep: tuple[float, float] | None = None
    frontal: bool = False  # every frame on the frontal camera (the keys' own cameras ignored)
    truncation: float = 0.7
    fps: float = 24.0
    strip: int = 8
    batch: int = 8
    out: Path | None = None
    force: bool = False

    def outputs(self) -> list[tuple[str, Path]]:
        """(kind, path) of every file: the frames first, then video, gif and strip (or the video alone)."""
        if len(self.keys) < 2:
            raise UserInputError(f"got {len(self.keys)} latent(s), expected 2 or more to interpolate between")
        if self.out is not None and self.out.suffix.lower() in (".mp4", ".gif"):
            return [("video" if self.out.suffix.lower() == ".mp4" else "gif", self.out)]
        if self.out is not None and self.out.suffix:
            raise UserInputError(f"-o {self.out}: expected a .mp4 or .gif file (the video alone) or a folder (frames, "
                                 "video, gif and strip)")
        folder = self.out if self.out is not None else Path("interpolation")
        plan = [("frame", folder / f"frame_{k:04d}.png") for k in range(self.frames)]
        return plan + [("video", folder / "interpolation.mp4"), ("gif", folder / "interpolation.gif"),
                       ("strip", folder / "strip.png")]


@dataclass
class InterpolateResult:
    base: str
    plan: InterpolatePlan
    keys: list[str]  # the keys' names (file stems, anchorK, seedS)
    outputs: list[tuple[str, Path]]  # (kind, path) of every file written

    def to_dict(self) -> dict[str, Any]:
        p = self.plan
        return {"base": self.base, "identity": p.model.identity, "keys": self.keys, "frames": p.frames,
                "mode": p.mode, "space": p.space, "yaw_sweep": p.yaw_sweep,
                "outputs": [{"kind": k, "path": str(path)} for k, path in self.outputs]}


def run_interpolate(plan: InterpolatePlan, output: Output | None = None) -> InterpolateResult:
    """Render the morph of `plan` and write its files (all checked free before the model opens)."""
    from my3dgen_cli import media
    from my3dgen_cli.fileio import check_free
    from my3dgen_cli.speed import use_channels_last
    from my3dgen_cli.use.sources import check_latent_files, resolve_key

    if plan.mode not in MODES:
        raise UserInputError(f"--mode: got {plan.mode!r}, expected one of {', '.join(MODES)}")
    files = plan.outputs()
    recorded_base = check_latent_files(plan.keys)
    check_free([p for _, p in files], plan.force)
    G, ref, dev = plan.model.or_base(recorded_base).open()
    resolved = [resolve_key(k, G, plan.model.identity, dev, plan.truncation) for k in plan.keys]
    latents = [ws for _, ws, _ in resolved]
    if plan.space == "w":
        latents = [ws.mean(1, keepdim=True).expand_as(ws) for ws in latents]
    rig = camera_rig(G)
    key_cams = torch.cat([cam if cam is not None and not plan.frontal else rig.frontal().to(dev)
                          for _, _, cam in resolved])
    ws_path = interpolate_latents(latents, plan.frames, plan.mode)
    cams = interpolate_cameras(key_cams.cpu(), plan.frames, plan.yaw_sweep, rig).to(dev)
    nhwc = use_channels_last(None, dev, "off", resolution=G.img_resolution)  # the layout this CPU renders fastest
    images = []
    with (output or Output("quiet")).progress() as bar, torch.no_grad():
        task = bar.add_task("interpolating", total=plan.frames, status="")
        for start in range(0, plan.frames, plan.batch):
            ws_b, c_b = ws_path[start:start + plan.batch].to(dev), cams[start:start + plan.batch]
            out_b = G.synthesis(ws_b, c_b, noise_mode="const", sampling="deterministic", channels_last=nhwc)["image"]
            images += [media.to_uint8(x) for x in out_b]
            bar.advance(task, len(ws_b))
    if len(files) == 1:
        (kind, path), = files
        (media.write_mp4 if kind == "video" else media.write_gif)(path, images, plan.fps)
    else:
        frames = plan.frames
        for (_, path), img in zip(files[:frames], images, strict=True):
            media.write_png(path, img)
        media.write_mp4(files[frames][1], images, plan.fps)
        media.write_gif(files[frames + 1][1], images, plan.fps)
        n = max(2, min(plan.strip, frames))
        picks = sorted({round(k * (frames - 1) / (n - 1)) for k in range(n)})
        media.write_png(files[frames + 2][1], media.grid([images[k] for k in picks]))
    return InterpolateResult(ref.name, plan, [name for name, _, _ in resolved], files)

"""`my3dgen interpolate`: morph between latents (files, anchors, seeds) with frames, video and strip."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command
from my3dgen_cli.commands.options import (
    BATCH_RANGE,
    FPS_RANGE,
    MAX_FRAMES,
    TRUNCATION_RANGE,
    ModelOptions,
    check_free,
    check_range,
    model_options,
    written,
)
from my3dgen_cli.errors import UserInputError


@command("interpolate", help="Morph between latents A B [C...] (.latent or .npy files, anchor:K or seed:S). "
                              "-o morph.mp4 (or .gif) writes the video alone; -o FOLDER writes frames, video, gif "
                              "and strip.")
@model_options()
def interpolate(
    opts: ModelOptions,
    keys: Annotated[list[str], typer.Argument(help="Two or more: a .latent or .npy file, anchor:K or seed:S "
                                                   "(K and S also 1,5,9, 0-3 or 0:3; ranges include both ends).")],
    frames: Annotated[int, typer.Option("--frames", help="Frames in all, both ends included.")] = 30,
    mode: Annotated[str, typer.Option("--mode", help="linear or slerp.")] = "linear",
    space: Annotated[str, typer.Option("--space", help="w+ (per layer) or w (the rows' mean).")] = "w+",
    yaw: Annotated[str | None, typer.Option("--yaw", help="Sweep the yaw FROM:TO degrees while morphing.")] = None,
    frontal: Annotated[bool, typer.Option("--frontal", help="Render every frame frontal (ignore the keys' cameras).")
                       ] = False,
    truncation: Annotated[float, typer.Option("--truncation", help="Truncation psi for seed:S keys.")] = 0.7,
    fps: Annotated[float, typer.Option("--fps", help="Video frame rate.")] = 24.0,
    strip: Annotated[int, typer.Option("--strip", help="Frames shown in the strip image (evenly spaced).")] = 8,
    batch: Annotated[int, typer.Option("--batch", help="Frames rendered per forward pass.")] = 8,
) -> None:
    import torch

    from my3dgen_cli import media
    from my3dgen_cli.commands.options import check_latent_files, expand_keys, resolve_key
    from my3dgen_cli.eg3d.camera import camera_rig
    from my3dgen_cli.use.interpolate import MODES, interpolate_cameras, interpolate_latents
    from my3dgen_cli.use.render import parse_sweep

    output = opts.output()
    keys = expand_keys(keys)
    if len(keys) < 2:
        raise UserInputError(f"got {len(keys)} latent(s), expected 2 or more to interpolate between")
    check_range("--frames", frames, 2, MAX_FRAMES)
    check_range("--truncation", truncation, *TRUNCATION_RANGE)
    check_range("--fps", fps, *FPS_RANGE)
    check_range("--strip", strip, 2, MAX_FRAMES)
    check_range("--batch", batch, *BATCH_RANGE)
    if mode not in MODES:
        raise UserInputError(f"--mode: got {mode!r}, expected one of {', '.join(MODES)}")
    if space not in ("w", "w+"):
        raise UserInputError(f"--space: got {space!r}, expected w or w+")
    sweep = None if yaw is None else parse_sweep(yaw, "yaw")
    video_only = opts.out is not None and opts.out.suffix.lower() in (".mp4", ".gif")
    if opts.out is not None and opts.out.suffix and not video_only:
        raise UserInputError(f"-o {opts.out}: expected a .mp4 or .gif file (the video alone) or a folder (frames, "
                             "video, gif and strip)")
    check_latent_files(keys)
    if video_only:
        plan = [("video" if opts.out.suffix.lower() == ".mp4" else "gif", opts.out)]
    else:
        folder = opts.out if opts.out is not None else Path("interpolation")
        plan = [("frame", folder / f"frame_{k:04d}.png") for k in range(frames)]
        plan += [("video", folder / "interpolation.mp4"), ("gif", folder / "interpolation.gif"),
                 ("strip", folder / "strip.png")]
    check_free([p for _, p in plan], opts.force)

    G, ref, dev = opts.open()
    resolved = [resolve_key(k, G, opts.identity, dev, truncation) for k in keys]
    latents = [ws for _, ws, _ in resolved]
    if space == "w":
        latents = [ws.mean(1, keepdim=True).expand_as(ws) for ws in latents]
    rig = camera_rig(G)
    key_cams = torch.cat([cam if cam is not None and not frontal else rig.frontal().to(dev)
                          for _, _, cam in resolved])
    ws_path = interpolate_latents(latents, frames, mode)
    cams = interpolate_cameras(key_cams.cpu(), frames, sweep, rig).to(dev)
    images = []
    with output.progress() as bar, torch.no_grad():
        task = bar.add_task("interpolating", total=frames, status="")
        for start in range(0, frames, batch):
            ws_b, c_b = ws_path[start:start + batch].to(dev), cams[start:start + batch]
            out_b = G.synthesis(ws_b, c_b, noise_mode="const", sampling="deterministic")["image"]
            images += [media.to_uint8(x) for x in out_b]
            bar.advance(task, len(ws_b))
    if video_only:
        (kind, path), = plan
        (media.write_mp4 if kind == "video" else media.write_gif)(path, images, fps)
        shown = plan
    else:
        for (_, path), img in zip(plan[:frames], images, strict=True):
            media.write_png(path, img)
        media.write_mp4(plan[frames][1], images, fps)
        media.write_gif(plan[frames + 1][1], images, fps)
        n = max(2, min(strip, frames))
        picks = sorted({round(k * (frames - 1) / (n - 1)) for k in range(n)})
        media.write_png(plan[frames + 2][1], media.grid([images[k] for k in picks]))
        shown = plan[frames:] + [("frames", folder / f"frame_0000..{frames - 1:04d}.png")]
    output.result({"base": ref.name, "identity": opts.identity, "keys": [name for name, _, _ in resolved],
                   "frames": frames, "mode": mode, "space": space, "yaw_sweep": sweep,
                   "outputs": [{"kind": k, "path": str(p)} for k, p in plan]},
                  human=written(shown))

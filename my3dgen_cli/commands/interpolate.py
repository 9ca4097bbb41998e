"""`my3dgen interpolate`: morph between latents (files, anchors, seeds) with frames, video and strip."""

from __future__ import annotations

from typing import Annotated

import typer

from my3dgen_cli.cli import command
from my3dgen_cli.commands.options import (
    BATCH_RANGE,
    FPS_RANGE,
    MAX_FRAMES,
    TRUNCATION_RANGE,
    Blend,
    ModelOptions,
    Space,
    check_range,
    model_options,
    written,
)


@command("interpolate", help="Morph between latents A B [C...] (.latent or .npy files, anchor:K or seed:S). "
                              "-o morph.mp4 (or .gif) writes the video alone; -o FOLDER writes frames, video, gif "
                              "and strip.")
@model_options()
def interpolate(
    opts: ModelOptions,
    keys: Annotated[list[str], typer.Argument(help="Two or more: a .latent or .npy file, anchor:K or seed:S "
                                                   "(K and S also 1,5,9, 0-3 or 0:3; ranges include both ends).")],
    frames: Annotated[int, typer.Option("--frames", help="Frames in all, both ends included.")] = 30,
    mode: Annotated[Blend, typer.Option("--mode", help="linear or slerp.")] = Blend.linear,
    space: Annotated[Space, typer.Option("--space", help="w+ (per layer) or w (the rows' mean).")] = Space.w_plus,
    yaw: Annotated[str | None, typer.Option("--yaw", help="Sweep the yaw FROM:TO degrees while morphing.")] = None,
    frontal: Annotated[bool, typer.Option("--frontal", help="Render every frame frontal (ignore the keys' cameras).")
                       ] = False,
    truncation: Annotated[float, typer.Option("--truncation", help="Truncation psi for seed:S keys.")] = 0.7,
    fps: Annotated[float, typer.Option("--fps", help="Video frame rate.")] = 24.0,
    strip: Annotated[int, typer.Option("--strip", help="Frames shown in the strip image (evenly spaced).")] = 8,
    batch: Annotated[int, typer.Option("--batch", help="Frames rendered per forward pass.")] = 8,
) -> None:
    from my3dgen_cli.commands.options import expand_keys
    from my3dgen_cli.use.interpolate import InterpolatePlan, run_interpolate
    from my3dgen_cli.use.render import parse_sweep

    keys = expand_keys(keys)
    check_range("--frames", frames, 2, MAX_FRAMES)
    check_range("--truncation", truncation, *TRUNCATION_RANGE)
    check_range("--fps", fps, *FPS_RANGE)
    check_range("--strip", strip, 2, MAX_FRAMES)
    check_range("--batch", batch, *BATCH_RANGE)
    sweep = None if yaw is None else parse_sweep(yaw, "yaw")
    plan = InterpolatePlan(opts.model(), tuple(keys), frames=frames, mode=mode.value, space=space.value,
                           yaw_sweep=sweep, frontal=frontal, truncation=truncation, fps=fps, strip=strip, batch=batch,
                           out=opts.out, force=opts.force)
    output = opts.output()
    result = run_interpolate(plan, output)
    shown = result.outputs
    if len(shown) > 1:  # the frames as one line
        shown = shown[frames:] + [("frames", shown[0][1].parent / f"frame_0000..{frames - 1:04d}.png")]
    output.result(result.to_dict(), human=written(shown))

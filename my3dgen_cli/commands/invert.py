"""`my3dgen invert`: photos -> latents of the personalized (or base) generator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command
from my3dgen_cli.commands.options import (
    LR_RANGE,
    MAX_RANK,
    MAX_STEPS,
    InvertInit,
    ModelOptions,
    Space,
    check_range,
    model_options,
    written,
)


@command("invert", help="Find the latent that renders a photo: crop + camera, then optimize (w or w+).")
@model_options(adapter=False)
def invert(
    opts: ModelOptions,
    images: Annotated[list[Path], typer.Argument(help="Photos, or aligned crops with --yaw/--pitch or --labels.")],
    steps: Annotated[int, typer.Option("--steps", help="Optimization steps.")] = 300,
    space: Annotated[Space, typer.Option("--space", help="w (one vector) or w+ (one per layer).")] = Space.w_plus,
    init: Annotated[InvertInit, typer.Option("--init", help="Start from the anchors' mean or the nearest one.")
                    ] = InvertInit.mean,
    hull: Annotated[bool, typer.Option("--hull", help="Stay inside the anchors' convex hull (softmax weights).")
                    ] = False,
    refine_camera: Annotated[bool, typer.Option("--refine-camera", help="Also optimize a small camera turn.")
                             ] = False,
    tune: Annotated[int, typer.Option("--tune", help="PTI: then tune the adapter N steps for this image only.")] = 0,
    tune_rank: Annotated[int, typer.Option("--tune-rank", help="Rank of a fresh adapter when tuning a bare base.")
                         ] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Latent learning rate.")] = 0.02,
    yaw: Annotated[float | None, typer.Option("--yaw", help="Camera yaw (degrees) of aligned crops.")] = None,
    pitch: Annotated[float | None, typer.Option("--pitch", help="Camera pitch (degrees) of aligned crops.")] = None,
    labels: Annotated[Path | None, typer.Option("--labels", help="dataset.json with the crops' cameras.")] = None,
    use_lpips: Annotated[bool, typer.Option("--lpips/--no-lpips", help="LPIPS-VGG loss (if cached).")] = True,
) -> None:
    from my3dgen_cli.use.invert import InvertConfig, InvertPlan, run_invert
    from my3dgen_cli.use.render import check_degrees

    check_range("--steps", steps, 0, MAX_STEPS)
    check_range("--tune", tune, 0, MAX_STEPS)
    check_range("--tune-rank", tune_rank, 1, MAX_RANK)
    check_range("--lr", lr, *LR_RANGE)
    for name, angle in (("yaw", yaw), ("pitch", pitch)):
        if angle is not None:
            check_degrees(angle, name)
    cfg = InvertConfig(steps=steps, space=space.value, init=init.value, hull=hull, refine_camera=refine_camera, lr=lr)
    plan = InvertPlan(opts.model(), tuple(images), cfg, tune=tune, tune_rank=tune_rank, yaw=yaw, pitch=pitch,
                      labels=labels, use_lpips=use_lpips, out=opts.out, force=opts.force)
    output = opts.output()
    run = run_invert(plan, output)
    lines = [f"{e['image']}: PSNR {e['psnr']:.2f} dB" + (f", LPIPS {e['lpips']:.4f}" if e["lpips"] is not None else "")
             + (f"; tuned PSNR {e['tuned_psnr']:.2f} dB" if "tuned_psnr" in e else "") for e in run.results]
    output.result(run.to_dict(), human="\n".join(lines + [written(run.outputs)]))

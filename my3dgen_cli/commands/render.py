"""`my3dgen render`: images, depth maps, orbit videos, contact sheets and meshes of latents."""

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
    Amp,
    ModelOptions,
    check_range,
    model_options,
    parse_indices,
    written,
)


@command("render", help="Render a latent, an identity anchor or a seed: views, depth, orbit video, grid, mesh.")
@model_options()
def render(
    opts: ModelOptions,
    latent: Annotated[list[Path] | None, typer.Option(
        "--latent", help="A .latent or .npy (EG3D projector / My3DGen) file; repeatable.")] = None,
    anchor: Annotated[str | None, typer.Option("--anchor", help="Anchor index/indices of --identity: 3, 0,2, 0-3 or "
                                                                "0:3 (ranges include both ends).")] = None,
    seed: Annotated[str | None, typer.Option("--seed", help="Seed(s) of random faces: 7, 1,5,9, 0-3 (EG3D's "
                                                            "gen_samples.py form) or 0:3; ranges include both ends.")
                    ] = None,
    truncation: Annotated[float, typer.Option("--truncation", help="Truncation psi for seeds.")] = 0.7,
    yaw: Annotated[str, typer.Option("--yaw", help="Degrees: 30, -30,0,30 or start:stop:count.")] = "0",
    pitch: Annotated[str, typer.Option("--pitch", help="Degrees, same forms as --yaw.")] = "0",
    own_camera: Annotated[bool, typer.Option("--own-camera", help="Render latents/anchors from their stored camera.")
                          ] = False,
    orbit: Annotated[int | None, typer.Option("--orbit", help="Write an orbit video of N frames (MP4 + GIF).")] = None,
    fps: Annotated[float, typer.Option("--fps", help="Video frame rate.")] = 24.0,
    depth: Annotated[bool, typer.Option("--depth", help="Also write depth maps (16-bit PNG + colour preview).")
                     ] = False,
    mesh: Annotated[Path | None, typer.Option("--mesh", help="Extract a vertex-coloured mesh to this .ply, .obj or "
                                                            ".glb file (.obj/.glb: the mesh extra).")] = None,
    mesh_res: Annotated[int, typer.Option("--mesh-res", help="Marching-cubes grid size per axis.")] = 128,
    mesh_level: Annotated[float, typer.Option("--mesh-level", help="Density level of the surface.")] = 10.0,
    ascii_ply: Annotated[bool, typer.Option("--ascii", help="Write the PLY as text instead of binary.")] = False,
    grid: Annotated[bool, typer.Option("--grid", help="Also write one contact sheet of every view.")] = False,
    batch: Annotated[int, typer.Option("--batch", help="Views rendered per forward pass.")] = 8,
    amp: Annotated[Amp, typer.Option("--amp", help="Autocast: off (exact fp32), bf16 (CUDA; CPUs with "
                                                   "AVX-512) or fp16 (CUDA; the official superresolution's "
                                                   "precision).")] = Amp.off,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the renderer (pays off for orbits).")
                        ] = False,
    channels_last: Annotated[bool | None, typer.Option(
        "--channels-last/--no-channels-last", help="NHWC memory for the convolutions (same images up to float "
        "order; default: on with --amp on CUDA, and for full-size bases on a CPU that measured it faster).",
        show_default=False)] = None,
) -> None:
    from my3dgen_cli.use.render import RenderPlan, parse_angles, run_render

    yaws, pitches = parse_angles(yaw, "yaw"), parse_angles(pitch, "pitch")
    anchors = parse_indices(anchor, "--anchor") if anchor else []
    seeds = parse_indices(seed, "--seed") if seed else []
    check_range("--truncation", truncation, *TRUNCATION_RANGE)
    check_range("--orbit", orbit, 2, MAX_FRAMES)
    check_range("--fps", fps, *FPS_RANGE)
    check_range("--mesh-res", mesh_res, 8, 512)
    check_range("--mesh-level", mesh_level)
    check_range("--batch", batch, *BATCH_RANGE)
    plan = RenderPlan(opts.model(), latents=tuple(latent or ()), anchors=tuple(anchors), seeds=tuple(seeds),
                      truncation=truncation, yaws=tuple(yaws), pitches=tuple(pitches), own_camera=own_camera,
                      orbit=orbit, fps=fps, depth=depth, mesh=mesh, mesh_res=mesh_res, mesh_level=mesh_level,
                      ascii_ply=ascii_ply, grid=grid, batch=batch, amp=amp.value, compile=compile_,
                      channels_last=channels_last, out=opts.out, force=opts.force)
    output = opts.output()
    result = run_render(plan, output)
    output.result(result.to_dict(), human=written(result.outputs))

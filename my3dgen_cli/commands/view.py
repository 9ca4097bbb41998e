"""`my3dgen view`: a local web page to turn a face, scrub between two latents and save what is shown."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from my3dgen_cli.cli import command
from my3dgen_cli.commands.options import (
    FPS_RANGE,
    MAX_FRAMES,
    TRUNCATION_RANGE,
    ModelOptions,
    check_range,
    model_options,
)
from my3dgen_cli.errors import My3DGenError

MISSING_EXTRA = 'my3dgen view needs its web server packages ({missing} missing): pip install "my3dgen[view]"'


def _check_extra() -> None:
    """Name the optional extra before anything slow happens (no torch imported yet)."""
    from importlib.util import find_spec

    missing = [name for name in ("starlette", "uvicorn") if find_spec(name) is None]
    if missing:
        raise My3DGenError(MISSING_EXTRA.format(missing=" and ".join(missing)))


@command("view", help="Open a generator in the browser: drag to turn the face, scrub between two latents, "
                       "RGB or depth, save the PNG or an orbit MP4 (into -o, default ./renders).")
@model_options()
def view(
    opts: ModelOptions,
    latent: Annotated[list[Path] | None, typer.Option(
        "--latent", help="A .latent or .npy file (give two to interpolate).")] = None,
    anchor: Annotated[str | None, typer.Option("--anchor", help="Anchor(s) of --identity: 3 or 0,3.")] = None,
    seed: Annotated[str | None, typer.Option("--seed", help="Seed(s) of random faces: 7 or 1,2.")] = None,
    truncation: Annotated[float, typer.Option("--truncation", help="Starting truncation psi for seeds.")] = 0.7,
    host: Annotated[str | None, typer.Option("--host", help="Listen on this address instead of 127.0.0.1 "
                                                            "(others on the network can then reach it).",
                                             show_default=False)] = None,
    port: Annotated[int, typer.Option("--port", help="Port (0: a free one).")] = 0,
    no_browser: Annotated[bool, typer.Option("--no-browser", help="Print the URL only; do not open a browser.")
                          ] = False,
    orbit_frames: Annotated[int, typer.Option("--orbit-frames", help="Frames of a saved orbit video.")] = 48,
    fps: Annotated[float, typer.Option("--fps", help="Frame rate of a saved orbit video.")] = 24.0,
) -> None:
    import sys

    _check_extra()
    from my3dgen_cli.commands.options import parse_indices
    from my3dgen_cli.view.session import ViewPlan, run_view

    output = opts.output()
    check_range("--port", port, 0, 65535)
    check_range("--orbit-frames", orbit_frames, 2, MAX_FRAMES)
    check_range("--fps", fps, *FPS_RANGE)
    check_range("--truncation", truncation, *TRUNCATION_RANGE)
    plan = ViewPlan(opts.model(), latents=tuple(latent or ()),
                    anchors=tuple(parse_indices(anchor, "--anchor") if anchor else ()),
                    seeds=tuple(parse_indices(seed, "--seed") if seed else ()), truncation=truncation,
                    host=host or "127.0.0.1", port=port, open_browser=not no_browser, orbit_frames=orbit_frames,
                    fps=fps, out=opts.out, force=opts.force)

    def ready(info: dict) -> None:
        output.result(info, human=f"my3dgen view: {info['url']}\n(saves go to {info['out']}; Ctrl-C stops the server)")
        sys.stdout.flush()

    run_view(plan, ready, output)

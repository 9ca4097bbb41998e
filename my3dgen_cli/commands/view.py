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
    check_latent_files,
    check_range,
    model_options,
)
from my3dgen_cli.errors import My3DGenError, UserInputError

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
    import secrets
    import sys
    import threading
    import webbrowser

    _check_extra()
    from my3dgen_cli.view import server
    from my3dgen_cli.view.saves import Saver
    from my3dgen_cli.view.scene import Scene

    output = opts.output()
    check_range("--port", port, 0, 65535)
    check_range("--orbit-frames", orbit_frames, 2, MAX_FRAMES)
    check_range("--fps", fps, *FPS_RANGE)
    check_range("--truncation", truncation, *TRUNCATION_RANGE)
    check_latent_files(str(path) for path in latent or [])
    address = host or "127.0.0.1"
    sock = server.open_socket(address, port)  # before the slow model: a taken --port fails at once
    try:
        G, ref, dev = opts.open()
        scene = Scene(G, _sources(opts, G, dev, latent, anchor, seed, truncation))
        folder = opts.out if opts.out is not None else Path("renders")
        token = secrets.token_urlsafe(24)
        info = {"title": opts.identity or ref.name, "base": ref.name, "identity": opts.identity,
                "sources": [s.name for s in scene.sources], "seeds": scene.has_seed, "truncation": truncation,
                "neural_resolution": G.neural_rendering_resolution, "image_resolution": G.img_resolution,
                "out": str(folder)}
        app = server.build_app(scene, Saver(scene, folder, opts.force, orbit_frames, fps), token, info,
                               loopback=address in server.LOOPBACK_NAMES, truncation=truncation)
        url = server.url_of(sock, token)
        if address not in server.LOOPBACK_NAMES:
            output.warn(f"listening on {address}: anyone who can reach this machine and has the URL can use the "
                        "viewer and write files into its output folder")
        output.result({**info, "url": url, "device": str(dev)},
                      human=f"my3dgen view: {url}\n(saves go to {folder}; Ctrl-C stops the server)")
        sys.stdout.flush()
        uv = server.server_for(app)
        if not no_browser:
            threading.Thread(target=_open_when_started, args=(uv, url, webbrowser.open), daemon=True).start()
        try:
            uv.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn has shut down cleanly and re-raises the Ctrl-C: the normal end
            pass
        app.state.scheduler.close()
        output.info("stopped")
    finally:
        sock.close()


def _open_when_started(uv, url: str, open_url) -> None:
    import time

    for _ in range(600):
        if uv.started:
            open_url(url)
            return
        time.sleep(0.05)


def _sources(opts: ModelOptions, G, dev, latent: list[Path] | None, anchor: str | None, seed: str | None,
             truncation: float) -> list:
    """The latents named on the command line (default: anchor 0 of the identity, else seed 0)."""
    from my3dgen_cli.commands.options import anchor as get_anchor
    from my3dgen_cli.commands.options import parse_indices, resolve_key
    from my3dgen_cli.identity import identity_anchors
    from my3dgen_cli.view.scene import Source

    sources = [Source(name, ws=ws) for name, ws, _ in
               (resolve_key(str(path), G, opts.identity, dev, truncation) for path in latent or [])]
    sources += [Source(f"anchor{k}", ws=get_anchor(opts.identity, k, dev)[0])
                for k in (parse_indices(anchor, "--anchor") if anchor else [])]
    sources += [Source(f"seed{s}", seed=s) for s in (parse_indices(seed, "--seed") if seed else [])]
    if not sources:
        has_anchors = identity_anchors(opts.identity, dev)[0] is not None
        sources = [Source("anchor0", ws=get_anchor(opts.identity, 0, dev)[0]) if has_anchors
                   else Source("seed0", seed=0)]
    if len(sources) > 2:
        raise UserInputError(f"view shows one latent, or two to interpolate between; got {len(sources)} "
                             f"({', '.join(s.name for s in sources)})")
    return sources

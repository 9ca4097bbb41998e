"""One `my3dgen view` session: the latents to show, the generator, the local server until Ctrl-C.

    run_view(ViewPlan(ModelChoice(identity="ana")), on_ready=print)   # on_ready gets the URL and page info

The socket is opened before the (slow) model, so a taken --port fails at once. The browser is
opened only once the server answers.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from my3dgen_cli.errors import UserInputError
from my3dgen_cli.output import Output
from my3dgen_cli.use.sources import ModelChoice


@dataclass(frozen=True)
class ViewPlan:
    """What `my3dgen view` shows (one latent, or two to scrub between) and where it listens and saves."""

    model: ModelChoice
    latents: tuple[Path, ...] = ()
    anchors: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()
    truncation: float = 0.7
    host: str = "127.0.0.1"
    port: int = 0
    open_browser: bool = True
    orbit_frames: int = 48
    fps: float = 24.0
    out: Path | None = None  # saves go here (default ./renders)
    force: bool = False


def run_view(plan: ViewPlan, on_ready: Callable[[dict[str, Any]], None], output: Output | None = None) -> None:
    """Serve the viewer until Ctrl-C; `on_ready(info)` once it listens (info["url"] is the page's address)."""
    import webbrowser

    from my3dgen_cli.use.sources import check_latent_files
    from my3dgen_cli.view import server
    from my3dgen_cli.view.saves import Saver
    from my3dgen_cli.view.scene import Scene

    out = output or Output("quiet")
    recorded_base = check_latent_files(str(path) for path in plan.latents)
    sock = server.open_socket(plan.host, plan.port)  # before the slow model: a taken --port fails at once
    try:
        G, ref, dev = plan.model.or_base(recorded_base).open()
        scene = Scene(G, view_sources(plan, G, dev))
        folder = plan.out if plan.out is not None else Path("renders")
        token = secrets.token_urlsafe(24)
        info = {"title": plan.model.identity or ref.name, "base": ref.name, "identity": plan.model.identity,
                "sources": [s.name for s in scene.sources], "seeds": scene.has_seed, "truncation": plan.truncation,
                "neural_resolution": G.neural_rendering_resolution, "image_resolution": G.img_resolution,
                "out": str(folder)}
        loopback = plan.host in server.LOOPBACK_NAMES
        app = server.build_app(scene, Saver(scene, folder, plan.force, plan.orbit_frames, plan.fps), token, info,
                               loopback=loopback, truncation=plan.truncation)
        url = server.url_of(sock, token)
        if not loopback:
            out.warn(f"listening on {plan.host}: anyone who can reach this machine and has the URL can use the "
                     "viewer and write files into its output folder")
        on_ready({**info, "url": url, "device": str(dev)})
        uv = server.server_for(app)
        if plan.open_browser:
            threading.Thread(target=_open_when_started, args=(uv, url, webbrowser.open), daemon=True).start()
        try:
            uv.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn has shut down cleanly and re-raises the Ctrl-C: the normal end
            pass
        app.state.scheduler.close()
        out.info("stopped")
    finally:
        sock.close()


def _open_when_started(uv: Any, url: str, open_url: Callable[[str], Any]) -> None:
    for _ in range(600):
        if uv.started:
            open_url(url)
            return
        time.sleep(0.05)


def view_sources(plan: ViewPlan, G: Any, dev: Any) -> list:
    """The plan's latents as scene Sources (default: anchor 0 of the identity, else seed 0); at most two."""
    from my3dgen_cli.identity import identity_anchors
    from my3dgen_cli.use.sources import anchor, resolve_key
    from my3dgen_cli.view.scene import Source

    identity = plan.model.identity
    sources = [Source(name, ws=ws) for name, ws, _ in
               (resolve_key(str(path), G, identity, dev, plan.truncation) for path in plan.latents)]
    sources += [Source(f"anchor{k}", ws=anchor(identity, k, dev)[0]) for k in plan.anchors]
    sources += [Source(f"seed{s}", seed=s) for s in plan.seeds]
    if not sources:
        has_anchors = identity_anchors(identity, dev)[0] is not None
        sources = [Source("anchor0", ws=anchor(identity, 0, dev)[0]) if has_anchors else Source("seed0", seed=0)]
    if len(sources) > 2:
        raise UserInputError(f"view shows one latent, or two to interpolate between; got {len(sources)} "
                             f"({', '.join(s.name for s in sources)})")
    return sources

"""Shared by test_view*: a tiny generator's scene served by a real uvicorn on a free loopback port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from my3dgen_cli.use.render import latent_from_seed
from tests.render_fixtures import tiny_generator

TOKEN = "test-token-0123456789abcdef"


@dataclass
class LiveViewer:
    url: str  # http://127.0.0.1:PORT
    token: str
    app: Any
    scene: Any
    out: Path

    def page_url(self) -> str:
        return f"{self.url}/?token={self.token}"


def tiny_scene() -> Any:
    """A seed (its truncation live) and a fixed latent: the mix and truncation sliders both show."""
    from my3dgen_cli.view.scene import Scene, Source

    G = tiny_generator()
    return Scene(G, [Source("seed1", seed=1), Source("b", ws=latent_from_seed(G, 2))])


def serve(scene: Any, out: Path, orbit_frames: int = 4, title: str = "tiny") -> Iterator[LiveViewer]:
    """Run the viewer app on 127.0.0.1:<free port> in a thread for as long as the fixture lives."""
    from my3dgen_cli.view import server
    from my3dgen_cli.view.saves import Saver

    info = {"title": title, "sources": [s.name for s in scene.sources], "seeds": scene.has_seed, "truncation": 0.7}
    app = server.build_app(scene, Saver(scene, out, orbit_frames=orbit_frames), TOKEN, info)
    with server.running(app) as url:
        yield LiveViewer(url, TOKEN, app, scene, out)


@pytest.fixture(name="viewer")
def viewer_fixture(tmp_path: Path) -> Iterator[LiveViewer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores on the CI box
    try:
        yield from serve(tiny_scene(), tmp_path / "saved")
    finally:
        torch.set_num_threads(threads)

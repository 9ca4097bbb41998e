"""End to end: an official-format EG3D .pkl served over HTTP is fetched, converted once, and renders
exactly like the generator it was made from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from official_pkl import write_official_pkl
from typer.testing import CliRunner
from zoo_server import FileServer

from my3dgen_cli.cli import app
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.generators import open_generator
from tests.render_fixtures import assert_same_synthesis


def test_official_pkl_is_fetched_converted_and_renders_the_same(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(7)
    source = build_generator("tiny")
    config = source.config.to_dict()
    pkl = write_official_pkl(tmp_path / "tiny.pkl", source.state_dict(), config["init_kwargs"],
                             config["rendering_kwargs"], config["neural_rendering_resolution"])
    body = pkl.read_bytes()
    with FileServer() as server:
        server.state.files["/tiny.pkl"] = body
        registry = tmp_path / "lab.toml"
        registry.write_text(
            f'[[artifact]]\nname = "tiny-base"\nurl = "{server.url("/tiny.pkl")}"\nkind = "base-generator"\n'
            f'format = "eg3d-pkl"\nconfig = "tiny"\nlicense = "test"\n'
            f'sha256 = "{hashlib.sha256(body).hexdigest()}"\n'
        )
        monkeypatch.setenv("MY3DGEN_REGISTRY", str(registry))
        result = CliRunner().invoke(app, ["fetch", "tiny-base"])
        assert result.exit_code == 0, result.output

    monkeypatch.setenv("MY3DGEN_OFFLINE", "1")  # converted once: no network needed from now on
    G, base, adapter = open_generator(base="tiny-base")
    assert adapter is None and base.path.suffix == ".safetensors"
    assert_same_synthesis(G, source)

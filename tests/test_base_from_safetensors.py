"""End to end: a base generator published as a plain `.safetensors` (official tensor names, as a lab
registry would serve it) is fetched, converted once with the config its entry names, and renders
exactly like the generator it was made from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import save_file
from typer.testing import CliRunner
from zoo_server import FileServer

from my3dgen_cli.cli import app
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.generators import open_generator
from tests.render_fixtures import assert_same_synthesis


def _registry(tmp_path: Path, url: str, body: bytes, config: str = "tiny") -> Path:
    registry = tmp_path / "lab.toml"
    registry.write_text(
        f'[[artifact]]\nname = "tiny-st"\nurl = "{url}"\nkind = "base-generator"\n'
        f'format = "safetensors"\nconfig = "{config}"\nlicense = "test"\n'
        f'sha256 = "{hashlib.sha256(body).hexdigest()}"\n'
    )
    return registry


def test_safetensors_base_is_fetched_and_renders_the_same(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(5)
    source = build_generator("tiny")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    body = (tmp_path / "w.safetensors").read_bytes()
    with FileServer() as server:
        server.state.files["/tiny.safetensors"] = body
        monkeypatch.setenv("MY3DGEN_REGISTRY", str(_registry(tmp_path, server.url("/tiny.safetensors"), body)))
        result = CliRunner().invoke(app, ["fetch", "tiny-st", "--json"])
        assert result.exit_code == 0, result.output

    monkeypatch.setenv("MY3DGEN_OFFLINE", "1")  # fetched once: no network needed from now on
    G, base, adapter = open_generator(base="tiny-st")
    assert adapter is None and base.path.suffix == ".safetensors" and base.name == "tiny-st"
    assert_same_synthesis(G, source)
    out = tmp_path / "view.png"
    rendered = CliRunner().invoke(app, ["render", "--base", "tiny-st", "--seed", "1", "-o", str(out)])
    assert rendered.exit_code == 0, rendered.output
    assert out.is_file()


def test_safetensors_base_that_does_not_fit_its_config_is_one_line(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(5)
    state = build_generator("tiny").state_dict()
    state.pop("decoder.net.0.bias")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    body = (tmp_path / "w.safetensors").read_bytes()
    with FileServer() as server:
        server.state.files["/tiny.safetensors"] = body
        monkeypatch.setenv("MY3DGEN_REGISTRY", str(_registry(tmp_path, server.url("/tiny.safetensors"), body)))
        result = CliRunner().invoke(app, ["fetch", "tiny-st"])
    assert result.exit_code != 0
    assert "missing decoder.net.0.bias" in result.output and "Traceback" not in result.output

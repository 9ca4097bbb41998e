"""End to end: an official-format EG3D .pkl served over HTTP is fetched, converted once, and renders
exactly like the generator it was made from; the official training-loop snapshot fixture loads through
load_generator / --base and reproduces the official outputs, and is refused under a registry name of
another config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import SHARED
from official_pkl import write_official_pkl
from typer.testing import CliRunner
from zoo_server import FileServer, tree_listing

from my3dgen_cli import paths, zoo
from my3dgen_cli.cli import app
from my3dgen_cli.eg3d import build_generator, load_generator
from my3dgen_cli.generators import local_bases_dir, open_base, open_generator
from tests.render_fixtures import assert_parity_case, assert_same_synthesis


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


# --- the official training-loop snapshot (../shared/eg3d_snapshot) ---------------------------------


@pytest.fixture(scope="module")
def snapshot() -> Path:
    path = SHARED / "eg3d_snapshot" / "network-snapshot-000000.pkl"
    if not path.is_file():
        pytest.skip("../shared/eg3d_snapshot is not present beside the project")
    return path


@pytest.fixture(scope="module")
def snapshot_generator(snapshot: Path) -> torch.nn.Module:
    return load_generator(snapshot)


@pytest.mark.parametrize("case", [0, 1, 2])
def test_official_snapshot_reproduces_the_parity_cases(snapshot_generator, case: int) -> None:
    assert_parity_case(snapshot_generator, SHARED / "eg3d_parity" / f"case{case}.safetensors")


def test_snapshot_of_another_config_is_refused_under_a_registry_name(snapshot: Path) -> None:
    before = tree_listing(paths.home())
    result = CliRunner().invoke(app, ["fetch", "eg3d-ffhq512-128", "--from", str(snapshot)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in ("holds a generator of an unnamed config, not ffhq512-128", "channel_base: 4096 vs 32768",
                   "channel_max: 64 vs 512", "nothing was cached", f"--base {snapshot}", "--local"):
        assert needle in lines[0], lines[0]
    assert tree_listing(paths.home()) == before
    assert zoo.get_entry("eg3d-ffhq512-128").sha256 is None  # no hash was recorded


def test_snapshot_opens_as_base_and_imports_under_its_own_name(snapshot: Path, snapshot_generator) -> None:
    G, ref = open_base(str(snapshot))  # what --base FILE.pkl does
    assert ref.name == "network-snapshot-000000" and torch.equal(G.backbone.mapping.w_avg,
                                                                 snapshot_generator.backbone.mapping.w_avg)
    result = CliRunner().invoke(app, ["fetch", "my-snapshot", "--from", str(snapshot), "--local", "--json"])
    assert result.exit_code == 0, result.output
    local = Path(json.loads(result.stdout)["artifacts"][0]["converted"])
    assert local == local_bases_dir() / "my-snapshot.safetensors"
    doc = json.loads(local.with_suffix(".json").read_text())
    assert doc["dropped"] == ["dataset_label_std"] and doc["init_kwargs"]["channel_base"] == 4096
    G2, ref2 = open_base("my-snapshot")  # --base my-snapshot
    assert ref2.path == local
    for name, tensor in snapshot_generator.state_dict().items():
        assert torch.equal(G2.state_dict()[name], tensor), name
    again = CliRunner().invoke(app, ["fetch", "my-snapshot", "--from", str(snapshot), "--local"])
    assert again.exit_code == 2 and "exists already" in again.stderr
    taken = CliRunner().invoke(app, ["fetch", "eg3d-ffhq512-128", "--from", str(snapshot), "--local"])
    assert taken.exit_code == 2 and "is a registry artifact" in taken.stderr

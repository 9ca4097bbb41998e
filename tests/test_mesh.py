"""Meshes as EG3D's gen_samples.py makes them: border trimmed, vertex colours, .ply/.obj/.glb opened by trimesh."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from my3dgen_cli import media
from my3dgen_cli.cli import app
from my3dgen_cli.use.mesh import (
    TRIM_VALUE,
    Mesh,
    density_grid,
    extract_mesh,
    marching_cubes,
    trim_border,
    trim_width,
    vertex_colors,
)
from my3dgen_cli.use.render import latent_from_seed
from tests.render_fixtures import tiny_base, tiny_generator  # noqa: F401

trimesh = pytest.importorskip("trimesh")  # the `mesh` extra; in `dev`, so CI runs these
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")
RES = 32  # trim_width 3
BOX = 1.0  # the tiny config's box_warp


def _on_border(vertices: np.ndarray, box: float = BOX, res: int = RES) -> np.ndarray:
    """Vertices on the cube's faces or in the outer layers of the trimmed slab.

    Untrimmed walls lie on the faces (|coordinate| = box/2). After trimming, a surface that was
    dense up to the border is closed at the slab's inner edge, at most one step into the slab.
    """
    step = box / (res - 1)
    return np.abs(vertices).max(axis=1) > box / 2 - (trim_width(res) - 1) * step - 1e-5


def _crossed_level(field: np.ndarray) -> float:
    """A level the inside of the cube surely crosses: the median of the samples off the border."""
    return float(np.median(field[1:-1, 1:-1, 1:-1]))


def test_trim_border_matches_gen_samples_widths():
    assert [trim_width(r) for r in (256, 512, 128, 64, 16, 8)] == [30, 60, 15, 7, 1, 1]
    field = np.zeros((64, 64, 64), dtype=np.float32)
    trimmed = trim_border(field)
    assert (field == 0).all()  # a copy
    pad = trim_width(64)
    inner = trimmed[pad:-pad, pad:-pad, pad:-pad]
    assert (inner == 0).all() and inner.shape == (64 - 2 * pad,) * 3
    for axis in range(3):
        assert (np.take(trimmed, range(pad), axis=axis) == TRIM_VALUE).all()
        assert (np.take(trimmed, range(64 - pad, 64), axis=axis) == TRIM_VALUE).all()


def test_trimming_removes_the_border_walls():
    G = tiny_generator()
    ws = latent_from_seed(G, 2)
    field = density_grid(G, ws, resolution=RES)
    level = _crossed_level(field)
    walls, _ = marching_cubes(field, level, BOX)
    assert _on_border(walls).any()  # the random tiny model's density reaches the box: walls untrimmed
    mesh = extract_mesh(G, ws, RES, level)
    assert len(mesh.vertices) > 0 and not _on_border(mesh.vertices).any()


def test_vertex_colors_are_the_decoders_first_three_features():
    G = tiny_generator()
    ws = latent_from_seed(G, 2)
    planes = G.planes(ws, noise_mode="const")
    points = np.array([[0.0, 0.0, 0.0], [0.1, -0.2, 0.05]], dtype=np.float32)
    colors = vertex_colors(G, planes, points)
    from my3dgen_cli.eg3d.renderer import sample_from_planes

    with torch.no_grad():
        rgb = G.decoder(sample_from_planes(planes, torch.from_numpy(points)[None], BOX))["rgb"][0, :, :3]
    assert colors.dtype == np.uint8 and colors.shape == (2, 3)
    np.testing.assert_array_equal(colors, (rgb.clamp(0, 1) * 255).round().numpy().astype(np.uint8))


def _mesh() -> Mesh:
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    f = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    c = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=np.uint8)
    return Mesh(v, f, c)


@pytest.mark.parametrize("name", ["m.ply", "m_ascii.ply", "m.obj", "m.glb"])
def test_each_format_opens_in_trimesh_with_colours(tmp_path, name):
    mesh = _mesh()
    path = media.write_mesh(tmp_path / name, mesh, binary="ascii" not in name)
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.vertices) == 4 and len(loaded.faces) == 4
    np.testing.assert_allclose(loaded.vertices, mesh.vertices, atol=1e-6)
    assert loaded.visual.kind == "vertex"
    np.testing.assert_array_equal(loaded.visual.vertex_colors[:, :3], mesh.colors)
    if path.suffix == ".ply":
        v, f = media.read_ply(path)
        np.testing.assert_allclose(v, mesh.vertices)
        np.testing.assert_array_equal(f, mesh.faces)


@pytest.mark.usefixtures("tiny_base")
def test_cli_meshes_open_in_trimesh(tmp_path):
    from my3dgen_cli import generators

    G, _ = generators.open_base("tiny")
    ws = latent_from_seed(G, 4, 0.7)
    level = _crossed_level(density_grid(G, ws, RES))
    for suffix in (".ply", ".obj", ".glb"):
        path = tmp_path / f"m{suffix}"
        r = runner.invoke(app, ["render", "--seed", "4", "--mesh", str(path), "--mesh-res", str(RES),
                                "--mesh-level", f"{level!r}", "-o", str(tmp_path / suffix[1:]), "--json"])
        assert r.exit_code == 0, r.output
        source = json.loads(r.stdout)["sources"][0]
        loaded = trimesh.load(path, force="mesh", process=False)
        assert len(loaded.vertices) == source["vertices"] > 0
        assert len(loaded.faces) == source["faces"]
        assert loaded.visual.kind == "vertex"
        colours = loaded.visual.vertex_colors[:, :3]
        assert len(np.unique(colours, axis=0)) > 1  # coloured by the field, not one fill colour
        assert not _on_border(np.asarray(loaded.vertices)).any()


@pytest.mark.usefixtures("tiny_base")
def test_without_trimesh_obj_fails_in_one_line_and_ply_still_works(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "trimesh", None)  # `import trimesh` now raises ImportError
    r = runner.invoke(app, ["render", "--seed", "4", "--mesh", str(tmp_path / "m.glb"), "-o", str(tmp_path / "r")])
    assert r.exit_code != 0
    assert "my3dgen[mesh]" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.glb").exists() and not (tmp_path / "r").exists()
    from my3dgen_cli import generators

    G, _ = generators.open_base("tiny")
    level = _crossed_level(density_grid(G, latent_from_seed(G, 4, 0.7), RES))
    ply = tmp_path / "m.ply"
    r = runner.invoke(app, ["render", "--seed", "4", "--mesh", str(ply), "--mesh-res", str(RES), "--mesh-level",
                            f"{level!r}", "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    v, f = media.read_ply(ply)
    assert len(v) > 0 and len(f) > 0
    bad = runner.invoke(app, ["render", "--seed", "4", "--mesh", str(tmp_path / "m.stl"), "-o", str(tmp_path / "s")])
    assert bad.exit_code != 0 and ".glb" in bad.output

"""Rendering: angle parsing, mirror symmetry, depth range, media writers, mesh, and the CLI."""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from my3dgen_cli import media
from my3dgen_cli.cli import app
from my3dgen_cli.eg3d.camera import lookat_camera
from my3dgen_cli.errors import UserInputError
from my3dgen_cli.use.mesh import density_grid, marching_cubes
from my3dgen_cli.use.render import latent_from_seed, parse_angles, render_views
from tests.render_fixtures import tiny_base, tiny_generator  # noqa: F401

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU tests on a shared box


def test_parse_angles():
    assert parse_angles("30") == [30.0]
    assert parse_angles("-30,0,30") == [-30.0, 0.0, 30.0]
    assert parse_angles("-30:30:7") == [-30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0]
    assert parse_angles("5:5:1,10") == [5.0, 10.0]
    for bad in ("abc", "1:2", "0:10:0", "500"):
        with pytest.raises(UserInputError, match="--angle"):
            parse_angles(bad)


def _symmetric(planes: torch.Tensor) -> torch.Tensor:
    """Make tri-planes symmetric under world x -> -x.

    The released plane axes read a point at (x, y), (x, z) and (z, x) (renderer.PLANE_AXES): x is
    the grid's width coordinate on planes 0 and 1 and its height coordinate on plane 2.
    """
    out = planes.clone()
    out[:, 0] = (planes[:, 0] + planes[:, 0].flip(-1)) / 2
    out[:, 1] = (planes[:, 1] + planes[:, 1].flip(-1)) / 2
    out[:, 2] = (planes[:, 2] + planes[:, 2].flip(-2)) / 2
    return out


def test_yaw_plus_minus_of_a_symmetric_scene_are_mirror_images():
    G = tiny_generator()
    ws = latent_from_seed(G, 3)
    planes = _symmetric(G.planes(ws))
    # The neural render (features, depth) is what the renderer makes; superresolution's learned
    # convolutions are not mirror-symmetric, so the final image is not compared.
    with torch.no_grad():
        cams = lookat_camera([25.0, -25.0], [8.0, 8.0])
        out = G.synthesis(ws.expand(2, -1, -1), cams, planes=planes.expand(2, -1, -1, -1, -1))
    raw, depth = out["image_features"], out["image_depth"]
    # float32 ray maths through two mirrored camera matrices: differences ~1e-6, 1e-4 is loose.
    torch.testing.assert_close(raw[0], raw[1].flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(depth[0], depth[1].flip(-1), atol=1e-4, rtol=0)
    assert not torch.allclose(raw[0], raw[0].flip(-1), atol=1e-3)  # the view itself is not symmetric


def test_render_views_shapes_and_depth_range():
    G = tiny_generator()
    ws = latent_from_seed(G, 1)
    views = render_views(G, ws, lookat_camera([-20.0, 0.0, 20.0], 0.0), batch=2)
    assert views.images.shape == (3, 3, 64, 64) and views.depth.shape == (3, 1, 32, 32)
    lo, hi = G.rendering_kwargs["ray_start"], G.rendering_kwargs["ray_end"]
    assert views.depth.min() >= lo and views.depth.max() <= hi
    one = render_views(G, ws, lookat_camera(20.0, 0.0), batch=1)
    torch.testing.assert_close(one.images[0], views.images[2], atol=1e-5, rtol=0)  # batching changes nothing


def test_ply_round_trip(tmp_path):
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float32)
    f = np.array([[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]])
    for binary in (True, False):
        path = media.write_ply(tmp_path / f"m{binary}.ply", v, f, binary=binary)
        v2, f2 = media.read_ply(path)
        np.testing.assert_allclose(v2, v)
        np.testing.assert_array_equal(f2, f)


def test_video_gif_and_depth_png(tmp_path):
    frames = [np.full((33, 47, 3), 20 * k, dtype=np.uint8) for k in range(6)]  # odd sizes are padded
    mp4 = media.write_mp4(tmp_path / "v.mp4", frames, fps=10)
    assert media.count_video_frames(mp4) == 6
    assert iio.improps(mp4, plugin="FFMPEG").shape[-3:] == (34, 48, 3)
    gif = media.write_gif(tmp_path / "v.gif", frames, fps=10)
    with Image.open(gif) as im:
        assert im.n_frames == 6
    d = np.linspace(2.25, 3.3, 16).reshape(4, 4)
    png = media.write_png(tmp_path / "d.png", media.depth_to_uint16(d, 2.25, 3.3), text={"depth_near": "2.25"})
    with Image.open(png) as im:
        arr = np.asarray(im)
        assert arr.max() == 65535 and arr.min() == 0 and im.text["depth_near"] == "2.25"


def test_mesh_from_density(tmp_path):
    G = tiny_generator()
    ws = latent_from_seed(G, 2)
    field = density_grid(G, ws, resolution=24)
    assert field.shape == (24, 24, 24)
    # The random tiny model has no face; its median density is a level the field surely crosses.
    verts, faces = marching_cubes(field, float(np.median(field)), 1.0)
    assert len(verts) > 0 and len(faces) > 0
    assert np.abs(verts).max() <= 0.5 + 1e-6  # inside the box of side box_warp
    with pytest.raises(ValueError, match="density range"):
        marching_cubes(field, float(field.max()) + 1, 1.0)


@pytest.mark.usefixtures("tiny_base")
def test_cli_render_everything(tmp_path):
    out = tmp_path / "r"
    args = ["render", "--seed", "4", "--yaw", "-20:20:3", "--pitch", "0,10", "--depth", "--grid", "--orbit", "5",
            "--mesh", str(tmp_path / "m.ply"), "--mesh-res", "16", "--mesh-level", "0", "--batch", "4",
            "-o", str(out), "--json"]
    r = runner.invoke(app, args)
    if r.exit_code != 0 and "density range" in r.output:
        pytest.skip("random tiny model's density does not cross 0")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    pngs = sorted(p.name for p in out.glob("seed4_yaw*_pitch*[0-9].png"))
    assert len(pngs) == 6 and "seed4_yaw-020_pitch+010.png" in pngs
    with Image.open(out / "seed4_yaw+000_pitch+000.png") as im:
        assert im.size == (64, 64)
    with Image.open(out / "seed4_yaw+000_pitch+000_depth.png") as im:
        assert im.size == (32, 32) and np.asarray(im).dtype == np.uint16
    assert len(list(out.glob("*_depth_color.png"))) == 6
    with Image.open(out / "grid.png") as im:
        assert im.size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
    assert media.count_video_frames(out / "seed4_orbit.mp4") == 5
    v, f = media.read_ply(tmp_path / "m.ply")
    assert len(v) > 0 and len(f) > 0 and summary["sources"][0]["vertices"] == len(v)
    for view in summary["sources"][0]["views"]:
        assert 2.25 <= view["depth_min"] <= view["depth_max"] <= 3.3

    again = runner.invoke(app, ["render", "--seed", "4", "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output
    forced = runner.invoke(app, ["render", "--seed", "4", "-o", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert "wrote image" in forced.stdout


@pytest.mark.usefixtures("tiny_base")
def test_cli_render_single_file_and_errors(tmp_path):
    target = tmp_path / "one.png"
    r = runner.invoke(app, ["render", "--seed", "1", "--yaw", "15", "-o", str(target)])
    assert r.exit_code == 0, r.output
    assert target.is_file()
    r = runner.invoke(app, ["render", "--seed", "1", "--yaw", "0,15", "-o", str(tmp_path / "two.png")])
    assert r.exit_code == 2 and "give a folder" in r.output
    r = runner.invoke(app, ["render", "--anchor", "0", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--identity" in r.output
    r = runner.invoke(app, ["render", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "nothing to render" in r.output


@pytest.mark.usefixtures("tiny_base")
def test_library_render_plan_writes_what_the_command_writes(tmp_path):
    """`my3dgen.render(RenderPlan(...))` is the command without the CLI: the same files, the same pixels."""
    import my3dgen
    from my3dgen_cli.errors import UserInputError

    plan = my3dgen.RenderPlan(my3dgen.ModelChoice(base="tiny-test", device="cpu"), seeds=(4,), yaws=(-20.0, 20.0),
                              out=tmp_path / "lib")
    result = my3dgen.render(plan)
    assert [kind for kind, _ in result.outputs] == ["image", "image"]
    assert result.to_dict()["sources"][0]["source"] == "seed4"
    r = runner.invoke(app, ["render", "--seed", "4", "--yaw", "-20,20", "--device", "cpu", "-o", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    for _, path in result.outputs:
        with Image.open(path) as got, Image.open(tmp_path / "cli" / path.name) as want:
            assert np.array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(UserInputError, match="nothing to render"):
        my3dgen.render(my3dgen.RenderPlan(my3dgen.ModelChoice()))
    with pytest.raises(UserInputError, match="already exists"):
        my3dgen.render(plan)


def test_a_latent_renders_on_the_base_it_records(tmp_path, tiny_base, monkeypatch):  # noqa: F811
    """Without --base or --identity a `.latent` opens the base it was made on, not the default (no surprise
    download of another generator); --base still wins."""
    import torch

    from my3dgen_cli import generators
    from my3dgen_cli.eg3d.camera import lookat_camera
    from my3dgen_cli.identity import Latent, write_latent

    asked: list[str] = []
    opened = generators.open_base
    monkeypatch.setattr(generators, "open_base",
                        lambda base, device=None, offline=None: (asked.append(base), opened(base, device, offline))[1])
    lat = tmp_path / "x.latent"
    write_latent(lat, Latent(torch.zeros(1, tiny_base.num_ws, tiny_base.w_dim), lookat_camera(0.0, 0.0).reshape(1, 25),
                             base="made-elsewhere"))
    r = runner.invoke(app, ["render", "--latent", str(lat), "-o", str(tmp_path / "a")])
    assert r.exit_code == 0 and asked == ["made-elsewhere"], (r.output, asked)
    r = runner.invoke(app, ["render", "--latent", str(lat), "--base", "tiny-test", "-o", str(tmp_path / "b")])
    assert r.exit_code == 0 and asked[-1] == "tiny-test", (r.output, asked)

"""Interpolation: exact endpoints, frame counts, slerp, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from my3dgen_cli import media
from my3dgen_cli.cli import app
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.identity import Latent, write_latent
from my3dgen_cli.use.interpolate import frame_times, interpolate_cameras, interpolate_latents, slerp
from my3dgen_cli.use.render import latent_from_seed
from tests.render_fixtures import tiny_base, tiny_generator  # noqa: F401

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU tests on a shared box


def test_endpoints_and_counts():
    a, b, c = (torch.randn(1, 8, 64) for _ in range(3))
    for mode in ("linear", "slerp"):
        path = interpolate_latents([a, b, c], 9, mode)
        assert path.shape == (9, 8, 64)
        assert torch.equal(path[0], a[0]) and torch.equal(path[4], b[0]) and torch.equal(path[-1], c[0])
    assert frame_times(2, 3) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError):
        frame_times(2, 1)
    # slerp keeps norms interpolated linearly and ends on its endpoints.
    x, y = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(slerp(x, y, 0.5).norm(), torch.tensor(2.0))
    torch.testing.assert_close(slerp(x, y, 1.0), y)
    cams = torch.cat([lookat_camera(-10.0, 0.0), lookat_camera(30.0, 6.0)])
    path = interpolate_cameras(cams, 5)
    assert torch.equal(path[0], cams[0]) and torch.equal(path[-1], cams[1])
    swept = interpolate_cameras(cams, 3, yaw_sweep=(-20.0, 20.0))
    torch.testing.assert_close(swept[1:2], lookat_camera(0.0, 3.0))


@pytest.mark.usefixtures("tiny_base")
def test_cli_interpolate(tmp_path):
    G = tiny_generator()
    cam = lookat_camera(15.0, 0.0)
    write_latent(tmp_path / "a.latent", Latent(latent_from_seed(G, 1), cam, base="tiny-test"))
    out = tmp_path / "morph"
    args = ["interpolate", str(tmp_path / "a.latent"), "seed:2", "--frames", "5", "--mode", "slerp",
            "--base", "tiny-test", "-o", str(out), "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["frames"] == 5
    frames = sorted(out.glob("frame_*.png"))
    assert len(frames) == 5
    assert media.count_video_frames(out / "interpolation.mp4") == 5
    with Image.open(out / "interpolation.gif") as im:
        assert im.n_frames == 5
    with torch.no_grad():
        first = G.synthesis(latent_from_seed(G, 1), cam)["image"]
        last = G.synthesis(latent_from_seed(G, 2), frontal_camera())["image"]
    # Rendered in one batch of 5 vs alone: float sums in another order may round one level off.
    for png, ref in ((frames[0], first), (frames[-1], last)):
        diff = np.abs(np.asarray(Image.open(png)).astype(int) - media.to_uint8(ref).astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    with Image.open(out / "strip.png") as im:
        assert im.size == (5 * 64 + 6 * 2, 64 + 4)

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    forced = runner.invoke(app, args[:-1] + ["--force", "--yaw", "-30:30"])
    assert forced.exit_code == 0, forced.output
    r = runner.invoke(app, ["interpolate", "seed:1", "--base", "tiny-test"])
    assert r.exit_code == 2 and "expected 2 or more" in r.output


@pytest.mark.usefixtures("tiny_base")
def test_cli_interpolate_to_one_video_file(tmp_path):
    """The README's form: `-o morph.mp4` writes that video alone; a missing key is named before any work."""
    G = tiny_generator()
    write_latent(tmp_path / "a.latent", Latent(latent_from_seed(G, 1), lookat_camera(15.0, 0.0), base="tiny-test"))
    video = tmp_path / "morph.mp4"
    args = ["interpolate", str(tmp_path / "a.latent"), "seed:2", "--frames", "4", "--base", "tiny-test",
            "-o", str(video)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert media.count_video_frames(video) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.latent", "morph.mp4"]
    r = runner.invoke(app, [*args[:1], str(tmp_path / "gone.latent"), *args[2:], "--force"])
    assert r.exit_code == 2 and "gone.latent does not exist" in r.output
    r = runner.invoke(app, [*args[:-1], str(tmp_path / "morph.png")])
    assert r.exit_code != 0 and ".mp4 or .gif" in r.output

"""Inversion: a render of a known latent is recovered; hull mode; camera turns; the CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from my3dgen_cli import media
from my3dgen_cli.cli import app
from my3dgen_cli.eg3d.camera import camera_angles, lookat_camera
from my3dgen_cli.identity import Latent, read_latent, write_latent
from my3dgen_cli.use.invert import InvertConfig, invert_image, invert_images, psnr, rotate_camera, start_latent
from my3dgen_cli.use.render import latent_from_seed
from tests.render_fixtures import tiny_base, tiny_generator  # noqa: F401

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # small CPU tests on a shared box


def _problem(noise: float = 0.4):
    """A target rendered from a known latent, and 4 'anchors' scattered around that latent."""
    G = tiny_generator()
    g = torch.Generator().manual_seed(1)
    ws_true = latent_from_seed(G, 11)
    cam = lookat_camera(20.0, 5.0)
    with torch.no_grad():
        target = G.synthesis(ws_true, cam)["image"]
    anchors = ws_true + noise * torch.randn((4, 1, G.w_dim), generator=g).expand(4, G.num_ws, G.w_dim)
    return G, ws_true, cam, target, anchors


def test_invert_recovers_a_rendered_latent(tmp_path):
    G, _, cam, target, anchors = _problem()
    with torch.no_grad():
        start = psnr(G.synthesis(start_latent(G, anchors), cam)["image"], target)
    # raw_weight 0: the random tiny generator's raw neural render is not a low-res copy of its
    # final image (a trained EG3D's is), so the two-resolution loss would fight itself here.
    cfg = InvertConfig(steps=60, space="w+", lr=0.01, raw_weight=0.0)
    t0 = time.perf_counter()
    result = invert_image(G, target, cam, anchors, cfg)
    seconds = time.perf_counter() - t0
    # Measured: 18.8 dB at the anchors' mean -> 32.7 dB after 60 steps (about 7 s on one CPU core).
    assert start < 26, start
    assert result.psnr > 30, (start, result.psnr, seconds)
    assert result.losses[-1] < result.losses[0] / 5
    path = write_latent(tmp_path / "x.latent", Latent(result.ws, result.camera, base="tiny", space="w+"))
    lat = read_latent(path)
    with torch.no_grad():
        again = G.synthesis(lat.ws, lat.camera)["image"]
    torch.testing.assert_close(again, result.image, atol=1e-5, rtol=0)
    assert psnr(again, target) > 30


@pytest.mark.parametrize(("init", "threads"), [("mean", 1), ("nearest", 1), ("mean", 2)])
def test_a_batch_inverts_each_photo_as_it_would_alone(init: str, threads: int, monkeypatch) -> None:
    """invert_images (one render per step for all photos; with 2 CPU threads, 2 + 1 photos on a thread each:
    speed.summed_gradients) = invert_image photo by photo, to float rounding."""
    from my3dgen_cli import speed

    parts = []
    real = speed.run_parallel
    monkeypatch.setattr(speed, "run_parallel", lambda tasks: parts.append(len(tasks)) or real(tasks))
    torch.set_num_threads(threads)  # the one_thread fixture restores the count
    G, ws_true, _, _, anchors = _problem()
    cams = torch.cat([lookat_camera(20.0, 5.0), lookat_camera(-25.0, -3.0), lookat_camera(0.0, 8.0)])
    ws = torch.cat([ws_true, ws_true + 0.3, ws_true - 0.2])
    with torch.no_grad():
        targets = G.synthesis(ws, cams)["image"]
    cfg = InvertConfig(steps=12, space="w", raw_weight=0.0, init=init)
    batch = invert_images(G, targets, cams, anchors, cfg)
    for i, together in enumerate(batch):
        alone = invert_image(G, targets[i:i + 1], cams[i:i + 1], anchors, cfg)
        torch.testing.assert_close(together.ws, alone.ws, atol=2e-4, rtol=0)
        assert abs(together.psnr - alone.psnr) < 0.02, (i, together.psnr, alone.psnr)
        assert together.init_anchor == alone.init_anchor
        assert together.ws.shape == (1, G.num_ws, G.w_dim) and together.image.shape == targets[:1].shape
    assert len({round(r.psnr, 3) for r in batch}) == 3  # three photos, three different fits
    assert parts == ([2] * 12 if threads == 2 else [])  # every step of the batch in two parts, or none


def test_a_batch_with_camera_refinement_goes_one_photo_at_a_time() -> None:
    G, ws_true, cam, target, anchors = _problem()
    cfg = InvertConfig(steps=2, space="w", raw_weight=0.0, refine_camera=True)
    two = invert_images(G, target.expand(2, -1, -1, -1), cam.expand(2, -1), anchors, cfg)
    assert [r.camera.shape for r in two] == [(1, 25), (1, 25)]
    assert two[0].camera_delta == two[1].camera_delta  # the same photo twice, the same turn


def test_invert_in_w_and_hull_stay_in_their_spaces():
    G, _, cam, target, anchors = _problem()
    w = invert_image(G, target, cam, anchors, InvertConfig(steps=3, space="w", raw_weight=0.0))
    assert torch.equal(w.ws, w.ws[:, :1].expand_as(w.ws))  # one vector for every layer
    hull = invert_image(G, target, cam, anchors, InvertConfig(steps=3, hull=True, init="nearest", raw_weight=0.0))
    weights = hull.hull_weights  # [num_ws, K]
    assert weights.shape == (G.num_ws, 4) and hull.init_anchor is not None
    torch.testing.assert_close(weights.sum(-1), torch.ones(G.num_ws))
    expected = torch.einsum("rk,krd->rd", weights, anchors)
    torch.testing.assert_close(hull.ws[0], expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expected 2 or more"):
        invert_image(G, target, cam, anchors[:1], InvertConfig(steps=1, hull=True))
    with pytest.raises(ValueError, match="space"):
        InvertConfig(space="z")


def test_rotate_camera_turns_like_yaw_and_pitch():
    cam = lookat_camera(0.0, 0.0)
    zero = torch.tensor(0.0)
    torch.testing.assert_close(rotate_camera(cam, zero, zero), cam)
    yaw, pitch = camera_angles(rotate_camera(cam, torch.tensor(10.0), zero))
    assert yaw.item() > 5 and abs(pitch.item()) < 1e-3
    yaw, pitch = camera_angles(rotate_camera(cam, zero, torch.tensor(10.0)))
    assert pitch.item() > 5 and abs(yaw.item()) < 1e-3


def _write_crop(G, path, seed=11, yaw=20.0, pitch=5.0):
    with torch.no_grad():
        img = G.synthesis(latent_from_seed(G, seed), lookat_camera(yaw, pitch))["image"]
    media.write_png(path, media.to_uint8(img))
    return img


@pytest.mark.usefixtures("tiny_base")
def test_cli_invert_writes_latent_preview_and_tuned_adapter(tmp_path):
    G = tiny_generator()
    _write_crop(G, tmp_path / "face.png")
    out = tmp_path / "out"
    args = ["invert", str(tmp_path / "face.png"), "--yaw", "20", "--pitch", "5", "--steps", "4", "--tune", "2",
            "--base", "tiny-test", "--no-lpips", "-o", str(out), "--json"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"][0]
    assert res["psnr"] > 0 and "tuned_psnr" in res
    lat = read_latent(out / "face.latent")
    assert lat.ws.shape == (1, G.num_ws, G.w_dim) and lat.space == "w+" and lat.extra["adapter"]
    assert (out / "face.adapter.safetensors").is_file()
    with Image.open(out / "face.preview.png") as im:  # target | inversion | tuned
        assert im.size == (3 * 64 + 4 * 2, 64 + 2 * 2)
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "face.latent already exists" in again.output
    # The saved latent renders through `render --own-camera` to the preview's middle tile.
    r = runner.invoke(app, ["render", "--latent", str(out / "face.latent"), "--own-camera", "-o", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    rendered = np.asarray(Image.open(tmp_path / "r" / "face_own.png"))
    preview = np.asarray(Image.open(out / "face.preview.png"))
    np.testing.assert_array_equal(rendered, preview[2:66, 68:132])
    # The tuned adapter, given to `render --adapter` (base read from its metadata), renders the third tile.
    r = runner.invoke(app, ["render", "--latent", str(out / "face.latent"), "--own-camera",
                            "--adapter", str(out / "face.adapter.safetensors"), "-o", str(tmp_path / "t")])
    assert r.exit_code == 0, r.output
    tuned = np.asarray(Image.open(tmp_path / "t" / "face_own.png"))
    np.testing.assert_array_equal(tuned, preview[2:66, 134:198])
    assert not np.array_equal(tuned, rendered)


@pytest.mark.usefixtures("tiny_base")
def test_cli_invert_bad_images(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    r = runner.invoke(app, ["invert", str(bad), "--yaw", "0", "--base", "tiny-test", "-o", str(tmp_path / "o"),
                            "--no-lpips"])
    assert r.exit_code == 2 and "not a readable image" in r.output
    Image.new("RGB", (80, 60)).save(tmp_path / "wide.png")
    r = runner.invoke(app, ["invert", str(tmp_path / "wide.png"), "--yaw", "0", "--base", "tiny-test"])
    assert r.exit_code == 2 and "expected a square" in r.output
    r = runner.invoke(app, ["invert", str(tmp_path / "missing.png"), "--yaw", "0", "--base", "tiny-test"])
    assert r.exit_code == 2 and "not found" in r.output
    r = runner.invoke(app, ["invert", str(bad), "--space", "z", "--base", "tiny-test"])
    assert r.exit_code == 2 and "space" in r.output

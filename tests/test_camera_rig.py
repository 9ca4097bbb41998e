"""Each base orbits its own camera pivot (rendering_kwargs), in the library, every command and the ONNX export.

An AFHQ-config tiny generator (the tiny config with afhqcats512-128's pivot (0, 0, -0.06)) is saved
as a local base; the commands run for real on it while `TriPlaneGenerator.mapping/synthesis` record
the camera labels they are given, and each label's optical axis must pass through that pivot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from my3dgen_cli.cli import app
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.eg3d.camera import (
    AFHQ_PIVOT,
    CAMERA_RADIUS,
    FFHQ_PIVOT,
    CameraRig,
    camera_rig,
    frontal_camera,
    lookat_camera,
)
from my3dgen_cli.eg3d.configs import NAMED_CONFIGS
from my3dgen_cli.eg3d.triplane import TriPlaneGenerator

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def afhq_tiny(seed: int = 0, radius: float = CAMERA_RADIUS) -> torch.nn.Module:
    """The tiny config with AFHQ's rendering kwargs for the camera (pivot (0, 0, -0.06))."""
    config = NAMED_CONFIGS["tiny"]()
    for holder in (config, config["init_kwargs"]):
        holder["rendering_kwargs"]["avg_camera_pivot"] = list(AFHQ_PIVOT)
        holder["rendering_kwargs"]["avg_camera_radius"] = radius
    torch.manual_seed(seed)
    G = build_generator(config)
    for p in G.parameters():
        p.requires_grad_(False)
    return G.eval()


def miss_distance(c: torch.Tensor, point: tuple[float, float, float]) -> torch.Tensor:
    """How far `point` lies from each camera's optical axis (origin + t * forward), c: [N, 25] -> [N]."""
    c2w = c[:, :16].reshape(-1, 4, 4).double()
    origin, forward = c2w[:, :3, 3], c2w[:, :3, 2]
    rel = torch.tensor(point, dtype=torch.float64) - origin
    along = (rel * forward).sum(-1, keepdim=True)
    assert (along > 0).all()  # the point is in front of the camera
    return (rel - along * forward).norm(dim=-1)


def assert_looks_at(c: torch.Tensor, point: tuple[float, float, float], radius: float | None = CAMERA_RADIUS) -> None:
    """Every camera's optical axis passes through `point`; with `radius`, it sits that far from the origin."""
    assert c.ndim == 2 and c.shape[1] == 25 and c.shape[0] > 0
    assert miss_distance(c, point).max() < 1e-5, miss_distance(c, point)
    if radius is None:
        return
    torch.testing.assert_close(c[:, :16].reshape(-1, 4, 4)[:, :3, 3].double().norm(dim=-1),
                               torch.full((c.shape[0],), radius, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[torch.Tensor]]:
    """Every camera label the generator's mapping (conditioning) and synthesis (render) are given."""
    seen: dict[str, list[torch.Tensor]] = {"mapping": [], "synthesis": []}
    mapping, synthesis = TriPlaneGenerator.mapping, TriPlaneGenerator.synthesis

    def record_mapping(self, z, c, *args, **kwargs):
        seen["mapping"].append(c.detach().cpu())
        return mapping(self, z, c, *args, **kwargs)

    def record_synthesis(self, ws, c, *args, **kwargs):
        seen["synthesis"].append(c.detach().cpu())
        return synthesis(self, ws, c, *args, **kwargs)

    monkeypatch.setattr(TriPlaneGenerator, "mapping", record_mapping)
    monkeypatch.setattr(TriPlaneGenerator, "synthesis", record_synthesis)
    return seen


@pytest.fixture
def afhq_base() -> str:
    """A local base `tiny-afhq` (converted safetensors + config JSON), opened by `--base tiny-afhq`."""
    from my3dgen_cli.generators import save_local_base

    save_local_base(afhq_tiny(), "tiny-afhq")
    return "tiny-afhq"


def test_rig_comes_from_rendering_kwargs() -> None:
    assert camera_rig(afhq_tiny()) == CameraRig(AFHQ_PIVOT, CAMERA_RADIUS)
    assert camera_rig(build_generator("afhqcats512-128").rendering_kwargs).pivot == AFHQ_PIVOT
    assert camera_rig(build_generator("tiny")) == camera_rig(None) == CameraRig(FFHQ_PIVOT, CAMERA_RADIUS)
    assert camera_rig(afhq_tiny(radius=3.1)).radius == 3.1
    for bad in ({"avg_camera_pivot": [0, 0], "avg_camera_radius": 2.7},
                {"avg_camera_pivot": [0, 0, float("nan")], "avg_camera_radius": 2.7},
                {"avg_camera_pivot": "0,0,1", "avg_camera_radius": 2.7},
                {"avg_camera_pivot": [0, 0, 0.2], "avg_camera_radius": 0},
                {"avg_camera_pivot": [0, 0, 0.2]}):
        with pytest.raises(ValueError, match="avg_camera"):
            camera_rig(bad)


def test_lookat_camera_keeps_ffhq_defaults_and_takes_pivot_and_radius() -> None:
    yaw, pitch = torch.tensor([-40.0, 0.0, 25.0]), torch.tensor([10.0, 0.0, -15.0])
    assert_looks_at(lookat_camera(yaw, pitch), FFHQ_PIVOT)
    assert_looks_at(lookat_camera(yaw, pitch, pivot=AFHQ_PIVOT), AFHQ_PIVOT)
    assert_looks_at(lookat_camera(yaw, pitch, pivot=AFHQ_PIVOT, radius=3.0), AFHQ_PIVOT, radius=3.0)
    # off frontal the two pivots really differ (frontal cameras sit on the z axis, through both)
    assert miss_distance(lookat_camera(yaw[[0, 2]], pitch[[0, 2]]), AFHQ_PIVOT).min() > 0.05
    rig = camera_rig(afhq_tiny())
    torch.testing.assert_close(rig.lookat(yaw, pitch), lookat_camera(yaw, pitch, pivot=AFHQ_PIVOT))
    torch.testing.assert_close(rig.frontal(3), frontal_camera(3, pivot=AFHQ_PIVOT))


def test_seed_latents_are_conditioned_on_the_base_frontal_camera() -> None:
    from my3dgen_cli.use.render import latent_from_seed

    # Frontal cameras of the two pivots coincide (both on the z axis); the radius tells them apart.
    G = afhq_tiny(radius=3.1)
    z = torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        own = G.mapping(z, frontal_camera(1, pivot=AFHQ_PIVOT, radius=3.1), truncation_psi=0.7)
        ffhq = G.mapping(z, frontal_camera(1), truncation_psi=0.7)
    assert torch.equal(latent_from_seed(G, 4), own)
    assert not torch.allclose(own, ffhq)  # the conditioning camera matters: this test can fail


def test_render_command_orbits_the_afhq_pivot(afhq_base: str, recorded, tmp_path: Path) -> None:
    r = runner.invoke(app, ["render", "--base", afhq_base, "--seed", "0-1", "--yaw", "-30,0,30", "--pitch", "0,10",
                            "--orbit", "3", "-o", str(tmp_path / "r"), "--json"])
    assert r.exit_code == 0, r.output
    assert [s["source"] for s in json.loads(r.stdout)["sources"]] == ["seed0", "seed1"]
    cams = torch.cat(recorded["synthesis"])
    assert cams.shape[0] == 2 * (6 + 3)  # every view and every orbit frame of both seeds
    assert_looks_at(cams, AFHQ_PIVOT)
    assert_looks_at(torch.cat(recorded["mapping"]), AFHQ_PIVOT)  # seeds: the base's frontal camera
    assert not any(miss_distance(c, FFHQ_PIVOT).max() < 1e-3 for c in recorded["synthesis"])  # no FFHQ views
    # the FFHQ base still orbits FFHQ's pivot
    from my3dgen_cli.generators import save_local_base
    from tests.render_fixtures import tiny_generator

    save_local_base(tiny_generator(), "tiny-ffhq")
    recorded["synthesis"].clear()
    r = runner.invoke(app, ["render", "--base", "tiny-ffhq", "--seed", "0", "--yaw", "-30,30",
                            "-o", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    assert_looks_at(torch.cat(recorded["synthesis"]), FFHQ_PIVOT)


def test_interpolate_command_uses_the_afhq_pivot(afhq_base: str, recorded, tmp_path: Path) -> None:
    r = runner.invoke(app, ["interpolate", "seed:1", "seed:2", "--base", afhq_base, "--frames", "5",
                            "--yaw", "-30:30", "-o", str(tmp_path / "morph.gif")])
    assert r.exit_code == 0, r.output
    cams = torch.cat(recorded["synthesis"])
    assert cams.shape[0] == 5
    assert_looks_at(cams, AFHQ_PIVOT)


def test_interpolated_cameras_between_afhq_keys_stay_on_its_rig() -> None:
    from my3dgen_cli.use.interpolate import interpolate_cameras

    rig = camera_rig(afhq_tiny())
    keys = rig.lookat([-20.0, 30.0], [5.0, -5.0])
    path = interpolate_cameras(keys, 7, rig=rig)
    assert_looks_at(path, AFHQ_PIVOT)
    torch.testing.assert_close(path[[0, -1]], keys)


def test_invert_command_yaw_pitch_camera_is_on_the_afhq_rig(afhq_base: str, recorded, tmp_path: Path) -> None:
    from PIL import Image

    crop = tmp_path / "cat.png"
    Image.new("RGB", (64, 64), (120, 90, 60)).save(crop)
    r = runner.invoke(app, ["invert", str(crop), "--base", afhq_base, "--yaw", "20", "--pitch", "5", "--steps", "2",
                            "--refine-camera", "--no-lpips", "-o", str(tmp_path / "cat.latent")])
    assert r.exit_code == 0, r.output
    # refined turns go about the base's pivot, so the camera keeps looking at it (off the sphere)
    assert_looks_at(torch.cat(recorded["synthesis"]), AFHQ_PIVOT, radius=None)


def test_onnx_export_of_an_afhq_base_uses_its_rig(tmp_path: Path) -> None:
    import onnx

    from my3dgen_cli.use.export import check_inputs, export_onnx

    G = afhq_tiny()
    for with_mapping in (False, True):
        for args in check_inputs(G, (1, 2), with_mapping=with_mapping):
            assert_looks_at(args[-1], AFHQ_PIVOT)
            if with_mapping:
                assert_looks_at(args[1], AFHQ_PIVOT)  # the conditioning camera too
    model = tmp_path / "cat.onnx"
    check = export_onnx(G, model, outputs=("image", "raw", "features"))
    assert check.max_abs_diff <= 1e-3, check.diffs
    props = {p.key: p.value for p in onnx.load(str(model)).metadata_props}
    assert props["avg_camera_pivot"] == "0,0,-0.06" and props["avg_camera_radius"] == "2.7"
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ws, camera = check_inputs(G, (1,))[0]
    got = session.run(None, {"ws": ws.numpy(), "camera": camera.numpy()})
    # raw is the official image_raw (rgb of the neural render); features the whole feature image
    assert [o.name for o in session.get_outputs()] == ["image", "raw", "features"]
    assert [list(a.shape) for a in got] == [[1, 3, 64, 64], [1, 3, 32, 32], [1, 16, 32, 32]]
    assert (got[2][:, :3] == got[1]).all()

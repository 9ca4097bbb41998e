"""docs/export.md's onnxruntime script, run as written against tiny exports (so the doc stays true)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.identity import Latent, write_latent
from my3dgen_cli.use.export import ExportedGenerator, export_onnx, merged_generator

DOC = Path(__file__).resolve().parents[1] / "docs" / "export.md"


def doc_script() -> str:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- render_onnx.py -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/export.md lost its render_onnx.py block"
    return match.group(1)


def to_pixels(image: torch.Tensor) -> np.ndarray:
    return ((image[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).round().astype(np.uint8)


def run_script(tmp_path: Path, *args: str) -> np.ndarray:
    script = tmp_path / "render_onnx.py"
    script.write_text(doc_script(), encoding="utf-8")
    out = tmp_path / "view.png"
    subprocess.run([sys.executable, str(script), *args[:2], str(out), *args[2:]], check=True, timeout=120)
    return np.asarray(Image.open(out))


def test_doc_script_is_short() -> None:
    assert len(doc_script().strip().splitlines()) <= 40


@pytest.mark.parametrize("with_mapping", [True, False])
def test_doc_script_renders_the_view(with_mapping: bool, tmp_path: Path) -> None:
    from tests.test_export import make_identity

    make_identity("ana")
    G, _, _, _ = merged_generator(identity="ana")
    model = tmp_path / "ana.onnx"
    export_onnx(G, model, with_mapping=with_mapping, truncation_psi=0.7)
    yaw = 25.0
    if with_mapping:
        z = torch.from_numpy(np.random.default_rng(0).standard_normal((1, G.z_dim)).astype(np.float32))
        args: tuple[torch.Tensor, ...] = (z, frontal_camera(1), lookat_camera(yaw))
        extra: list[str] = []
    else:
        ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(5)), frontal_camera(1), 0.7)
        latent = write_latent(tmp_path / "a.latent", Latent(ws, frontal_camera(1), base="tiny-test", identity="ana"))
        args, extra = (ws, lookat_camera(yaw)), [str(latent)]
    with torch.no_grad():
        want = to_pixels(ExportedGenerator(G, with_mapping=with_mapping, truncation_psi=0.7)(*args)[0])
    got = run_script(tmp_path, str(model), str(yaw), *extra)
    assert got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # a rounding step at most


def test_doc_script_renders_an_afhq_base_from_its_own_pivot(tmp_path: Path) -> None:
    """The script takes the camera rig from the file's metadata: an AFHQ base orbits (0, 0, -0.06)."""
    from my3dgen_cli.eg3d.camera import camera_rig
    from tests.test_camera_rig import afhq_tiny

    G = afhq_tiny()
    model = tmp_path / "cat.onnx"
    export_onnx(G, model)
    rig, yaw = camera_rig(G), -20.0
    ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(5)), rig.frontal(1), 0.7)
    latent = write_latent(tmp_path / "cat.latent", Latent(ws, rig.frontal(1), base="tiny-afhq"))
    with torch.no_grad():
        want = to_pixels(ExportedGenerator(G)(ws, rig.lookat(yaw))[0])
        ffhq = to_pixels(ExportedGenerator(G)(ws, lookat_camera(yaw))[0])
    got = run_script(tmp_path, str(model), str(yaw), str(latent))
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert np.abs(got.astype(int) - ffhq.astype(int)).max() > 1  # FFHQ's pivot would frame it elsewhere

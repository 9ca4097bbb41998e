"""Shared by test_render*, test_invert* and test_interpolate*: a seeded tiny generator as the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from my3dgen_cli.eg3d import build_generator


def training_render(G: torch.nn.Module, ws: torch.Tensor, cams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A training-mode synthesis of ws from cams, and the gradient of a loss on its image and depth that reaches ws."""
    w = ws.clone().requires_grad_(True)
    out = G.synthesis(w, cams, noise_mode="const", sampling="deterministic")
    (out["image"].square().mean() + out["image_depth"].mean()).backward()
    return out["image"].detach(), w.grad


def tiny_generator(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    G = build_generator("tiny")
    for p in G.parameters():
        p.requires_grad_(False)
    return G.eval()


@pytest.fixture
def tiny_base(monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """Every `open_base` (so `open_generator`, `--base`) returns the same seeded tiny generator.

    The library is mocked at the one place that reads weights from disk, as the CLI tests of
    the style guide do; the commands above it run for real.
    """
    from my3dgen_cli import generators
    from my3dgen_cli.lora import base_fingerprint

    G = tiny_generator()
    ref = generators.BaseRef(name="tiny-test", path=generators.local_bases_dir() / "tiny-test.safetensors",
                             sha256=base_fingerprint(G))

    def fake_open_base(base, device=None, offline=None):
        return G, ref

    monkeypatch.setattr(generators, "open_base", fake_open_base)
    return G


def assert_same_synthesis(G: torch.nn.Module, reference: torch.nn.Module) -> None:
    """G renders bit-identically to `reference`: two seeds, two views (an opened base vs its source)."""
    from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera

    z = torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(0))
    c = lookat_camera([-25.0, 10.0], 0.0)
    with torch.no_grad():
        ours = G.synthesis(G.mapping(z, frontal_camera(2)), c)["image"]
        expected = reference.synthesis(reference.mapping(z, frontal_camera(2)), c)["image"]
    assert torch.equal(ours, expected)


def assert_parity_case(G: torch.nn.Module, case_path: Path, channels_last: bool = False) -> None:
    """G reproduces one official case of ../shared/eg3d_parity (deterministic, noise 'const') to 1e-3."""
    data = load_file(case_path)
    with safe_open(case_path, "pt") as f:
        meta = f.metadata()
    with torch.no_grad():
        ws = G.mapping(data["z"], data["c_cond"], truncation_psi=float(meta["psi"]),
                       truncation_cutoff=int(meta["truncation_cutoff"]))
        out = G.synthesis(ws, data["c_render"], neural_rendering_resolution=int(meta["nrr"]),
                          noise_mode="const", sampling="deterministic", channels_last=channels_last)
    assert (ws - data["ws"]).abs().max() <= 1e-4
    assert (out["image"] - data["image"]).abs().max() <= 1e-3
    # image_raw is the official key: the 3-channel rgb of the neural render, as the fixture stores it
    assert out["image_raw"].shape == data["image_raw_rgb"].shape
    assert (out["image_raw"] - data["image_raw_rgb"]).abs().max() <= 1e-3
    assert torch.equal(out["image_features"][:, :3], out["image_raw"])
    assert (out["image_depth"] - data["image_depth"]).abs().max() <= 1e-3

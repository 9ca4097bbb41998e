"""The compiled tri-plane sampler (eg3d/plane_kernels.py) against torch's grid_sample, which the reference path uses.

A user would check that a render and its gradients do not depend on which sampler ran: the mean over
the planes of bilinear samples (zeros outside the planes, align_corners False) and the gradient that
reaches the planes, for points inside, on the edge of and outside the box.
"""

from __future__ import annotations

import pytest
import torch

from my3dgen_cli.eg3d import build_generator, ops, plane_kernels
from my3dgen_cli.eg3d.camera import lookat_camera
from my3dgen_cli.eg3d.renderer import gather_planes, mean_plane_features
from tests.render_fixtures import training_render

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(plane_kernels._loops() is None, reason="numba is not installed"),
]


def _planes_and_points(n: int = 2, c: int = 5, h: int = 7, w: int = 11, m: int = 3000) -> tuple[torch.Tensor, ...]:
    """Non-square planes (an axis swap shows) and points spread past the box (box_warp 2: coordinates +-1)."""
    torch.manual_seed(0)
    planes = torch.randn(n, 3, c, h, w, requires_grad=True)
    points = torch.rand(n, m, 3) * 2.6 - 1.3
    points[:, :8] = torch.tensor([-1.0, 1.0, 0.0, 0.999]).repeat(6)[:24].reshape(8, 3)  # exactly on the edges
    return planes, points


def test_plane_means_match_grid_sample_values_and_gradients():
    planes, points = _planes_and_points()
    fast = plane_kernels.plane_means(plane_kernels.plane_table(planes), points, 2.0)
    ref = mean_plane_features(planes, points, 2.0)
    assert fast.shape == ref.shape == (2, 3000, 5)
    assert (ref == 0).all(-1).any()  # some points lie outside every plane
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-6)
    weights = torch.randn_like(ref)
    (grad_fast,) = torch.autograd.grad((fast * weights).sum(), planes)
    (grad_ref,) = torch.autograd.grad((ref * weights).sum(), planes)
    assert grad_ref.abs().max() > 0
    torch.testing.assert_close(grad_fast, grad_ref, rtol=0, atol=1e-5)


def test_gathered_planes_are_read_in_place():
    planes, points = _planes_and_points()
    gathered = gather_planes(planes.detach())
    table = plane_kernels.plane_table(gathered)
    assert table.data_ptr() == gathered.data_ptr()  # a view: inference renders copy nothing
    assert torch.equal(table, plane_kernels.plane_table(planes.detach()))


def test_points_split_over_threads_give_the_same_result(monkeypatch):
    planes, points = _planes_and_points()
    one = plane_kernels.plane_means(plane_kernels.plane_table(planes), points, 2.0)
    (grad_one,) = torch.autograd.grad(one.sum(), planes)
    monkeypatch.setattr(plane_kernels, "PARALLEL_POINTS", 500)
    torch.set_num_threads(2)  # the one_thread fixture restores the count
    two = plane_kernels.plane_means(plane_kernels.plane_table(planes), points, 2.0)
    (grad_two,) = torch.autograd.grad(two.sum(), planes)
    assert torch.equal(one, two)  # each point is computed alone
    torch.testing.assert_close(grad_two, grad_one, rtol=0, atol=1e-5)  # per-thread sums, added


def test_inference_takes_the_kernels_for_large_planes_only(monkeypatch):
    """Without autograd, planes keep grid_sample (numba's memory in a render); with a threshold set, small planes
    (the tiny config's) still do."""
    small, large = torch.zeros(1, 3, 4, 32, 32), torch.zeros(1, 3, 1, 128, 128)
    assert plane_kernels.usable(small) and plane_kernels.usable(large)  # training: always
    with torch.no_grad():
        assert not plane_kernels.usable(small) and not plane_kernels.usable(large)
    monkeypatch.setattr(plane_kernels, "INFERENCE_MIN_TEXELS", 128 * 128)
    with torch.no_grad():
        assert not plane_kernels.usable(small) and plane_kernels.usable(large)
        assert not plane_kernels.usable(large.double())
        with ops.reference_paths():
            assert not plane_kernels.usable(large)


def test_nan_and_infinite_coordinates_read_and_receive_nothing():
    """A hostile camera or latent can put NaN or inf into the points: no read or write off the table."""
    planes, points = _planes_and_points(m=10)
    points[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")]).unsqueeze(-1)
    points[0, 3:] = 1e30
    out = plane_kernels.plane_means(plane_kernels.plane_table(planes), points, 2.0)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    (grad,) = torch.autograd.grad(out[0].sum(), planes)
    assert torch.equal(grad, torch.zeros_like(grad))


def test_coordinates_that_need_a_gradient_are_refused():
    planes, points = _planes_and_points(m=10)
    with pytest.raises(ValueError, match="no gradient"):
        plane_kernels.plane_means(plane_kernels.plane_table(planes), points.requires_grad_(), 2.0)


def test_render_without_numba_uses_grid_sample_and_agrees(monkeypatch):
    """A training render (image and the latents' gradient) with the kernels, without numba, and op by op."""
    torch.manual_seed(0)
    G = build_generator("tiny").train()
    ws = torch.randn(2, G.num_ws, G.w_dim)
    cams = lookat_camera(torch.tensor([-20.0, 25.0]), 5.0)
    calls = []
    real = plane_kernels.plane_means
    monkeypatch.setattr(plane_kernels, "plane_means", lambda *a: calls.append(1) or real(*a))

    image, grad = training_render(G, ws, cams)
    assert len(calls) == 2  # the coarse and the importance pass
    monkeypatch.setattr(plane_kernels, "_loops", lambda: None)
    assert not plane_kernels.usable(torch.zeros(1, 3, 4, 8, 8))
    plain = training_render(G, ws, cams)
    with ops.reference_paths():
        ref = training_render(G, ws, cams)
    assert len(calls) == 2
    for other in (plain, ref):
        torch.testing.assert_close(image, other[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(grad, other[1], rtol=1e-4, atol=1e-5 * other[1].abs().max().item())


def test_the_official_parity_fixture_renders_through_the_kernels(shared_dir, monkeypatch):
    """../shared/eg3d_parity (the official code's outputs, 256 px planes) through the compiled loops, to 1e-3."""
    import json

    from safetensors.torch import load_file

    from tests.render_fixtures import assert_parity_case

    folder = shared_dir / "eg3d_parity"
    G = build_generator(json.loads((folder / "config.json").read_text()))
    G.load_state_dict({k: v.float() for k, v in load_file(folder / "weights.safetensors").items()}, strict=True)
    calls = []
    real = plane_kernels.plane_means
    monkeypatch.setattr(plane_kernels, "plane_means", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(plane_kernels, "INFERENCE_MIN_TEXELS", 128 * 128)  # off by default in inference
    assert_parity_case(G, folder / "case0.safetensors")
    assert calls  # the render sampled with the kernels, not grid_sample

"""Adapted convolutions trained through their factors only (eg3d/lowrank_conv.py) agree with autograd
through `W + delta`, and the generator takes that path only where it is exact: training, base frozen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from my3dgen_cli.eg3d import build_generator, layers, ops
from my3dgen_cli.eg3d.camera import lookat_camera
from my3dgen_cli.eg3d.layers import SynthesisLayer
from my3dgen_cli.eg3d.lowrank_conv import lowrank_conv2d
from my3dgen_cli.lora import adapter_layers, add_adapters

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("kernel", [1, 3])
def test_lowrank_conv_matches_autograd_through_the_merged_weight(transposed, kernel):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    base = torch.randn(7, 5, kernel, kernel, dtype=torch.float64)
    a = torch.randn(3, 5, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)

    def merged() -> torch.Tensor:
        return base + (b @ a.reshape(3, -1)).reshape(base.shape)

    def plain() -> torch.Tensor:
        if transposed:
            return F.conv_transpose2d(x, merged().transpose(0, 1), stride=2)
        return F.conv2d(x, merged(), padding=kernel // 2)

    def low_rank() -> torch.Tensor:
        b4 = b.reshape(7, 3, 1, 1)
        if transposed:
            return lowrank_conv2d(x, merged().transpose(0, 1), a.transpose(0, 1), b4, stride=2, transposed=True)
        return lowrank_conv2d(x, merged(), a, b4, padding=kernel // 2)

    grad = torch.randn_like(plain())
    results = []
    for run in (plain, low_rank):
        y = run()
        results.append([y, *torch.autograd.grad(y, (x, a, b), grad)])
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.fixture
def every_conv(monkeypatch):
    """The tiny config's convs are below the size where the path pays: take it anyway, to test it."""
    monkeypatch.setattr(layers, "LOW_RANK_MIN_WEIGHT", 0)
    monkeypatch.setattr(layers, "LOW_RANK_MIN_OUT_PER_RANK", 0)


@pytest.fixture
def low_rank_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = ops.lowrank_conv2d
    monkeypatch.setattr(ops, "lowrank_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _adapted_tiny(style: str, **kw):
    torch.manual_seed(0)
    G = build_generator("tiny").train()
    add_adapters(G, rank=2, style=style, generator=torch.Generator().manual_seed(1), **kw)
    with torch.no_grad():  # non-zero B so every factor gets a gradient
        for adapter in adapter_layers(G).values():
            adapter.lora_B.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
    return G


def _factor_grads(G) -> tuple[float, list[torch.Tensor]]:
    ws = torch.randn(2, G.num_ws, G.w_dim, generator=torch.Generator().manual_seed(3))
    cams = lookat_camera(torch.tensor([-20.0, 25.0]), 0.0)
    image = G.synthesis(ws, cams, noise_mode="const", sampling="deterministic")["image"]
    loss = image.square().mean()
    params = [p for a in adapter_layers(G).values() for p in (a.lora_A, a.lora_B)]
    return loss.item(), list(torch.autograd.grad(loss, params))


@pytest.mark.parametrize("style", ["my3dgen", "peft"])
def test_training_pass_takes_the_low_rank_path_and_matches_the_reference(style, every_conv, low_rank_calls):
    G = _adapted_tiny(style)
    loss, grads = _factor_grads(G)
    convs = sum(1 for name in adapter_layers(G) if not name.endswith("affine"))
    assert len(low_rank_calls) == convs > 0  # every adapted conv (backbone and superresolution, up-sampling too)
    low_rank_calls.clear()
    with ops.reference_paths():
        ref_loss, ref_grads = _factor_grads(G)
    assert low_rank_calls == []
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_low_rank_path_stays_off_where_it_would_be_wrong(every_conv, low_rank_calls):
    G = _adapted_tiny("my3dgen")
    with torch.no_grad():  # rendering: no gradient to save
        _ = G.synthesis(torch.zeros(1, G.num_ws, G.w_dim), lookat_camera(torch.tensor([0.0]), 0.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts inside the conv: keep torch's own
        _factor_grads(G)
    assert low_rank_calls == []
    G.backbone.synthesis.b8.conv0.weight.requires_grad_(True)  # a trainable base needs its own full gradient
    _factor_grads(G)
    assert len(low_rank_calls) == sum(1 for n in adapter_layers(G) if not n.endswith("affine")) - 1


@pytest.mark.parametrize("up", [1, 2])
def test_only_convs_large_enough_to_pay_take_it_by_default(up, low_rank_calls):
    """Defaults: a full-size-like 128 -> 128 conv takes the path, with the reference's gradients; the tiny
    config's convs (at most 32 x 32 x 3 x 3) do not."""
    torch.manual_seed(0)
    layer = SynthesisLayer(128, 128, w_dim=8, resolution=8, up=up).train()
    add_adapters(layer, rank=1, targets=[""], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.adapter.lora_B.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(2))
    x = torch.randn(2, 128, 8 // up, 8 // up, requires_grad=True)
    w = torch.randn(2, 8)
    params = [layer.adapter.lora_A, layer.adapter.lora_B, x]
    results = []
    for reference in (False, True):
        with ops.reference_paths() if reference else torch.enable_grad():
            y = layer(x, w, noise_mode="const", fused_modconv=False)
            results.append(torch.autograd.grad(y.square().sum(), params))
    assert len(low_rank_calls) == 1
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    low_rank_calls.clear()
    _factor_grads(_adapted_tiny("my3dgen"))
    assert low_rank_calls == []
    assert layers.adapted_conv_factors(layer) is not None
    assert layers.adapted_conv_factors(layer.to("meta")) is None  # other devices: not measured, plain form

"""Inference in pieces: a synthesis block by row bands, a render's rays in groups, equal the whole forms."""

from __future__ import annotations

import pytest
import torch

from my3dgen_cli.eg3d import build_generator, ops, renderer, row_strips
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from my3dgen_cli.eg3d.layers import SynthesisBlock


class _Delta(torch.nn.Module):
    """An adapter stand-in: a fixed delta on the weight (the bands must read `effective_weight()`)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 0.1 * torch.ones_like(weight)


def _block(up: bool, channels: int = 6) -> SynthesisBlock:
    torch.manual_seed(3)
    block = SynthesisBlock(channels, channels, 16, 256, 3, conv_clamp=256, up=up).eval()
    for layer in block.layers():
        layer.noise_strength.data.fill_(0.3)
        layer.bias.data.normal_()
    block.conv1.adapter = _Delta()
    return block


def _whole(block: SynthesisBlock, *args, **kwargs):
    """The block's forward as one piece (the bands' threshold out of reach)."""
    saved, row_strips.MIN_RESOLUTION = row_strips.MIN_RESOLUTION, 1 << 30
    try:
        return block(*args, **kwargs)
    finally:
        row_strips.MIN_RESOLUTION = saved


def _inputs(block: SynthesisBlock, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    res = block.resolution // (2 if block.up else 1)
    x = torch.randn(batch, block.in_channels, res, res, generator=g)
    img = torch.randn(batch, 3, res, res, generator=g)
    return x, img, torch.randn(batch, 3, 16, generator=g)


@pytest.mark.parametrize("up", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("noise_mode", ["const", "none"])
def test_block_image_by_bands_equals_the_whole_block(up: bool, channels_last: bool, noise_mode: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    block = _block(up)
    x, img, ws = _inputs(block, batch=2)
    monkeypatch.setattr(row_strips, "BAND_BYTES", 1)  # bands of MIN_BAND_ROWS: 8 of them, halo everywhere
    monkeypatch.setattr(row_strips, "MIN_BAND_ROWS", 30)  # 30 rows: the last band is short (256 = 8 x 30 + 16)
    assert row_strips.band_rows(block, 2) == 30
    with torch.no_grad():
        whole_x, whole = _whole(block, x, img, ws, noise_mode=noise_mode, channels_last=channels_last)
        assert row_strips.applies(block, x, fused_modconv=True)
        none_x, bands = block(x, img, ws, noise_mode=noise_mode, channels_last=channels_last, keep_x=False)
        kept_x, kept = block(x, img, ws, noise_mode=noise_mode, channels_last=channels_last)
    assert none_x is None and whole_x is not None
    assert bands.shape == whole.shape == (2, 3, 256, 256) and bands.dtype == torch.float32
    assert (bands - whole).abs().max() <= 1e-5 * whole.abs().max()
    assert torch.equal(kept, bands)
    assert kept_x.shape == whole_x.shape and (kept_x - whole_x).abs().max() <= 1e-5 * whole_x.abs().max()
    # the layout the next layer reads without a copy: the fused conv's own (NHWC of [1, N*C, R, R] or NCHW)
    assert kept_x.stride() == whole_x.stride()
    assert not torch.equal(bands, img) and not torch.equal(whole[:, :, :30], whole[:, :, 30:60])


@pytest.mark.parametrize("first_up", [True, False])  # the 8X superresolutions, and the 4X / 2X ones
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("band", [30, 64])
def test_two_blocks_by_bands_equal_the_two_whole_blocks(first_up: bool, channels_last: bool, band: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(4)
    first = SynthesisBlock(5, 6, 16, 128 if first_up else 256, 3, conv_clamp=256, up=first_up).eval()
    second = SynthesisBlock(6, 4, 16, 256 if first_up else 512, 3, conv_clamp=256).eval()
    for layer in [*first.layers(), *second.layers()]:
        layer.noise_strength.data.fill_(0.3)
        layer.bias.data.normal_()
    first.conv1.adapter = _Delta()
    g = torch.Generator().manual_seed(1)
    res = first.resolution // (2 if first_up else 1)
    x, img = torch.randn(2, 5, res, res, generator=g), torch.randn(2, 3, res, res, generator=g)
    ws_first, ws_second = torch.randn(2, 3, 16, generator=g), torch.randn(2, 3, 16, generator=g)
    monkeypatch.setattr(row_strips, "MIN_RESOLUTION", 64)
    monkeypatch.setattr(row_strips, "BAND_BYTES", 1)
    monkeypatch.setattr(row_strips, "MIN_BAND_ROWS", band)  # 30: bands that split the first block's rows unevenly
    for noise_mode in ("const", "random"):
        with torch.no_grad():
            gen = torch.Generator().manual_seed(7)  # random: both blocks draw from one generator, first then second
            mid_x, mid = _whole(first, x, img, ws_first, noise_mode=noise_mode, generator=gen,
                                channels_last=channels_last)
            _, whole = _whole(second, mid_x, mid, ws_second, noise_mode=noise_mode, generator=gen,
                              channels_last=channels_last)
            pair = row_strips.pair_image(first, second, x, img, ws_first, ws_second, noise_mode=noise_mode,
                                         generator=torch.Generator().manual_seed(7), channels_last=channels_last)
        assert pair.shape == whole.shape == (2, 3, second.resolution, second.resolution)
        assert (pair - whole).abs().max() <= 1e-5 * whole.abs().max(), noise_mode


def test_random_noise_by_bands_draws_what_the_whole_block_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    block = _block(up=True)
    x, img, ws = _inputs(block, batch=1)
    monkeypatch.setattr(row_strips, "BAND_BYTES", 1)
    with torch.no_grad():
        _, whole = _whole(block, x, img, ws, noise_mode="random", generator=torch.Generator().manual_seed(5))
        _, bands = block(x, img, ws, noise_mode="random", generator=torch.Generator().manual_seed(5), keep_x=False)
        _, other = block(x, img, ws, noise_mode="random", generator=torch.Generator().manual_seed(6), keep_x=False)
    assert (bands - whole).abs().max() <= 1e-5 * whole.abs().max()
    assert (other - whole).abs().max() > 1e-3  # the noise is drawn, and drawn from the generator given


def test_bands_are_left_to_autograd_small_blocks_and_the_reference_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    block = _block(up=True)
    x, img, ws = _inputs(block, batch=1)
    with torch.no_grad():
        assert not row_strips.applies(block, x, fused_modconv=True)  # 6 channels: one band holds the whole image
    monkeypatch.setattr(row_strips, "BAND_BYTES", 1)
    with torch.no_grad():
        assert row_strips.applies(block, x, fused_modconv=True)
        assert not row_strips.applies(block, x, fused_modconv=False)
        with ops.reference_paths():
            assert not row_strips.applies(block, x, fused_modconv=True)
    assert not row_strips.applies(block, x, fused_modconv=True)  # autograd: x's activations are needed
    small = SynthesisBlock(4, 4, 16, 128, 3).eval()
    with torch.no_grad():
        assert not row_strips.applies(small, torch.zeros(1, 4, 64, 64), fused_modconv=True)


def test_generator_takes_the_bands_and_grouped_rays_and_renders_the_same_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring: a render's large blocks go by bands, its rays by groups, and the view is the one the
    whole forms give (tiny config, thresholds lowered to reach it)."""
    torch.manual_seed(0)
    G = build_generator("tiny").eval()
    g = torch.Generator().manual_seed(0)
    ws = G.mapping(torch.randn(2, G.z_dim, generator=g), frontal_camera(2)).detach()
    c = lookat_camera(torch.tensor([-20.0, 25.0]), 5.0)
    with torch.no_grad():
        whole = G.synthesis(ws, c, sampling="deterministic")
    calls: list[int] = []
    block_forward, pair_image = row_strips.block_forward, row_strips.pair_image
    monkeypatch.setattr(row_strips, "block_forward", lambda block, *a, **k: calls.append(block.resolution)
                        or block_forward(block, *a, **k))
    monkeypatch.setattr(row_strips, "pair_image", lambda one, two, *a, **k: calls.append((one.resolution,
                        two.resolution)) or pair_image(one, two, *a, **k))
    monkeypatch.setattr(row_strips, "MIN_RESOLUTION", 32)
    monkeypatch.setattr(row_strips, "BAND_BYTES", 1)
    monkeypatch.setattr(row_strips, "MIN_BAND_ROWS", 8)
    monkeypatch.setattr(renderer, "RENDER_RAYS", 200)  # 2 x 1024 rays in groups of 100 per view
    with torch.no_grad():
        grouped = G.synthesis(ws, c, sampling="deterministic")
    sr = G.superresolution
    assert set(calls) == {G.backbone.synthesis.img_resolution, (sr.block0.resolution, sr.block1.resolution)}
    for key in ("image", "image_raw", "image_depth"):
        assert (grouped[key] - whole[key]).abs().max() <= 1e-5 * whole[key].abs().max(), key


def test_stochastic_rays_are_not_grouped_so_their_draws_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    G = build_generator("tiny").eval()
    ws = G.mapping(torch.randn(1, G.z_dim), frontal_camera(1)).detach()
    c = lookat_camera(torch.tensor([10.0]), 5.0)
    with torch.no_grad():
        before = G.synthesis(ws, c, sampling="stochastic", generator=torch.Generator().manual_seed(2))
        monkeypatch.setattr(renderer, "RENDER_RAYS", 100)
        after = G.synthesis(ws, c, sampling="stochastic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(before["image"], after["image"])


@pytest.mark.parametrize("batch", [1, 2])
def test_two_blocks_by_bands_in_nhwc_feed_every_conv_nhwc(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """In NHWC every convolution of the pair reads its activations as they are: none is copied from NCHW
    first (the rows kept between bands were concatenated into NCHW, and copied back for every band)."""
    torch.manual_seed(4)
    first = SynthesisBlock(5, 6, 16, 128, 3, conv_clamp=256, up=True).eval()
    second = SynthesisBlock(6, 4, 16, 256, 3, conv_clamp=256).eval()
    g = torch.Generator().manual_seed(1)
    # the layout a fused conv gives (NHWC of the grouped [1, N*C, H, W]), which the first block's conv reads
    x = ops.nhwc(torch.randn(1, batch * 5, 64, 64, generator=g), True).view(batch, 5, 64, 64)
    img, ws = torch.randn(batch, 3, 64, 64, generator=g), torch.randn(batch, 3, 16, generator=g)
    monkeypatch.setattr(row_strips, "MIN_RESOLUTION", 64)
    monkeypatch.setattr(row_strips, "BAND_BYTES", 1)
    monkeypatch.setattr(row_strips, "MIN_BAND_ROWS", 30)
    laid_out, copied = ops.nhwc, []

    def nhwc(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
        out = laid_out(t, channels_last)
        if t.shape[-1] >= 64 and out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            copied.append(tuple(t.shape))  # an activation (not a 3x3 weight or a 4x4 blur kernel) copied
        return out

    monkeypatch.setattr(ops, "nhwc", nhwc)
    with torch.no_grad():
        row_strips.pair_image(first, second, x, img, ws, ws, channels_last=True)
    assert copied == [], copied


def test_planes_made_in_the_sampled_layout_are_not_copied_again() -> None:
    """synthesis stores its tri-planes in the render's gather layout: the render then samples them as they are
    (a copy would live beside them through the render: 25 MiB at full size)."""
    planes = torch.randn(2, 3, 4, 8, 8)
    stored = renderer.sampling_layout(planes)
    assert torch.equal(stored, planes)
    assert renderer.gather_planes(stored).data_ptr() == stored.data_ptr()
    assert renderer.gather_planes(planes).data_ptr() != planes.data_ptr()


def test_random_noise_under_autocast_keeps_the_whole_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each layer draws random noise in its input's dtype; under autocast only the whole block knows it."""
    block = _block(up=True)
    x = _inputs(block, batch=1)[0]
    monkeypatch.setattr(row_strips, "BAND_BYTES", 1)
    with torch.no_grad():
        assert row_strips.applies(block, x, True, "random")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not row_strips.applies(block, x, True, "random")
            assert row_strips.applies(block, x, True, "const")

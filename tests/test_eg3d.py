"""EG3D generator: official names and sizes, parity with the official outputs, numerics, gradients."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from my3dgen_cli.eg3d import build_generator, count_parameters, ops
from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
from tests.render_fixtures import assert_parity_case


def _tiny_inputs(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g), frontal_camera(n), lookat_camera(torch.linspace(-30, 30, n), 5.0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_generator("tiny")


def test_full_config_has_the_official_parameter_count() -> None:
    with torch.device("meta"):
        G = build_generator("ffhq512-128")
    assert count_parameters(G) == 30_662_136
    assert count_parameters(G.backbone.mapping) == 800_768
    assert count_parameters(G.backbone.synthesis) == 28_207_533
    assert count_parameters(G.superresolution) == 1_649_578
    assert count_parameters(G.decoder) == 4_257
    assert G.num_ws == 14


def test_full_config_state_dict_equals_the_official_names_and_shapes(shared_dir: Path) -> None:
    with torch.device("meta"):
        G = build_generator("ffhq512-128")
    ours = {k: list(v.shape) for k, v in G.state_dict().items()}
    official = {}
    for line in (shared_dir / "eg3d" / "g_ema_state_dict_keys.txt").read_text().splitlines():
        name, shape = line.split("\t")
        official[name] = json.loads(shape)
    assert ours == official


@pytest.mark.parametrize("variant", ["fast", "reference", "nhwc", "small bands"])
@pytest.mark.parametrize("case", [0, 1, 2])
def test_matches_official_implementation(shared_dir: Path, case: int, variant: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Every path holds parity: the default fast one (fused compositing, softplus from exp/log), the
    reference one (ops.reference_paths()), NHWC convolutions (the CPU render default where they are
    faster: cpu_layout.py), and the smallest row bands and ray groups (row_strips.py: at this reduced
    width the backbone's last block is otherwise one band)."""
    if variant == "small bands":
        from my3dgen_cli.eg3d import renderer, row_strips

        monkeypatch.setattr(row_strips, "BAND_BYTES", 1)
        monkeypatch.setattr(renderer, "RENDER_RAYS", 256)
    folder = shared_dir / "eg3d_parity"
    G = build_generator(json.loads((folder / "config.json").read_text()))
    weights = {k: v.float() for k, v in load_file(folder / "weights.safetensors").items()}
    G.load_state_dict(weights, strict=True)
    with ops.reference_paths() if variant == "reference" else contextlib.nullcontext():
        assert_parity_case(G, folder / f"case{case}.safetensors", channels_last=variant == "nhwc")


@pytest.mark.parametrize("case", [0, 1, 2])
def test_bf16_render_of_the_official_fixture_is_close_to_its_fp32_output(shared_dir: Path, case: int) -> None:
    """`render --amp bf16` on real official weights (../shared/eg3d_parity), against the official code's fp32
    image: #17's bound (max abs diff <= 0.05) with a margin for other CPUs' kernels (measured 0.035-0.047, mean
    0.009-0.011, images reaching 2.3-3.6). Needs bf16 CPU kernels: elsewhere bf16 is refused, and slow."""
    from safetensors import safe_open

    from my3dgen_cli.speed import cpu_has_bf16_kernels

    if not cpu_has_bf16_kernels():
        pytest.skip("this CPU has no bf16 kernels (render --amp bf16 is refused here)")
    folder = shared_dir / "eg3d_parity"
    G = build_generator(json.loads((folder / "config.json").read_text())).eval()
    G.load_state_dict({k: v.float() for k, v in load_file(folder / "weights.safetensors").items()}, strict=True)
    data = load_file(folder / f"case{case}.safetensors")
    with safe_open(folder / f"case{case}.safetensors", "pt") as f:
        meta = f.metadata()
    with torch.no_grad():
        ws = G.mapping(data["z"], data["c_cond"], truncation_psi=float(meta["psi"]),
                       truncation_cutoff=int(meta["truncation_cutoff"]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = G.synthesis(ws, data["c_render"], neural_rendering_resolution=int(meta["nrr"]), noise_mode="const",
                              sampling="deterministic", channels_last=True)
    error = (out["image"].float() - data["image"]).abs()
    assert error.max() <= 0.08 and error.mean() <= 0.015, (error.max(), error.mean())


def test_tiny_outputs_shapes_dtype_and_depth_range(tiny) -> None:
    z, c_cond, c = _tiny_inputs()
    with torch.no_grad():
        out = tiny.synthesis(tiny.mapping(z, c_cond, truncation_psi=0.7), c)
    assert out["image"].shape == (2, 3, 64, 64)
    assert out["image_raw"].shape == (2, 3, 32, 32)  # the official key: rgb of the neural render
    assert out["image_features"].shape == (2, 16, 32, 32)  # what superresolution reads
    assert torch.equal(out["image_features"][:, :3], out["image_raw"])
    assert out["image_depth"].shape == (2, 1, 32, 32)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    rk = tiny.rendering_kwargs
    assert out["image_depth"].min() >= rk["ray_start"] and out["image_depth"].max() <= rk["ray_end"] + 1e-6
    # The raw render is composited colour in [-1, 1] (sigmoid widened by 0.001, times weights <= 1).
    assert out["image_raw"].abs().max() <= 1.0 + 3e-3


def test_deterministic_sampling_repeats_bitwise_and_stochastic_follows_its_generator(tiny) -> None:
    z, c_cond, c = _tiny_inputs()
    with torch.no_grad():
        ws = tiny.mapping(z, c_cond)
        a = tiny.synthesis(ws, c)["image"]
        b = tiny.synthesis(ws, c)["image"]
        s1 = tiny.synthesis(ws, c, sampling="stochastic", generator=torch.Generator().manual_seed(1))["image"]
        s1b = tiny.synthesis(ws, c, sampling="stochastic", generator=torch.Generator().manual_seed(1))["image"]
        s2 = tiny.synthesis(ws, c, sampling="stochastic", generator=torch.Generator().manual_seed(2))["image"]
    assert torch.equal(a, b)
    assert torch.equal(s1, s1b)
    assert not torch.equal(s1, s2) and not torch.equal(a, s1)


def test_fused_and_unfused_modconv_agree(tiny) -> None:
    z, c_cond, c = _tiny_inputs()
    with torch.no_grad():
        ws = tiny.mapping(z, c_cond)
        fused = tiny.synthesis(ws, c, fused_modconv=True)
        unfused = tiny.synthesis(ws, c, fused_modconv=False)
    for key in fused:
        assert (fused[key] - unfused[key]).abs().max() <= 1e-5, key


def test_gradients_reach_every_used_parameter() -> None:
    torch.manual_seed(1)
    G = build_generator("tiny").train()
    z, c_cond, c = _tiny_inputs()
    out = G.synthesis(G.mapping(z, c_cond), c)
    (out["image"].square().mean() + out["image_raw"].mean() + out["image_depth"].mean()).backward()
    # Superresolution runs with noise mode 'none' (official), so its noise strengths are never read.
    unused = {n for n, _ in G.named_parameters() if n.startswith("superresolution") and n.endswith("noise_strength")}
    missing = [n for n, p in G.named_parameters() if n not in unused and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_upsampling_conv_equals_the_reference_upfirdn_path() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, 8, generator=g)
    w = torch.randn(7, 5, 3, 3, generator=g)
    f = ops.setup_filter([1, 3, 3, 1])
    fast = ops.conv2d_up2(x, w, f)
    # Official generic path: zero-insert, pad, blur (gain 4), then a true convolution (flipped weight).
    reference = F.conv2d(ops.upfirdn2d(x, f, up=2, padding=(3, 2, 3, 2), gain=4.0), w.flip([2, 3]))
    assert fast.shape == (2, 7, 16, 16)
    assert (fast - reference).abs().max() <= 1e-5


def test_symmetric_padding_blur_equals_padding_first() -> None:
    g = torch.Generator().manual_seed(0)
    x, bias = torch.randn(2, 5, 9, 9, generator=g), torch.randn(5, generator=g)
    f = ops.setup_filter([1, 3, 3, 1])
    fast = ops.upfirdn2d(x, f, padding=(1, 1, 1, 1), gain=4.0, bias=bias)
    reference = ops.upfirdn2d(F.pad(x, [1, 1, 1, 1]), f, gain=4.0) + bias.reshape(1, -1, 1, 1)
    assert fast.shape == (2, 5, 8, 8)
    assert (fast - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("up", [1, 2])
def test_inference_conv_epilogue_equals_conv_then_bias_act(up: int) -> None:
    g = torch.Generator().manual_seed(up)
    x, w = torch.randn(2, 6, 8, 8, generator=g), torch.randn(4, 6, 3, 3, generator=g)
    styles, bias = torch.randn(2, 6, generator=g), torch.randn(4, generator=g)
    noise = torch.randn(8 * up, 8 * up, generator=g) * 0.1
    f = ops.setup_filter([1, 3, 3, 1])
    reference = ops.bias_act(ops.modulated_conv2d(x, w, styles, noise=noise, up=up, resample_filter=f), bias,
                             act="lrelu", clamp=0.5)
    fast = ops.modulated_conv2d_lrelu(x, w, styles, bias, noise=noise, up=up, resample_filter=f, clamp=0.5)
    assert (reference.abs() == 0.5).any() and (reference < 0).any()  # the clamp and the slope both act
    assert torch.equal(fast, reference)  # bitwise: the same ops in the same order, only in place


@pytest.mark.parametrize(("up", "channels_last"), [(1, False), (2, False), (2, True)])
def test_bf16_conv_epilogue_rounds_once(up: int, channels_last: bool) -> None:
    """Under bf16 autocast the bias and the lrelu gain go into the convolution (one rounding of the output
    instead of one per element-wise step): closer to the fp32 layer than the epilogue run op by op."""
    g = torch.Generator().manual_seed(up)
    x, w = torch.randn(2, 64, 16, 16, generator=g), torch.randn(32, 64, 3, 3, generator=g)
    styles, bias = torch.randn(2, 64, generator=g), torch.randn(32, generator=g)
    f = ops.setup_filter([1, 3, 3, 1])
    exact = ops.modulated_conv2d_lrelu(x, w, styles, bias, up=up, resample_filter=f, clamp=2.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        folded = ops.modulated_conv2d_lrelu(x, w, styles, bias, up=up, resample_filter=f, clamp=2.0,
                                            channels_last=channels_last)
        op_by_op = ops.bias_act(ops.modulated_conv2d(x, w, styles, up=up, resample_filter=f),
                                bias.to(torch.bfloat16), act="lrelu", clamp=2.0)
    assert folded.dtype == torch.bfloat16 and folded.shape == exact.shape
    assert (exact.abs() == 2.0).any() and (exact < 0).any()  # the clamp and the slope both act
    folded_error = (folded.float() - exact).abs().mean()
    assert folded_error < 0.9 * (op_by_op.float() - exact).abs().mean()  # measured 0.76-0.83
    assert (folded.float() - exact).abs().max() < 0.05


def test_tri_planes_are_bitwise_alike_with_and_without_autograd(tiny) -> None:
    """Inference takes the in-place conv epilogue, autograd and reference_paths() the allocating one: the
    planes must not tell them apart (two commands rendering one latent, one under autograd, same pixels)."""
    z, c_cond, _ = _tiny_inputs()
    ws = tiny.mapping(z, c_cond).detach()
    with torch.enable_grad():
        with_autograd = tiny.planes(ws.requires_grad_(True)).detach()
    ws = ws.detach()
    with torch.no_grad():
        inference = tiny.planes(ws)
        with ops.reference_paths():
            reference = tiny.planes(ws)
    assert torch.equal(inference, with_autograd)
    assert torch.equal(inference, reference)


@pytest.mark.parametrize("n_fine", [0, 12])
def test_fused_compositing_equals_the_reference_marcher(tiny, n_fine: int) -> None:
    z, c_cond, c = _tiny_inputs()
    with torch.no_grad():
        ws = tiny.mapping(z, c_cond)
        planes = tiny.planes(ws)
        origins, directions = tiny.ray_sampler(c[:, :16].reshape(-1, 4, 4), c[:, 16:25].reshape(-1, 3, 3), 16)
        options = {**tiny.rendering_kwargs, "depth_resolution_importance": n_fine}
        outs = {}
        for fused in (True, False):
            tiny.renderer.fused = fused
            outs[fused] = tiny.renderer(planes, tiny.decoder, origins, directions, options)
    tiny.renderer.fused = True
    for fast, reference in zip(outs[True], outs[False], strict=True):
        assert fast.shape == reference.shape
        assert (fast - reference).abs().max() <= 1e-5


def test_fast_softplus_and_its_gradient_equal_torch() -> None:
    from my3dgen_cli.eg3d.layers import Softplus

    x = torch.cat([torch.linspace(-40, 40, 801), torch.randn(1000) * 3]).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    fast, reference = Softplus()(x), F.softplus(x_ref)
    assert (fast - reference).abs().max() <= 1e-6
    assert torch.equal(fast[x > 20], x[x > 20])  # above the threshold: x itself, as torch
    fast.square().sum().backward()
    reference.square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_truncation_lerps_towards_w_avg(tiny) -> None:
    z, c_cond, _ = _tiny_inputs()
    tiny.backbone.mapping.w_avg.copy_(torch.randn(64))
    with torch.no_grad():
        free = tiny.mapping(z, c_cond)
        half = tiny.mapping(z, c_cond, truncation_psi=0.5)
    w_avg = tiny.backbone.mapping.w_avg
    assert torch.allclose(half, w_avg + 0.5 * (free - w_avg), atol=1e-6)


def test_bad_shapes_are_clear_errors(tiny) -> None:
    z, c_cond, c = _tiny_inputs()
    with pytest.raises(ValueError, match="expected"):
        tiny.mapping(z[:, :10], c_cond)
    with pytest.raises(ValueError, match="camera label"):
        tiny.synthesis(tiny.mapping(z, c_cond), c[:, :16])
    with pytest.raises(ValueError, match="sampling"):
        tiny.synthesis(tiny.mapping(z, c_cond), c, sampling="random")


def test_named_configs_build_and_unknown_names_are_refused() -> None:
    from my3dgen_cli.eg3d.configs import NAMED_CONFIGS

    for name in NAMED_CONFIGS:
        with torch.device("meta"):
            G = build_generator(name)
        assert G.img_resolution in (64, 512)
    with pytest.raises(ValueError, match="expected one of"):
        build_generator("ffhq1024")


def test_mean_plane_features_is_bitwise_the_official_sample_then_mean() -> None:
    from my3dgen_cli.eg3d.renderer import mean_plane_features, sample_from_planes

    g = torch.Generator().manual_seed(0)
    planes = torch.randn(2, 3, 8, 16, 16, generator=g)
    points = torch.rand(2, 100, 3, generator=g) - 0.5
    assert torch.equal(mean_plane_features(planes, points, 1.0), sample_from_planes(planes, points, 1.0).mean(1))


def test_gather_layout_planes_sample_bitwise_like_the_official_layout() -> None:
    from my3dgen_cli.eg3d.renderer import gather_planes, mean_plane_features, sample_from_planes

    g = torch.Generator().manual_seed(0)
    planes = torch.randn(2, 3, 8, 16, 16, generator=g)
    points = torch.rand(2, 100, 3, generator=g) * 1.2 - 0.6  # some outside the box: zeros there
    table = gather_planes(planes)
    assert table.shape == (6, 8, 16, 16) and table.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(mean_plane_features(table, points, 1.0), sample_from_planes(planes, points, 1.0).mean(1))


def test_decoding_in_chunks_equals_decoding_at_once(tiny) -> None:
    from my3dgen_cli.eg3d.renderer import decode_in_chunks

    features = torch.randn(2, 50, tiny.decoder.net[0].in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = tiny.decoder.decode(features)
        parts = decode_in_chunks(tiny.decoder.decode, features, points=7)  # 8 slices, the last one short
    assert whole.keys() == parts.keys()
    for key in whole:
        assert parts[key].shape == whole[key].shape
        assert (parts[key] - whole[key]).abs().max() <= 1e-6, key


def test_inference_render_equals_the_reference_paths(tiny) -> None:
    """The default inference render (gather layout, chunked decoder, fused compositing, in-place conv
    epilogues) against everything under ops.reference_paths(), with a chunk size that splits each pass."""
    from my3dgen_cli.eg3d import renderer

    z, c_cond, c = _tiny_inputs()
    with torch.no_grad():
        ws = tiny.mapping(z, c_cond)
        old, renderer.DECODE_POINTS = renderer.DECODE_POINTS, 100
        try:
            fast = tiny.synthesis(ws, c)
        finally:
            renderer.DECODE_POINTS = old
        with ops.reference_paths():
            reference = tiny.synthesis(ws, c)
    for key in fast:
        assert (fast[key] - reference[key]).abs().max() <= 1e-5, key


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled-loops", "torch-ops"])
@pytest.mark.parametrize(("samples", "channels"), [(12, 16), (48, 32)])  # tiny (multiply-sum), full size (bmm)
def test_weighted_colors_is_the_weighted_sum_with_its_gradients(samples: int, channels: int, compiled: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny sizes in training take composite_kernels' compiled loops (where numba is present), or torch's
    multiply-sum; full sizes a batched matrix product. The weights are a slice of the merged passes', as in a render."""
    from my3dgen_cli.eg3d import composite_kernels
    from my3dgen_cli.eg3d.renderer import SMALL_PRODUCT, weighted_colors

    if compiled and composite_kernels._loops() is None:
        pytest.skip("numba is not importable here")
    if not compiled:
        monkeypatch.setattr(composite_kernels, "_loops", lambda: None)
    assert (samples * channels < SMALL_PRODUCT) == (samples == 12)
    g = torch.Generator().manual_seed(0)
    merged = torch.rand(2, 5, 2 * samples, 1, generator=g, requires_grad=True)
    weights = merged[:, :, samples:]
    colors = torch.randn(2, 5, samples, channels, generator=g, requires_grad=True)
    seed = torch.randn(2, 5, channels, generator=g)
    assert composite_kernels.usable(colors, weights) == compiled
    out = weighted_colors(colors, weights)
    ref = (weights.double() * colors.double()).sum(-2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((out * seed).sum(), (merged, colors))
    ref_grads = torch.autograd.grad((ref * seed.double()).sum(), (merged, colors))
    assert grads[0][:, :, :samples].abs().max() == 0 and grads[0][:, :, samples:].abs().max() > 0
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

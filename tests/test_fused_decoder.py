"""The tri-plane decoder's chunked CPU path (eg3d/fused_decoder.py) against the op-by-op reference.

Reference: the same decoder inside `ops.reference_paths()`, which averages the planes and runs FC,
torch's softplus, FC and the colour sigmoid on the whole tensor with torch's own autograd.
"""

from __future__ import annotations

import pytest
import torch

from my3dgen_cli.eg3d import build_generator, fused_decoder, ops
from my3dgen_cli.eg3d.camera import lookat_camera
from my3dgen_cli.eg3d.triplane import OSGDecoder
from tests.render_fixtures import training_render

pytestmark = pytest.mark.usefixtures("one_thread")


def _decoder_and_samples(points: int = 1000, spread: float = 8.0) -> tuple[OSGDecoder, torch.Tensor]:
    """A decoder whose hidden layer spans softplus' whole range (below -17, above its threshold of 20)."""
    torch.manual_seed(0)
    decoder = OSGDecoder(16, 64, 16)
    with torch.no_grad():
        decoder.net[0].bias.normal_(0, 5)
        decoder.net[2].bias.normal_(0, 1)
    return decoder, torch.randn(2, 3, 16, points) * spread


def _outputs_and_grads(decoder: OSGDecoder, samples: torch.Tensor) -> tuple[dict, list[torch.Tensor]]:
    samples = samples.clone().requires_grad_(True)
    out = decoder.decode_samples(samples)
    loss = (out["rgb"] * torch.linspace(-1, 1, out["rgb"].shape[-1])).sum() + out["sigma"].square().sum() * 0.01
    params = [p for p in decoder.parameters() if p.requires_grad]
    return out, torch.autograd.grad(loss, [samples, *params])


@pytest.mark.parametrize("saved", [True, False], ids=["hidden-kept", "hidden-recomputed"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_chunked_decoder_matches_the_reference_values_and_gradients(monkeypatch, saved, frozen):
    """Both backward passes (hidden layer kept from the forward pass, or recomputed: large renders), with the
    decoder's weights trained or frozen (personalization trains no decoder weight: only the input's gradient)."""
    monkeypatch.setattr(fused_decoder, "CHUNK_POINTS", 96)  # 1000 points: ten full chunks and a partial one
    monkeypatch.setattr(fused_decoder, "SAVED_HIDDEN", 1 << 30 if saved else 0)
    decoder, samples = _decoder_and_samples()
    decoder.requires_grad_(not frozen)
    hidden = decoder.net[0](samples.mean(1).transpose(1, 2).reshape(-1, 16))
    assert hidden.min() < -17 and hidden.max() > 20  # both ends of softplus are exercised
    assert fused_decoder.use_fused(samples)
    fast, fast_grads = _outputs_and_grads(decoder, samples)
    with ops.reference_paths():
        assert not fused_decoder.use_fused(samples)
        ref, ref_grads = _outputs_and_grads(decoder, samples)
    for key in ("rgb", "sigma"):
        assert fast[key].shape == ref[key].shape
        torch.testing.assert_close(fast[key], ref[key], rtol=1e-5, atol=1e-5)
    names = ["samples"] + [name for name, p in decoder.named_parameters() if p.requires_grad]
    assert len(names) == (1 if frozen else 5)
    for name, a, b in zip(names, fast_grads, ref_grads, strict=True):
        assert a.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)


def test_chunked_decoder_without_autograd_gives_the_same_outputs(monkeypatch):
    monkeypatch.setattr(fused_decoder, "CHUNK_POINTS", 128)
    monkeypatch.setattr(fused_decoder, "COMPILED_MIN_POINTS", 0)  # inference on the compiled softplus too
    decoder, samples = _decoder_and_samples(points=300)
    with_grad, _ = _outputs_and_grads(decoder, samples)
    with torch.no_grad():
        plain = decoder.decode_samples(samples)
    for key in ("rgb", "sigma"):
        assert torch.equal(plain[key], with_grad[key].detach())


def test_an_inference_pass_does_not_depend_on_whether_the_weights_are_trainable():
    """A render under no_grad decodes the same way for a fresh (trainable) and a frozen decoder: an autograd
    Function sees `requires_grad` even under no_grad, which must not pick the training path (its compiled
    softplus rounds differently, and a fresh adapter, which freezes the base, would change the pixels)."""
    decoder, samples = _decoder_and_samples(points=300)
    with torch.no_grad():
        trainable = decoder.decode_samples(samples)
        decoder.requires_grad_(False)
        frozen = decoder.decode_samples(samples)
    for key in ("rgb", "sigma"):
        assert torch.equal(trainable[key], frozen[key])


def _softplus_inputs() -> torch.Tensor:
    x = torch.cat([torch.randn(20000) * 8, torch.linspace(-30, 30, 6004),
                   torch.tensor([0.0, -0.0, 20.0, -17.0, 24.0, -24.0, 88.0, -88.0, 1e-30, -1e-30, 3e38, -3e38])])
    return x.reshape(-1, 8)


def test_compiled_softplus_and_slope_match_float64_as_the_torch_form_does():
    """softplus_loops (numba) against float64 softplus and sigmoid, beside fused_decoder's torch-op form."""
    if fused_decoder._compiled() is None:
        pytest.skip("numba is not importable here")
    x = _softplus_inputs()
    ref, ref_slope = torch.nn.functional.softplus(x.double()), torch.sigmoid(x.double())
    for compiled in (True, False):
        out, slope = torch.empty_like(x), torch.empty_like(x)
        fused_decoder.softplus_and_slope(x, out, slope, compiled)
        alone = fused_decoder.softplus(x, compiled)
        assert torch.equal(alone, out)
        assert (out.double() - ref).abs().max() < 6e-7 and (slope.double() - ref_slope).abs().max() < 2e-7
        assert (out.double() - ref).abs().div(ref.abs().clamp_min(1)).max() < 2e-7  # relative, above 1
    special = torch.tensor([float("nan"), float("inf"), -float("inf")])
    out, slope = torch.empty_like(special), torch.empty_like(special)
    fused_decoder.softplus_and_slope(special, out, slope, True)
    assert out[0].isnan() and slope[0].isnan() and out[1] == float("inf") and slope[1] == 1
    assert 0 <= out[2] < 1e-10 and 0 <= slope[2] < 1e-10


def test_decoder_without_numba_uses_torch_ops_and_matches(monkeypatch):
    """Where numba cannot be imported, training's decoder keeps torch's exp/log softplus: the same values."""
    monkeypatch.setattr(fused_decoder, "CHUNK_POINTS", 96)
    decoder, samples = _decoder_and_samples(points=400)
    compiled, compiled_grads = _outputs_and_grads(decoder, samples)
    monkeypatch.setattr(fused_decoder, "_compiled", lambda: None)
    plain, plain_grads = _outputs_and_grads(decoder, samples)
    for key in ("rgb", "sigma"):
        torch.testing.assert_close(plain[key], compiled[key], rtol=1e-5, atol=1e-5)
    for a, b in zip(plain_grads, compiled_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_autocast_and_other_dtypes_take_the_reference_path():
    decoder, samples = _decoder_and_samples(points=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_decoder.use_fused(samples)
        out = decoder.decode_samples(samples)
    assert out["rgb"].dtype == torch.bfloat16  # autocast's matmuls ran: the reference path
    assert not fused_decoder.use_fused(samples.double())


def test_training_render_matches_the_reference_paths():
    """A whole tiny generator in training mode: image and the gradient that reaches the latents."""
    torch.manual_seed(0)
    G = build_generator("tiny").train()
    ws = torch.randn(2, G.num_ws, G.w_dim)
    cams = lookat_camera(torch.tensor([-20.0, 25.0]), 5.0)
    image, grad = training_render(G, ws, cams)
    with ops.reference_paths():
        ref_image, ref_grad = training_render(G, ws, cams)
    torch.testing.assert_close(image, ref_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-5 * ref_grad.abs().max().item())


def test_an_inference_batch_on_threads_matches_one_pass(monkeypatch):
    """CPU, no autograd, 2 threads: a batch of 3 views renders as 2 + 1 on a thread each (TriPlaneGenerator.
    _synthesis_on_threads); every output equals the one-thread pass to float rounding. With autograd or random
    noise it stays one pass; under autocast it splits too, each thread in the caller's autocast
    (tests/test_scale_speed.py checks the views' precision)."""
    from my3dgen_cli.eg3d import triplane

    parts = []
    real = triplane.run_parallel
    monkeypatch.setattr(triplane, "run_parallel", lambda tasks: parts.append(len(tasks)) or real(tasks))
    torch.manual_seed(0)
    G = build_generator("tiny").eval()
    ws = torch.randn(3, G.num_ws, G.w_dim)
    cams = lookat_camera(torch.tensor([-30.0, 0.0, 30.0]), 5.0)
    with torch.no_grad():
        one = G.synthesis(ws, cams)  # one_thread fixture: one pass
        torch.set_num_threads(2)
        split = G.synthesis(ws, cams)
        G.synthesis(ws, cams, noise_mode="random")
        with torch.autocast("cpu", dtype=torch.bfloat16):  # carried into each thread: split as well
            G.synthesis(ws, cams)
    assert parts == [2, 2]
    assert set(split) == set(one)
    for key in one:
        assert split[key].shape == one[key].shape
        torch.testing.assert_close(split[key], one[key], rtol=0, atol=1e-5)
    G.synthesis(ws, cams)  # with autograd: one pass
    assert parts == [2, 2]

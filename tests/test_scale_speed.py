"""Fast paths against the fp32 eager reference (tiny config, CPU): autocast, compile, checkpointing, accumulation."""

from __future__ import annotations

import os

import pytest
import torch

from my3dgen_cli import speed
from my3dgen_cli.eg3d.camera import lookat_camera
from my3dgen_cli.eg3d.layers import SynthesisBlock
from my3dgen_cli.lora import adapter_layers, add_adapters
from my3dgen_cli.personalize.pipeline import PersonalizeConfig
from my3dgen_cli.personalize.training import train_adapter
from my3dgen_cli.speed import activation_checkpointing, autocast, check_amp, compiled
from my3dgen_cli.use.render import render_views
from tests.personalize_helpers import TRAIN_YAWS, fresh, make_person, views
from tests.render_fixtures import tiny_base  # noqa: F401

# bf16 keeps 8 mantissa bits: ~0.4 % per product, a few 1e-2 after ~20 layers on images in [-1, 1].
BF16_IMAGE_ATOL = 0.15
BF16_IMAGE_MEAN_ATOL = 0.02
# Adam with beta1 = 0 divides each gradient entry by its own RMS, so float-order differences in
# near-zero entries grow to ~2.5e-5 after 3 steps (measured); 1e-4 is 4 % of one step (lr 0.0025).
ADAM_ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def person():
    return make_person()


def _adapted(person):
    """The tiny base with a non-zero rank-1 adapter (so gradients reach A and B)."""
    G = fresh(person)
    params = add_adapters(G, rank=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for a in adapter_layers(G).values():
            a.lora_B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return G, params


def test_bf16_autocast_renders_close_to_fp32(person):
    G, _ = _adapted(person)
    w = person[1]
    G.eval()
    cams = lookat_camera(torch.tensor([-20.0, 25.0]), 0.0)
    ref = render_views(G, w, cams, batch=2)
    fast = render_views(G, w, cams, batch=2, amp="bf16")
    diff = (fast.images - ref.images).abs()
    assert fast.images.dtype == torch.float32 and torch.isfinite(fast.images).all()
    assert float(diff.max()) < BF16_IMAGE_ATOL and float(diff.mean()) < BF16_IMAGE_MEAN_ATOL, float(diff.max())
    assert float((fast.depth - ref.depth).abs().max()) < 0.05  # scene units; the depth range is [2.25, 3.3]
    assert check_amp(True) == "bf16" and check_amp(False) == "off"
    with pytest.raises(ValueError, match="fp16"):
        autocast(torch.device("cpu"), "fp16")


def test_bf16_is_refused_where_the_cpu_has_no_bf16_kernels(monkeypatch, tmp_path, tiny_base):  # noqa: F811
    """Without oneDNN's bf16 kernels (AVX2-only CPUs) a bf16 conv ran ~400x slower than fp32: refuse, in one line."""
    from typer.testing import CliRunner

    from my3dgen_cli.cli import app
    from my3dgen_cli.errors import UserInputError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert isinstance(speed.cpu_has_bf16_kernels(), bool)  # the real probe answers on this machine
    monkeypatch.setattr(speed, "cpu_has_bf16_kernels", lambda: False)
    with pytest.raises(UserInputError, match="no bf16 kernels"):
        speed.check_amp_on(cpu, "bf16")
    assert speed.check_amp_on(cpu, "off") == "off" and speed.check_amp_on(cuda, True) == "bf16"  # CUDA: not this check
    commands = {"render": ["render", "--seed", "1", "-o", str(tmp_path / "x.png")],
                "personalize": ["personalize", str(tmp_path), "--name", "ana"]}
    for name, args in commands.items():
        result = CliRunner().invoke(app, [*args, "--amp", "bf16", "--device", "cpu"])
        assert result.exit_code == 2, (name, result.output)
        assert "--amp bf16: this CPU has no bf16 kernels" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not any(tmp_path.iterdir())  # nothing written
    monkeypatch.setattr(speed, "cpu_has_bf16_kernels", lambda: True)
    assert speed.check_amp_on(cpu, "bf16") == "bf16"


def test_activation_checkpointing_gives_the_same_gradients(person, monkeypatch):
    G, params = _adapted(person)
    G.train()
    w = person[1].expand(2, -1, -1)
    cams = lookat_camera(torch.tensor([-10.0, 15.0]), 0.0)

    def grads():
        for p in params:
            p.grad = None
        out = G.synthesis(w, cams, noise_mode="const", sampling="deterministic")
        (out["image"].square().mean() + out["image_raw"].square().mean()).backward()
        return [p.grad.clone() for p in params]

    ref = grads()
    with activation_checkpointing(G):
        assert "forward" in vars(G.decoder) and "forward" in vars(G.backbone.synthesis.b8)
        calls = []
        real = speed.checkpoint
        monkeypatch.setattr(speed, "checkpoint", lambda fn, *a, **k: calls.append(fn.__name__) or real(fn, *a, **k))
        ckpt = grads()
    # Every block and the decoder (what the renderer calls: `decode` of the plane means, 2 passes) ran checkpointed.
    n_blocks = sum(isinstance(m, SynthesisBlock) for m in G.modules())
    assert calls.count("forward") == n_blocks and calls.count("decode") == 2, calls
    assert not {"forward", "decode", "decode_samples"} & set(vars(G.decoder))  # restored
    for a, b in zip(ref, ckpt, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def _train(person, **kw):
    _, w, hidden = person
    G = fresh(person)
    images, raws, cams = views(hidden, w, TRAIN_YAWS[:4])
    config = PersonalizeConfig(steps=3, batch=4, sym=True, sym_every=2, checkpoint_every=0, seed=5, **kw)
    result = train_adapter(G, images, cams, w.expand(4, -1, -1), config, raw_images=raws)
    return G, result


def test_gradient_accumulation_keeps_the_effective_batch(person):
    G1, r1 = _train(person)
    G2, r2 = _train(person, accum=2)
    for a, b in zip(adapter_layers(G1).values(), adapter_layers(G2).values(), strict=True):
        assert torch.allclose(a.lora_B, b.lora_B, atol=ADAM_ATOL) and torch.allclose(a.lora_A, b.lora_A, atol=ADAM_ATOL)
    assert [r["loss"] for r in r1.log] == pytest.approx([r["loss"] for r in r2.log], rel=1e-5)


def test_channels_last_training_equals_contiguous(person, monkeypatch):
    """PersonalizeConfig(channels_last=True) trains in NHWC (unfused convs, symmetry term too) and
    lands on the same adapter as contiguous, to Adam's float-order noise."""
    from my3dgen_cli.eg3d import ops

    layouts: list[bool] = []
    real = ops.F.conv2d
    monkeypatch.setattr(ops.F, "conv2d", lambda x, *a, **k: layouts.append(
        x.shape[1] > 3 and x.is_contiguous(memory_format=torch.channels_last)) or real(x, *a, **k))
    G1, r1 = _train(person)
    assert not any(layouts)
    layouts.clear()
    G2, r2 = _train(person, channels_last=True)
    assert sum(layouts) > len(layouts) // 2
    for a, b in zip(adapter_layers(G1).values(), adapter_layers(G2).values(), strict=True):
        assert torch.allclose(a.lora_B, b.lora_B, atol=ADAM_ATOL) and torch.allclose(a.lora_A, b.lora_A, atol=ADAM_ATOL)
    assert [r["loss"] for r in r1.log] == pytest.approx([r["loss"] for r in r2.log], rel=1e-5)


def test_bf16_training_tracks_fp32(person):
    _, r32 = _train(person)
    _, r16 = _train(person, amp="bf16")
    # Same batches and yaws. bf16 rendering error (~0.01-0.03 per pixel in [-1, 1]) adds itself to
    # the MSE (measured +0.0015 to +0.0021 on losses of 0.02-0.05): each step within 0.005.
    for a, b in zip(r32.log, r16.log, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=0.005)


def test_compiled_synthesis_has_no_graph_break_and_matches_eager(person):
    """aot_eager traces the whole synthesis as one graph (fullgraph: a .item() or a bool of a tensor,
    i.e. a host sync, would break it) and runs it with eager kernels; 1e-5 is float reordering."""
    G, _ = _adapted(person)
    G.eval()
    w = person[1].expand(2, -1, -1)
    cams = lookat_camera(torch.tensor([-20.0, 25.0]), 0.0)
    with torch.no_grad():
        ref = G.synthesis(w, cams)
        out = compiled(G.synthesis, backend="aot_eager", fullgraph=True)(w, cams)
    for key in ("image", "image_raw", "image_depth"):
        assert torch.allclose(ref[key], out[key], atol=1e-5), key


@pytest.mark.skipif(os.environ.get("MY3DGEN_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ kernels: ~2 min for the tiny generator on 2 loaded cores "
                           "(set MY3DGEN_TEST_INDUCTOR=1 to run)")
def test_inductor_render_matches_eager(person):
    G, _ = _adapted(person)
    G.eval()
    cams = lookat_camera(torch.tensor([-20.0, 25.0]), 0.0)
    ref = render_views(G, person[1], cams, batch=2)
    fast = render_views(G, person[1], cams, batch=2, compile=True)
    assert torch.allclose(ref.images, fast.images, atol=1e-4)


def test_bf16_autocast_keeps_rays_and_the_image_skip_path_exact():
    """Camera geometry and the 512 px image's upsampling stay fp32 under autocast (bf16 rounded the rays'
    directions and the skip path's pixels, most of a bf16 view's largest error)."""
    from my3dgen_cli.eg3d import ops
    from my3dgen_cli.eg3d.renderer import ray_bundle

    cams = lookat_camera(torch.tensor([-31.0, 17.0]), 9.0)
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2.5
    f = ops.setup_filter([1, 3, 3, 1])
    exact_rays = ray_bundle(cams[:, :16].reshape(-1, 4, 4), cams[:, 16:].reshape(-1, 3, 3), 8)
    exact_up = ops.upsample2d(image, f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rays = ray_bundle(cams[:, :16].reshape(-1, 4, 4), cams[:, 16:].reshape(-1, 3, 3), 8)
        up = ops.upsample2d(image, f)
        assert torch.is_autocast_enabled("cpu")  # restored after each exact op
    for got, want in zip((*rays, up), (*exact_rays, exact_up), strict=True):
        assert got.dtype == torch.float32
        assert torch.equal(got, want)


def test_bf16_batch_on_threads_renders_every_view_in_bf16(person):
    """A CPU batch split over threads carries the caller's autocast into each thread (it is per thread):
    every view equals its own bf16 render, not the fp32 one the second thread would otherwise draw."""
    G, _ = _adapted(person)
    G.eval()
    w = person[1].expand(2, -1, -1)
    cams = lookat_camera(torch.tensor([-20.0, 25.0]), 0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two parts, a thread each (speed.cpu_workers)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert G._split_by_view(w, "const", "deterministic", None)
            batch = G.synthesis(w, cams)["image"]
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        exact = G.synthesis(w[1:], cams[1:])["image"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            alone = [G.synthesis(w[i : i + 1], cams[i : i + 1])["image"] for i in range(2)]
    assert torch.equal(batch, torch.cat(alone))
    assert not torch.allclose(batch[1:], exact, atol=1e-4)  # the second view was not rendered in fp32

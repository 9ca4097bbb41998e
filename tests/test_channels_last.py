"""channels_last (NHWC) convolutions against the contiguous reference (tiny config, CPU).

Same values up to float order, the layout really reaches the convolutions (without a copy between
layers on the fused path), and it survives torch.compile, the device audit and the host-sync check.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from my3dgen_cli.eg3d import ops
from my3dgen_cli.eg3d.layers import SynthesisLayer, ToRGBLayer
from my3dgen_cli.speed import compiled, use_channels_last
from my3dgen_cli.use.render import render_views
from tests.device_checks import DeviceAudit, fake_cuda
from tests.render_fixtures import tiny_base  # noqa: F401
from tests.test_device_hygiene import META, _inputs, _tiny

NHWC = torch.channels_last
# Float-order only: measured image 1.8e-6, raw 3e-7, depth 1e-6 (eval and training); LoRA gradients
# 2e-7 relative to their largest entry.
ATOL = 1e-5
GRAD_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conv_inputs(G: torch.nn.Module) -> tuple[list[tuple[str, torch.Tensor]], list]:
    """Record every modulated conv layer's input x (a pre-hook on the layer) while hooks are kept."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda m, args, name=name: seen.append((name, args[0])))
               for name, m in G.named_modules() if isinstance(m, (SynthesisLayer, ToRGBLayer))]
    return seen, handles


def _grouped_nhwc_view(x: torch.Tensor) -> bool:
    """The fused conv's grouped input [1, N*I, H, W] is NHWC and a view of x (no copy to make it)."""
    g = x.reshape(1, -1, *x.shape[2:])
    return g.is_contiguous(memory_format=NHWC) and g.data_ptr() == x.data_ptr()


@pytest.mark.parametrize("training", [False, True], ids=["eval-fused", "train-unfused"])
def test_channels_last_synthesis_equals_contiguous(training):
    G = _tiny(device="cpu").train(training)
    ws, cams = _inputs(G, 3, torch.device("cpu"))
    with torch.no_grad():
        ref = G.synthesis(ws, cams)
        out = G.synthesis(ws, cams, channels_last=True)
    for key in ("image", "image_raw", "image_depth"):
        assert out[key].is_contiguous(), key  # callers get ordinary NCHW tensors back
        assert torch.allclose(ref[key], out[key], atol=ATOL), (key, float((ref[key] - out[key]).abs().max()))


@pytest.mark.parametrize("training", [False, True], ids=["eval-fused", "train-unfused"])
def test_channels_last_lora_gradients_equal_contiguous(training):
    """One LoRA step's loss gradient (what personalize trains) with and without NHWC."""
    G = _tiny(device="cpu").train(training)
    params = [p for n, p in G.named_parameters() if "lora_" in n]
    assert params
    ws, cams = _inputs(G, 2, torch.device("cpu"))

    def grads(channels_last: bool) -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        out = G.synthesis(ws, cams, channels_last=channels_last)
        (out["image"].square().mean() + out["image_raw"].square().mean()).backward()
        return [p.grad.clone() for p in params]

    ref, nhwc = grads(False), grads(True)
    for a, b in zip(ref, nhwc, strict=True):
        assert float(a.abs().max()) > 0
        assert torch.allclose(a, b, atol=GRAD_RTOL * float(a.abs().max())), float((a - b).abs().max())


def test_every_modulated_conv_reads_nhwc_and_copies_no_activation(monkeypatch):
    G = _tiny(device="cpu")
    ws, cams = _inputs(G, 3, torch.device("cpu"))
    seen, handles = _conv_inputs(G)
    conv_reads: set[int] = set()  # storage of every F.conv2d input
    real = ops.F.conv2d
    monkeypatch.setattr(ops.F, "conv2d", lambda x, *a, **k: conv_reads.add(x.data_ptr()) or real(x, *a, **k))
    # The two entry layers get a tensor made elsewhere (the learned const, the renderer's feature
    # image): their conv converts it. Every other layer's input is already in the layout.
    entries = {"backbone.synthesis.b4.conv1", "superresolution.block0.conv0"}
    with torch.no_grad():
        for training, layout_ok in ((False, _grouped_nhwc_view), (True, lambda x: x.is_contiguous(memory_format=NHWC))):
            G.train(training)
            G.synthesis(ws, cams, channels_last=True)
            inner = [(name, x) for name, x in seen if name not in entries]
            assert len(inner) == len(seen) - 2 > 10
            assert all(layout_ok(x) for _, x in inner), [name for name, x in inner if not layout_ok(x)]
            # fused, the same-size convs (not the 2x-up conv0s) read the layer's input itself: no copy
            # (unfused, they read x * styles, a new tensor whatever the layout)
            same_size = [(name, x) for name, x in inner if not name.endswith("conv0") and not training]
            assert all(x.data_ptr() in conv_reads for _, x in same_size), [n for n, x in same_size
                                                                          if x.data_ptr() not in conv_reads]
            seen.clear()
            conv_reads.clear()
            G.synthesis(ws, cams)  # off: plain NCHW everywhere
            assert not any(x.is_contiguous(memory_format=NHWC) for _, x in seen if x.shape[-1] > 1)
            seen.clear()
    for h in handles:
        h.remove()


def test_the_convolutions_themselves_get_nhwc_input_and_weight(monkeypatch):
    """A spy on F.conv2d / conv_transpose2d: all but the image skip path's depthwise blur run NHWC."""
    G = _tiny(device="cpu")
    ws, cams = _inputs(G, 2, torch.device("cpu"))
    calls: list[tuple[bool, bool, int, int]] = []
    for name in ("conv2d", "conv_transpose2d"):
        real = getattr(ops.F, name)

        def spy(x, w, *args, real=real, **kwargs):
            calls.append((x.is_contiguous(memory_format=NHWC), w.is_contiguous(memory_format=NHWC),
                          x.shape[1], kwargs.get("groups", 1)))
            return real(x, w, *args, **kwargs)

        monkeypatch.setattr(ops.F, name, spy)
    with torch.no_grad():
        G.synthesis(ws, cams, channels_last=True)
    image_channels = {G.backbone.synthesis.img_channels, 3}
    nchw = [c for c in calls if not (c[0] and c[1])]
    assert len(nchw) < len(calls)
    assert all(ch in image_channels and groups == ch for _, _, ch, groups in nchw), nchw  # skip path only


def test_render_views_channels_last_matches_and_defaults_off_on_cpu():
    G = _tiny(device="cpu")
    ws, cams = _inputs(G, 3, torch.device("cpu"))
    seen, handles = _conv_inputs(G)
    ref = render_views(G, ws[:1], cams, batch=2)
    assert not any(x.is_contiguous(memory_format=NHWC) for _, x in seen if x.shape[-1] > 1)
    seen.clear()
    fast = render_views(G, ws[:1], cams, batch=2, channels_last=True)
    assert sum(x.is_contiguous(memory_format=NHWC) for _, x in seen) > len(seen) // 2
    for h in handles:
        h.remove()
    assert torch.allclose(ref.images, fast.images, atol=ATOL) and torch.allclose(ref.depth, fast.depth, atol=ATOL)


def test_default_is_on_with_autocast_on_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_channels_last(None, cuda, "fp16") and use_channels_last(None, cuda, "bf16")
    assert not use_channels_last(None, cuda, "off") and not use_channels_last(None, cpu, "bf16")
    assert use_channels_last(True, cpu, "off") and not use_channels_last(False, cuda, "fp16")


def test_render_views_on_fake_cuda_with_autocast_runs_nhwc(monkeypatch):
    """FakeTensors on cuda:0: --amp fp16 turns NHWC on by default, --amp off leaves it off."""
    G = _tiny(device="cpu")
    seen, handles = _conv_inputs(G)
    with fake_cuda(G) as cuda, torch.no_grad():
        ws, cams = _inputs(G, 2, cuda)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        for amp, on in (("fp16", True), ("off", False), ("bf16", True)):
            seen.clear()
            monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
            render_views(G, ws[:1], cams, batch=2, amp=amp)
            sr = [x for name, x in seen if name == "superresolution.block1.conv1"]
            assert sr and all(x.reshape(1, -1, *x.shape[2:]).is_contiguous(memory_format=NHWC) == on for x in sr)
    for h in handles:
        h.remove()


def test_channels_last_compiles_to_one_graph_and_matches_eager():
    """aot_eager, fullgraph: no graph break (no host sync) with NHWC; values as eager contiguous."""
    G = _tiny(device="cpu")
    ws, cams = _inputs(G, 2, torch.device("cpu"))
    with torch.no_grad():
        ref = G.synthesis(ws, cams)
        out = compiled(G.synthesis, backend="aot_eager", fullgraph=True)(ws, cams, channels_last=True)
    for key in ("image", "image_raw", "image_depth"):
        assert torch.allclose(ref[key], out[key], atol=ATOL), key


def test_channels_last_mixes_no_devices_and_never_syncs():
    """DeviceAudit on meta (device mixing) and on real CPU tensors (host syncs), eval and training."""
    for device, cpu_too in ((META, False), (torch.device("cpu"), True)):
        G = _tiny(device=device)
        ws, cams = _inputs(G, 2, device)
        with DeviceAudit(forbid_syncs=True, cpu_too=cpu_too), torch.no_grad():
            for training in (False, True):
                G.train(training)
                out = G.synthesis(ws, cams, channels_last=True)
                assert out["image"].device == device


def test_cli_render_channels_last_runs_nhwc_and_writes_the_same_image(tmp_path, request):
    from typer.testing import CliRunner

    from my3dgen_cli.cli import app

    seen, handles = _conv_inputs(request.getfixturevalue("tiny_base"))  # the generator `render` opens
    images = {}
    for flag in ("--no-channels-last", "--channels-last"):
        seen.clear()
        r = CliRunner().invoke(app, ["render", "--seed", "3", "--yaw", "20", flag,
                               "-o", str(tmp_path / f"{flag}.png")])
        assert r.exit_code == 0, r.output
        sr = [x for name, x in seen if name.startswith("superresolution") and name != "superresolution.block0.conv0"]
        on = flag == "--channels-last"
        assert sr and all(x.reshape(1, -1, *x.shape[2:]).is_contiguous(memory_format=NHWC) == on for x in sr)
        images[flag] = np.asarray(Image.open(tmp_path / f"{flag}.png"), dtype=np.int16)
    for h in handles:
        h.remove()
    assert np.abs(images["--channels-last"] - images["--no-channels-last"]).max() <= 1  # uint8 rounding at most

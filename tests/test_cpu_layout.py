"""The CPU's convolution layout: measured once per machine, remembered in the cache, applied to full-size renders."""

from __future__ import annotations

import json

import pytest
import torch

from my3dgen_cli import cpu_layout, speed
from my3dgen_cli.eg3d import ops
from my3dgen_cli.use.render import render_views
from tests.test_channels_last import NHWC, _conv_inputs
from tests.test_device_hygiene import _inputs, _tiny

CPU = torch.device("cpu")


@pytest.fixture
def timings(monkeypatch):
    """Replace the timing with given (NCHW, NHWC) seconds; counts the measurements; forgets decisions."""
    calls: list[int] = []
    answer = {"times": (1.0, 0.5)}

    def fake_time_layouts(rounds: int = cpu_layout.TIMING_ROUNDS) -> tuple[float, float]:
        calls.append(rounds)
        return answer["times"]

    monkeypatch.setattr(cpu_layout, "time_layouts", fake_time_layouts)
    monkeypatch.setattr(cpu_layout, "_decided", {})
    return answer, calls


def test_the_layout_is_measured_once_stored_and_reused(timings, monkeypatch):
    answer, calls = timings
    assert cpu_layout.cpu_prefers_nhwc() is True and len(calls) == 1
    doc = json.loads(cpu_layout.tuning_path().read_text())
    entry = doc["machines"][cpu_layout.machine_key()]
    assert doc["format"] == cpu_layout.TUNING_FORMAT and entry["nhwc"] is True and entry["nhwc_s"] == 0.5
    assert cpu_layout.cpu_prefers_nhwc() is True and len(calls) == 1  # this process: decided
    monkeypatch.setattr(cpu_layout, "_decided", {})  # a new process: read from the cache, not measured
    answer["times"] = (1.0, 2.0)
    assert cpu_layout.cpu_prefers_nhwc() is True and len(calls) == 1
    monkeypatch.setattr(cpu_layout, "machine_key", lambda: "another cpu | AVX512 | torch x | 2 threads")
    assert cpu_layout.cpu_prefers_nhwc() is False and len(calls) == 2  # another machine sharing the cache
    assert len(json.loads(cpu_layout.tuning_path().read_text())["machines"]) == 2  # both kept


def test_a_near_tie_keeps_nchw(timings):
    answer, _ = timings
    answer["times"] = (1.0, 0.97)  # 3 % faster: within the margin
    assert cpu_layout.cpu_prefers_nhwc() is False


@pytest.mark.parametrize("content", [b"\x00garbage{", b'{"format": "other/1", "machines": {}}', b"[1, 2]",
                                     b'{"format": "my3dgen-cpu-layout/1", "machines": {"KEY": {"nhwc": "yes"}}}',
                                     b"{" + b" " * (cpu_layout.MAX_TUNING_BYTES + 1) + b"}"],
                         ids=["garbage", "foreign", "list", "bad-entry", "oversized"])
def test_a_damaged_tuning_file_is_measured_again_and_rewritten(timings, content, monkeypatch):
    _, calls = timings
    path = cpu_layout.tuning_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content.replace(b"KEY", cpu_layout.machine_key().encode()))
    assert cpu_layout.cpu_prefers_nhwc() is True and len(calls) == 1
    assert json.loads(path.read_text())["machines"][cpu_layout.machine_key()]["nhwc"] is True


def test_a_tuning_path_that_is_no_regular_file_is_never_read(timings):
    _, calls = timings
    path = cpu_layout.tuning_path()
    path.parent.mkdir(parents=True)
    path.symlink_to("/dev/zero")  # reading it would never end
    assert cpu_layout.cpu_prefers_nhwc() is True and len(calls) == 1


def test_an_unwritable_cache_still_decides(timings):
    _, calls = timings
    blocker = cpu_layout.tuning_path().parent
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the tuning folder would be")
    assert cpu_layout.cpu_prefers_nhwc() is True and len(calls) == 1
    assert blocker.read_text() == "a file where the tuning folder would be"


def test_the_real_timing_measures_both_layouts():
    nchw_s, nhwc_s = cpu_layout.time_layouts(rounds=1)
    assert 0 < nchw_s < 60 and 0 < nhwc_s < 60


def test_defaults_by_device_size_and_precision(monkeypatch):
    monkeypatch.setattr(cpu_layout, "cpu_prefers_nhwc", lambda: True)
    cuda = torch.device("cuda")
    assert speed.use_channels_last(None, CPU, "off", resolution=512)  # a full-size render on this CPU
    assert not speed.use_channels_last(None, CPU, "off", resolution=64)  # the tiny config: slower in NHWC
    assert not speed.use_channels_last(None, CPU, "off")  # training passes no resolution: not measured there
    assert not speed.use_channels_last(None, CPU, "bf16", resolution=512)
    assert not speed.use_channels_last(False, CPU, "off", resolution=512)  # --no-channels-last wins
    assert speed.use_channels_last(None, cuda, "fp16") and not speed.use_channels_last(None, cuda, "off", 512)
    monkeypatch.setattr(cpu_layout, "cpu_prefers_nhwc", lambda: False)
    assert not speed.use_channels_last(None, CPU, "off", resolution=512)
    assert speed.use_channels_last(True, CPU, "off", resolution=64)


def test_render_views_follows_the_measured_layout(monkeypatch):
    G = _tiny(device="cpu")
    ws, _ = _inputs(G, 1, CPU)
    cams = torch.cat([_inputs(G, 2, CPU)[1]])
    monkeypatch.setattr(speed, "NHWC_MIN_RESOLUTION", G.img_resolution)  # the tiny config stands in for full size
    seen, handles = _conv_inputs(G)
    images = {}
    for prefers in (False, True):
        monkeypatch.setattr(cpu_layout, "cpu_prefers_nhwc", lambda prefers=prefers: prefers)
        seen.clear()
        images[prefers] = render_views(G, ws[:1], cams, batch=2).images
        sr = [x for name, x in seen if name.startswith("superresolution") and name != "superresolution.block0.conv0"]
        assert sr and all(x.reshape(1, -1, *x.shape[2:]).is_contiguous(memory_format=NHWC) == prefers for x in sr)
    for h in handles:
        h.remove()
    assert (images[True] - images[False]).abs().max() <= 1e-5  # float order only


def test_a_reshaped_nhwc_input_reaches_a_1x1_conv_without_a_copy():
    """The fused modconv's reshape leaves the size-1 batch dim a small stride; torch then read the
    activation as NCHW and copied it before each ToRGB (1x1) conv. ops.nhwc re-views it instead."""
    x = torch.randn(1, 32, 24, 24).contiguous(memory_format=NHWC)
    weight, styles = torch.randn(3, 32, 1, 1), torch.randn(1, 32)
    with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
        out = ops.modulated_conv2d(x, weight, styles, demodulate=False, fused=True, channels_last=True)
    copied = [e.input_shapes[0] for e in prof.events() if e.name in ("aten::clone", "aten::copy_")]
    assert [1, 32, 24, 24] not in copied, copied
    reference = ops.modulated_conv2d(x.contiguous(), weight, styles, demodulate=False, fused=True)
    assert torch.allclose(out, reference, atol=1e-5)
    grouped = ops.nhwc(x.reshape(1, -1, 24, 24), True)
    assert grouped.stride() == (32 * 24 * 24, 1, 24 * 32, 32) and grouped.data_ptr() == x.data_ptr()

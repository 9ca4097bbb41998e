"""Downloads a command makes on demand are visible, reuse torch hub's cache, and fail loudly.

`invert` fetches the LPIPS-VGG backbone (`lpips-vgg16`) when it is not cached; here a lab registry
points that entry at a real HTTP server on 127.0.0.1 serving a small VGG16 `features.*` file.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.console import Console
from test_zoo import assert_one_line_error, entry_toml, write_registry
from typer.testing import CliRunner
from zoo_server import FileServer, closed_port, serving

from my3dgen_cli.cli import app
from my3dgen_cli.output import Output
from my3dgen_cli.zoo import store, visible
from tests.render_fixtures import tiny_base, tiny_generator  # noqa: F401
from tests.test_invert import _write_crop

pytestmark = pytest.mark.usefixtures("one_thread", "tiny_base")
HUB_NAME = "vgg16-397923af.pth"  # the name torchvision (and lpips) give the file in torch hub's cache


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """torchvision's VGG16 `features.*` tensors (random, fp16 to stay small): what LPIPS-VGG loads."""
    widths = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    state, index, c_in = {}, 0, 3
    gen = torch.Generator().manual_seed(0)
    for width in widths:
        if width == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = (torch.randn(width, c_in, 3, 3, generator=gen) * 0.05).half()
        state[f"features.{index}.bias"] = torch.zeros(width, dtype=torch.float16)
        c_in, index = width, index + 2  # conv, relu
    path = tmp_path_factory.mktemp("vgg") / HUB_NAME
    torch.save(state, path)
    return path.read_bytes()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    with serving(monkeypatch, retries=0) as srv:
        yield srv


def point_vgg_at(url: str, body: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The packaged lpips-vgg16 entry, its URL, hash and size overridden by a lab registry."""
    sha = hashlib.sha256(body).hexdigest()
    text = entry_toml("lpips-vgg16", url, sha, size=len(body)).replace('kind = "other"\nlicense = "test"\n', "")
    write_registry(tmp_path, monkeypatch, text)


def invert(tmp_path: Path, *extra: str) -> object:
    crop = tmp_path / "face.png"
    if not crop.exists():
        _write_crop(tiny_generator(), crop)
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    args = ["invert", str(crop), "--yaw", "20", "--pitch", "5", "--steps", "1", "--base", "tiny-test", "-o", str(out)]
    return CliRunner().invoke(app, [*args, *extra])


def test_a_command_announces_its_download_then_uses_the_weights(
    server: FileServer, vgg_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.state.files["/vgg"] = vgg_file
    point_vgg_at(server.url("/vgg"), vgg_file, tmp_path, monkeypatch)
    result = invert(tmp_path)
    assert result.exit_code == 0, result.output
    size = f"{len(vgg_file) / 2**20:.1f} MiB"
    licence = "BSD-3-Clause (torchvision)"
    line = f"downloading lpips-vgg16 ({HUB_NAME}, {size}, licence: {licence}) from {server.url('/vgg')}"
    assert line in result.stderr.splitlines(), result.stderr
    assert "LPIPS" in result.stdout and "pixel" not in result.stderr  # the perceptual loss was used
    assert server.state.gets("/vgg") == [None]
    # cached now: the next run downloads nothing and says nothing about it; --json prints no line either
    again = invert(tmp_path, "--json")
    assert again.exit_code == 0 and "downloading" not in again.stderr, again.output
    assert json.loads(again.stdout)["results"][0]["lpips"] is not None
    assert server.state.gets("/vgg") == [None]


def test_torch_hubs_copy_is_verified_and_used_without_a_request(
    server: FileServer, vgg_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    point_vgg_at(server.url("/vgg"), vgg_file, tmp_path, monkeypatch)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / HUB_NAME).write_bytes(vgg_file)
    result = invert(tmp_path)
    assert result.exit_code == 0, result.output
    assert server.state.log == [], "no HTTP request at all"
    assert f"lpips-vgg16: using torch hub's copy {hub / HUB_NAME} (sha256 verified)" in result.stderr
    assert store.cached("lpips-vgg16").read_bytes() == vgg_file
    assert (hub / HUB_NAME).read_bytes() == vgg_file  # the user's file is left where it was


def test_a_mismatching_torch_hub_file_is_ignored_with_a_warning(
    server: FileServer, vgg_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.state.files["/vgg"] = vgg_file
    point_vgg_at(server.url("/vgg"), vgg_file, tmp_path, monkeypatch)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / HUB_NAME).write_bytes(vgg_file[:-10] + b"0123456789")
    result = invert(tmp_path)
    assert result.exit_code == 0, result.output
    assert f"warning: ignoring torch hub's {hub / HUB_NAME}: it has sha256" in result.stderr
    assert "downloading lpips-vgg16" in result.stderr and server.state.gets("/vgg") == [None]
    assert store.cached("lpips-vgg16").read_bytes() == vgg_file


def test_checksum_failure_stops_the_command_and_says_what_to_do(
    server: FileServer, vgg_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.state.files["/vgg"] = vgg_file[:-10] + b"0123456789"
    point_vgg_at(server.url("/vgg"), vgg_file, tmp_path, monkeypatch)
    result = invert(tmp_path)
    assert_one_line_error(result, "lpips-vgg16", "has sha256", "nothing was cached",
                          f"my3dgen fetch lpips-vgg16 --from {HUB_NAME}")
    assert "pixel" not in result.stderr and not list(tmp_path.glob("out*/*")), "no quiet fallback, nothing written"
    assert store.cached("lpips-vgg16") is None


def test_network_failure_stops_the_command_and_says_what_to_do(
    vgg_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("MY3DGEN_RETRIES", "0")
    point_vgg_at(f"http://127.0.0.1:{closed_port()}/vgg", vgg_file, tmp_path, monkeypatch)
    result = invert(tmp_path)
    assert_one_line_error(result, "could not download lpips-vgg16", "nothing was cached",
                          "`my3dgen fetch lpips-vgg16`", f"--from {HUB_NAME}")
    assert "pixel" not in result.stderr


def test_offline_without_the_weights_says_so_loudly(
    server: FileServer, vgg_file: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline is the one documented fallback: the run goes on with pixel losses and says why and how to fix it."""
    point_vgg_at(server.url("/vgg"), vgg_file, tmp_path, monkeypatch)
    monkeypatch.setenv("MY3DGEN_OFFLINE", "1")
    result = invert(tmp_path)
    assert result.exit_code == 0, result.output
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "lpips-vgg16 is not cached and this run is offline" in warning[0], result.stderr
    assert "using pixel losses only" in warning[0] and "`my3dgen fetch lpips-vgg16`" in warning[0]
    assert "--from FILE" in warning[0] and server.state.log == []
    # `fetch` itself refuses: one line naming offline mode and both fixes
    fetch = CliRunner().invoke(app, ["fetch", "lpips-vgg16"])
    assert_one_line_error(fetch, "offline mode is on", "`my3dgen fetch lpips-vgg16`", f"--from {HUB_NAME}")


def test_the_bar_is_fetchs_bar_on_a_terminal() -> None:
    """On a terminal the same bar as `my3dgen fetch` (name, bytes) is drawn on stderr; not in quiet mode."""
    for mode, shown in (("human", True), ("quiet", False)):
        output = Output(mode)
        output.err = Console(file=io.StringIO(), force_terminal=True, width=100)
        with visible.download_progress(output, "lpips-vgg16") as hook:
            hook(3 << 20, 6 << 20)
        text = output.err.file.getvalue()
        assert ("lpips-vgg16" in text and "3.1/6.3 MB" in text) is shown, text

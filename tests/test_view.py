"""`my3dgen view`: the planes/render split, the server's API and guard, newest-wins frames, saves, the CLI."""

from __future__ import annotations

import http.client
import io
import json
import threading
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from typer.testing import CliRunner

from my3dgen_cli import media
from my3dgen_cli.cli import app
from my3dgen_cli.eg3d.camera import camera_rig, lookat_camera
from my3dgen_cli.use.render import latent_from_seed, render_views
from my3dgen_cli.view.scene import ViewState
from tests.render_fixtures import tiny_base, tiny_generator  # noqa: F401
from tests.view_fixtures import LiveViewer, viewer_fixture  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _get(v: LiveViewer, path: str, **params) -> requests.Response:
    return requests.get(f"{v.url}{path}", params={"token": v.token, **params}, timeout=60)


def _image(response: requests.Response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_render_planes_is_synthesis_without_superresolution():
    G = tiny_generator()
    ws = latent_from_seed(G, 4)
    cams = lookat_camera([-20.0, 25.0], [5.0, -5.0])
    with torch.no_grad():
        planes = G.planes(ws).expand(2, -1, -1, -1, -1)
        features, depth = G.render_planes(planes, cams)
        out = G.synthesis(ws.expand(2, -1, -1), cams, planes=planes)
    assert features.shape == (2, G.config.plane_channels, 32, 32) and depth.shape == (2, 1, 32, 32)
    assert torch.equal(features[:, :3], out["image_raw"][:, :3]) and torch.equal(depth, out["image_depth"])


def test_page_and_assets_load(viewer: LiveViewer):
    page = _get(viewer, "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'src="/assets/app.js?token={viewer.token}"' in page.text and "{{token}}" not in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text.replace("http://", "")  # nothing from elsewhere (no CDN)
    script = _get(viewer, "/assets/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "/api/frame" in script.text
    assert _get(viewer, "/assets/style.css").headers["content-type"].startswith("text/css")
    info = _get(viewer, "/api/info").json()
    assert info["sources"] == ["seed1", "b"] and info["seeds"] is True


def test_two_yaws_give_two_images_and_full_frames_are_the_renderers(viewer: LiveViewer):
    left = _get(viewer, "/api/frame", yaw=-30, quality="full")
    right = _get(viewer, "/api/frame", yaw=30, quality="full")
    assert left.status_code == right.status_code == 200 and left.headers["content-type"] == "image/png"
    a, b = _image(left), _image(right)
    assert a.shape == b.shape == (64, 64, 3) and np.abs(a.astype(int) - b).mean() > 1.0
    G = viewer.scene.G
    expected = render_views(G, latent_from_seed(G, 1, 0.7), camera_rig(G).lookat(30.0, 0.0)).images[0]
    assert np.array_equal(b, media.to_uint8(expected))  # PNG: exactly `my3dgen render`'s pixels

    preview = _get(viewer, "/api/frame", yaw=30, quality="preview")
    assert preview.headers["content-type"] == "image/jpeg" and _image(preview).shape == (32, 32, 3)
    other = _get(viewer, "/api/frame", yaw=-30, quality="preview", format="png")
    assert _image(other).shape == (32, 32, 3) and not np.array_equal(_image(other), _image(preview))
    depth = _get(viewer, "/api/frame", yaw=30, quality="full", mode="depth", format="png")
    assert _image(depth).shape == (32, 32, 3) and not np.array_equal(_image(depth)[..., 0], _image(depth)[..., 2])


def test_sliders_change_the_face_and_reuse_cached_planes(viewer: LiveViewer):
    frames = [_image(_get(viewer, "/api/frame", quality="full", format="png", **q))
              for q in ({"mix": 0}, {"mix": 1}, {"mix": 0, "truncation": 0.3})]
    assert not np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[0], frames[2])
    calls = []
    G = viewer.scene.G
    original = G.planes
    G.planes = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        for yaw in (-10, 0, 10):
            assert _get(viewer, "/api/frame", yaw=yaw, mix=1).status_code == 200
    finally:
        G.planes = original
    assert calls == []  # tri-planes of mix=1 were cached by the first request


def test_bad_token_other_origin_and_host_are_refused(viewer: LiveViewer):
    for path in ("/", "/assets/app.js", "/api/info", "/api/frame"):
        assert requests.get(viewer.url + path, timeout=10).status_code == 403
        for bad in ("", "x", viewer.token + "x", viewer.token[:-1], viewer.token.upper()):
            r = requests.get(viewer.url + path, params={"token": bad}, timeout=10)
            assert r.status_code == 403 and "token" in r.text
    assert requests.post(f"{viewer.url}/api/save/png", params={"token": "nope"}, timeout=10).status_code == 403
    assert not viewer.out.exists()
    ok = requests.get(viewer.url + "/api/info", params={"token": viewer.token}, timeout=10,
                      headers={"X-My3dgen-Token": "ignored when the URL has one"})
    assert ok.status_code == 200
    assert requests.get(viewer.url + "/api/info", headers={"X-My3dgen-Token": viewer.token}).status_code == 200
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Host": f"evil.example:{viewer.url.rsplit(':', 1)[1]}"}):
        r = requests.post(f"{viewer.url}/api/save/png", params={"token": viewer.token}, headers=headers, timeout=10)
        assert r.status_code == 403, headers
    same = requests.get(viewer.url + "/api/info", params={"token": viewer.token}, headers={"Origin": viewer.url})
    assert same.status_code == 200


def test_path_traversal_is_refused(viewer: LiveViewer):
    host, port = viewer.url.removeprefix("http://").split(":")
    paths = ["/assets/../../pyproject.toml", "/assets/..%2f..%2fpyproject.toml", "/assets/%2e%2e/%2e%2e/setup.py",
             "/../setup.py", "/assets/index.html", "/assets/style.css/../../setup.py", "/assets/__init__.py",
             "/assets/..%5c..%5cpyproject.toml", "/my3dgen_cli/view/server.py", "/assets//etc/passwd"]
    for raw in paths:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", f"{raw}?token={viewer.token}")  # sent as is: no client-side normalization
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status in (400, 404), (raw, response.status)
        assert b"[build-system]" not in body and b"setup(" not in body and b"import" not in body


def test_a_burst_returns_only_the_newest_frame(viewer: LiveViewer):
    scheduler = viewer.app.state.scheduler
    results: dict[int, requests.Response] = {}

    def ask(seq: int) -> None:
        results[seq] = _get(viewer, "/api/frame", yaw=-40 + 10 * seq, quality="full", client="burst", seq=seq)

    with scheduler.lock:  # the generator is busy: the burst queues behind it
        threads = [threading.Thread(target=ask, args=(seq,)) for seq in range(1, 7)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while scheduler.newest("burst") < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert {seq: r.status_code for seq, r in results.items()} == {1: 204, 2: 204, 3: 204, 4: 204, 5: 204, 6: 200}
    assert all(not results[seq].content for seq in range(1, 6))
    newest = _get(viewer, "/api/frame", yaw=20, quality="full", client="another-page")
    assert results[6].headers["x-frame-seq"] == "6" and np.array_equal(_image(results[6]), _image(newest))
    late = _get(viewer, "/api/frame", yaw=0, client="burst", seq=3)  # older than what this page has seen
    assert late.status_code == 204


def test_bad_parameters_are_400_with_a_message(viewer: LiveViewer):
    for params, word in (({"yaw": "abc"}, "yaw"), ({"pitch": 500}, "pitch"), ({"mix": 2}, "mix"),
                         ({"mode": "normals"}, "mode"), ({"quality": "huge"}, "quality"), ({"format": "gif"}, "format"),
                         ({"seq": "1.5"}, "seq"), ({"client": "a/b"}, "client"), ({"yaw": "nan"}, "yaw")):
        r = _get(viewer, "/api/frame", **params)
        assert r.status_code == 400 and word in r.json()["error"], params
    assert requests.post(f"{viewer.url}/api/save/gif", params={"token": viewer.token}).status_code == 404


def test_save_png_and_orbit(viewer: LiveViewer):
    r = requests.post(f"{viewer.url}/api/save/png", params={"token": viewer.token, "yaw": 30, "mix": 1}, timeout=60)
    assert r.status_code == 200
    saved = Path(r.json()["saved"])
    assert saved == viewer.out / "b_psi0.70_yaw+030_pitch+000.png"
    shown = _image(_get(viewer, "/api/frame", yaw=30, mix=1, quality="full"))
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), shown)
    again = requests.post(f"{viewer.url}/api/save/png", params={"token": viewer.token, "yaw": 30, "mix": 1})
    assert Path(again.json()["saved"]).name == "b_psi0.70_yaw+030_pitch+000-2.png" and saved.is_file()
    orbit = requests.post(f"{viewer.url}/api/save/orbit", params={"token": viewer.token, "mix": 0.5}, timeout=120)
    video = Path(orbit.json()["saved"])
    assert video.name == "seed1-b_mix0.50_psi0.70_orbit.mp4" and media.count_video_frames(video) == 4


def test_view_state_parsing_rounds_slider_keys():
    state = ViewState.parse({"yaw": "12.5", "mix": "0.333", "truncation": "0.7049"})
    assert (state.yaw, state.pitch, state.mix, state.truncation, state.mode) == (12.5, 0.0, 0.33, 0.7, "rgb")


def test_cli_names_the_extra_when_it_is_missing(monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    r = CliRunner().invoke(app, ["view", "--seed", "1"])
    assert r.exit_code == 1
    assert r.output.strip() == 'error: my3dgen view needs its web server packages (uvicorn missing): pip install ' \
                               '"my3dgen[view]"'


@pytest.mark.usefixtures("tiny_base")
def test_cli_serves_prints_the_url_and_opens_the_browser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The real command: the URL it prints and opens serves the page and frames; it stops cleanly."""
    import webbrowser

    from my3dgen_cli.view import server

    servers, seen = [], {}
    real_server_for = server.server_for
    monkeypatch.setattr(server, "server_for", lambda a: servers.append(real_server_for(a)) or servers[-1])

    def browser(url: str) -> bool:  # stands in for the user's browser
        seen["url"] = url
        seen["page"] = requests.get(url, timeout=30).status_code
        seen["frame"] = requests.get(url.replace("/?", "/api/frame?") + "&quality=full", timeout=60)
        seen["bad"] = requests.get(url.split("?")[0], timeout=30).status_code
        servers[0].should_exit = True
        return True

    monkeypatch.setattr(webbrowser, "open", browser)
    r = CliRunner().invoke(app, ["view", "--base", "tiny-test", "--seed", "3", "--json", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    assert printed["url"] == seen["url"] and printed["url"].startswith("http://127.0.0.1:")
    assert printed["sources"] == ["seed3"] and printed["seeds"] is True
    assert seen["page"] == 200 and seen["bad"] == 403
    assert seen["frame"].status_code == 200 and _image(seen["frame"]).shape == (64, 64, 3)


@pytest.mark.usefixtures("tiny_base")
def test_cli_refuses_bad_input_in_one_line(tmp_path: Path):
    runner = CliRunner()
    r = runner.invoke(app, ["view", "--base", "tiny-test", "--seed", "1,2,3", "--no-browser"])
    assert r.exit_code == 2 and "two to interpolate between; got 3 (seed1, seed2, seed3)" in r.output
    r = runner.invoke(app, ["view", "--base", "tiny-test", "--latent", str(tmp_path / "gone.latent")])
    assert r.exit_code == 2 and "gone.latent does not exist" in r.output
    r = runner.invoke(app, ["view", "--base", "tiny-test", "--anchor", "0"])
    assert r.exit_code == 2 and "--identity" in r.output
    r = runner.invoke(app, ["view", "--base", "tiny-test", "--port", "70000"])
    assert r.exit_code == 2 and "--port" in r.output
    from my3dgen_cli.view.server import open_socket

    taken = open_socket("127.0.0.1", 0)
    try:
        r = runner.invoke(app, ["view", "--base", "tiny-test", "--port", str(taken.getsockname()[1])])
        assert r.exit_code == 2 and "cannot listen on 127.0.0.1" in r.output and len(r.output.splitlines()) == 1
    finally:
        taken.close()


def test_every_page_file_is_served_and_shipped_in_the_wheel():
    import fnmatch

    from my3dgen_cli.view.server import ASSET_TYPES, load_assets

    folder = Path(__file__).resolve().parents[1] / "my3dgen_cli" / "view" / "assets"
    files = {p.name for p in folder.iterdir() if p.is_file()}
    assert files == {"index.html", *ASSET_TYPES} and set(load_assets("t")) == files
    pyproject = tomllib.loads((folder.parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["my3dgen_cli.view"]
    assert all(any(fnmatch.fnmatch(f"assets/{name}", pat) for pat in patterns) for name in files)
    assert "starlette" in " ".join(pyproject["project"]["optional-dependencies"]["dev"])

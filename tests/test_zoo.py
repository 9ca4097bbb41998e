"""The model cache and `my3dgen fetch` / `cache` against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner
from zoo_server import FileServer, closed_port, serving

from my3dgen_cli import zoo
from my3dgen_cli.cli import app
from my3dgen_cli.errors import ArtifactError, ChecksumError, DownloadError, OfflineError
from my3dgen_cli.zoo import download, store

ROOT = Path(__file__).resolve().parents[1]
BODY = os.urandom(300_000) + b"end"  # several 64 KiB server chunks
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    with serving(monkeypatch, retries=1) as srv:
        srv.state.files["/w.bin"] = BODY
        yield srv


def write_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "lab.toml"
    path.write_text(text)
    monkeypatch.setenv("MY3DGEN_REGISTRY", str(path))
    return path


def entry_toml(name: str, url: str, sha256: str | None = SHA, **extra: object) -> str:
    lines = ["[[artifact]]", f'name = "{name}"', f'url = "{url}"', 'kind = "other"', 'license = "test"']
    if sha256:
        lines.append(f'sha256 = "{sha256}"')
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def lab(server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    """A lab registry: `test-weights` (known sha256) and `test-unhashed` (hash recorded on first fetch)."""
    text = entry_toml("test-weights", server.url("/w.bin")) + entry_toml(
        "test-unhashed", server.url("/w.bin"), None
    )
    write_registry(tmp_path, monkeypatch, text)
    return server


def run(*args: str) -> object:
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result: object, *needles: str) -> None:
    assert result.exit_code != 0, result.stdout
    # a download announces itself first (`downloading NAME (...)`); the failure is then one line
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("downloading ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def cache_files() -> list[str]:
    root = store.root()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "locks" not in p.parts)


# --------------------------------------------------------------------------- happy paths


def test_fetch_verifies_caches_and_downloads_once(lab: FileServer) -> None:
    first = run("fetch", "test-weights", "--json")
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)["artifacts"][0]
    assert doc["sha256"] == SHA and doc["size"] == len(BODY)
    assert Path(doc["path"]).read_bytes() == BODY and Path(doc["path"]).name == SHA
    second = run("fetch", "test-weights", "--json")
    assert second.exit_code == 0 and json.loads(second.stdout)["artifacts"][0]["path"] == doc["path"]
    assert lab.state.gets("/w.bin") == [None], "the second fetch must come from the cache"
    assert zoo.ensure("test-weights") == Path(doc["path"])
    listed = json.loads(run("cache", "ls", "--json").stdout)["cached"]
    assert [r["name"] for r in listed] == ["test-weights"]
    assert run("cache", "verify").exit_code == 0


def test_unknown_hash_is_recorded_on_first_fetch(lab: FileServer) -> None:
    assert zoo.get_entry("test-unhashed").sha256 is None
    zoo.ensure("test-unhashed")
    entry = zoo.get_entry("test-unhashed")
    assert (entry.sha256, entry.size, entry.recorded) == (SHA, len(BODY), True)
    local = json.loads((store.root() / "registry.local.json").read_text())
    assert local["recorded"]["test-unhashed"]["sha256"] == SHA


def test_list_and_json(lab: FileServer) -> None:
    human = run("fetch", "--list")
    assert human.exit_code == 0
    header = human.stdout.splitlines()[0].split()
    assert header == ["name", "kind", "size", "cached", "license"]
    assert any(line.startswith("eg3d-ffhq512-128 ") for line in human.stdout.splitlines())
    zoo.ensure("test-weights")
    rows = {r["name"]: r for r in json.loads(run("fetch", "--list", "--json").stdout)["artifacts"]}
    assert {"eg3d-ffhq512-128", "lpips-alexnet", "lpips-vgg16", "arcface-ir-se50", "mtcnn-onet"} <= set(rows)
    assert rows["test-weights"]["cached"] == "yes" and rows["test-unhashed"]["cached"] == "no"
    assert rows["test-weights"]["size"] is None and rows["mtcnn-onet"]["size"] == 1557637
    assert rows["eg3d-ffhq512-128"]["kind"] == "base-generator"
    assert rows["eg3d-ffhq512-128"]["license"].startswith("NVIDIA")


def test_lab_registry_overrides_a_packaged_entry_field_by_field(
    server: FileServer, tmp_path, monkeypatch
) -> None:
    import torch

    weights = tmp_path / "ir_se50.pth"  # no published hash: trusted only once it opens as torch weights
    torch.save({"output_layer.weight": torch.ones(2, 2)}, weights)
    server.state.files["/ir_se50.pth"] = weights.read_bytes()
    write_registry(tmp_path, monkeypatch, f'name = "arcface-ir-se50"\nurl = "{server.url("/ir_se50.pth")}"\n')
    entry = zoo.get_entry("arcface-ir-se50")
    assert entry.url == server.url("/ir_se50.pth") and entry.kind == "identity-network" and entry.license
    assert zoo.ensure("arcface-ir-se50").read_bytes() == weights.read_bytes()


def test_html_page_is_refused_and_the_mirror_used(server: FileServer, tmp_path, monkeypatch) -> None:
    server.state.files["/login"] = b"<html>please confirm</html>"
    server.state.content_types["/login"] = "text/html; charset=utf-8"
    mirrors = [server.url("/missing"), server.url("/w.bin")]
    write_registry(tmp_path, monkeypatch, entry_toml("mirrored", server.url("/login"), None, mirrors=mirrors))
    assert zoo.ensure("mirrored").read_bytes() == BODY
    assert zoo.get_entry("mirrored").sha256 == SHA  # the HTML page's hash was never recorded


# --------------------------------------------------------------------------- broken downloads


def test_dropped_connection_resumes_on_the_next_fetch(lab: FileServer, monkeypatch) -> None:
    monkeypatch.setenv("MY3DGEN_RETRIES", "0")
    lab.state.drops_left["/w.bin"], lab.state.drop_after["/w.bin"] = 1, 131072
    first = run("fetch", "test-weights")
    assert_one_line_error(first, "test", "131072 of")
    part = store.part_path("test-weights")
    assert part.stat().st_size == 131072
    assert json.loads(run("cache", "ls", "--json").stdout)["cached"] == []
    second = run("fetch", "test-weights", "--json")
    assert second.exit_code == 0, second.stderr
    assert lab.state.gets("/w.bin") == [None, "bytes=131072-"]
    assert Path(json.loads(second.stdout)["artifacts"][0]["path"]).read_bytes() == BODY
    assert not part.exists()


def test_dropped_connection_is_retried_within_one_fetch(lab: FileServer) -> None:
    lab.state.drops_left["/w.bin"], lab.state.drop_after["/w.bin"] = 1, 65536
    assert download.sha256_file(zoo.ensure("test-weights")) == SHA
    assert lab.state.gets("/w.bin") == [None, "bytes=65536-"]


def test_wrong_sha256_leaves_the_cache_unchanged(lab: FileServer, tmp_path, monkeypatch) -> None:
    write_registry(tmp_path, monkeypatch, entry_toml("bad-hash", lab.url("/w.bin"), "0" * 64))
    before = cache_files()
    result = run("fetch", "bad-hash")
    assert_one_line_error(result, "bad-hash", SHA, "0" * 64, "nothing was cached")
    assert result.exit_code == ChecksumError.exit_code
    assert cache_files() == before
    assert not list(store.root().rglob("*.part"))


@pytest.mark.parametrize("case", ["404", "unreachable"])
def test_http_errors_are_one_line(case: str, server: FileServer, tmp_path, monkeypatch) -> None:
    url = server.url("/missing") if case == "404" else f"http://127.0.0.1:{closed_port()}/w.bin"
    write_registry(tmp_path, monkeypatch, entry_toml("broken", url))
    result = run("fetch", "broken")
    assert_one_line_error(result, url, "404" if case == "404" else "refused")
    with pytest.raises(DownloadError):
        zoo.ensure("broken")
    assert not (store.root() / "blobs").exists()


def test_free_disk_is_checked(lab: FileServer, monkeypatch) -> None:
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    with pytest.raises(DownloadError, match="not enough free disk"):
        zoo.ensure("test-weights")


# --------------------------------------------------------------------------- offline, names, --from


def test_offline_never_touches_the_network(lab: FileServer, monkeypatch) -> None:
    flag = run("fetch", "test-weights", "--offline")
    assert_one_line_error(flag, "test-weights", "my3dgen fetch test-weights", "--from w.bin")
    monkeypatch.setenv("MY3DGEN_OFFLINE", "1")
    env = run("fetch", "test-weights")
    assert_one_line_error(env, "offline")
    with pytest.raises(OfflineError):
        zoo.ensure("test-weights")
    assert lab.state.log == []
    monkeypatch.delenv("MY3DGEN_OFFLINE")
    zoo.ensure("test-weights")
    assert zoo.ensure("test-weights", offline=True).read_bytes() == BODY


def test_unknown_name_suggests_the_closest(lab: FileServer) -> None:
    assert_one_line_error(run("fetch", "eg3d-ffhq512"), "unknown artifact", "did you mean 'eg3d-ffhq512-128'")
    with pytest.raises(ArtifactError, match="test-weights"):
        zoo.get_entry("test-weight")


def test_from_imports_and_checks(lab: FileServer, tmp_path: Path) -> None:
    good, wrong = tmp_path / "w.bin", tmp_path / "other.bin"
    good.write_bytes(BODY)
    wrong.write_bytes(b"not the weights")
    assert_one_line_error(run("fetch", "test-weights", "--from", str(wrong)), "test-weights", SHA)
    assert_one_line_error(run("fetch", "test-weights", "--from", str(tmp_path / "nope")), "--from")
    assert_one_line_error(run("fetch", "test-weights", "test-unhashed", "--from", str(good)), "exactly 1")
    ok = run("fetch", "test-unhashed", "--from", str(good), "--json")
    assert ok.exit_code == 0, ok.stderr
    assert zoo.get_entry("test-unhashed").sha256 == SHA  # recorded on first import
    assert_one_line_error(run("fetch", "test-unhashed", "--from", str(wrong)), "recorded on first fetch")
    assert lab.state.log == []


# --------------------------------------------------------------------------- processes, packages, conversion


def test_two_processes_fetch_once(lab: FileServer) -> None:
    lab.state.chunk_delay_s = 0.05  # ~0.25 s per download, so the two overlap
    code = "from my3dgen_cli import zoo; print(zoo.ensure('test-weights'))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] and Path(outs[0]).read_bytes() == BODY
    assert lab.state.gets("/w.bin") == [None]


def test_package_url_resolves_without_importing(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "site" / "zoo_fake_pkg"
    (pkg / "assets").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('package:// must not import the package')\n")
    (pkg / "assets" / "w.bin").write_bytes(BODY)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    text = entry_toml("pkg-weights", "package://zoo_fake_pkg/assets/w.bin") + entry_toml(
        "pkg-missing", "package://zoo_no_such_pkg/w.bin"
    )
    write_registry(tmp_path, monkeypatch, text)
    monkeypatch.setenv("MY3DGEN_OFFLINE", "1")  # local sources work offline
    assert zoo.ensure("pkg-weights").read_bytes() == BODY
    assert "zoo_fake_pkg" not in sys.modules
    assert_one_line_error(run("fetch", "pkg-missing"), "zoo_no_such_pkg", "pip install")


@pytest.mark.parametrize("name", ["mtcnn-pnet", "mtcnn-rnet", "mtcnn-onet"])
def test_mtcnn_weights_come_from_the_installed_wheel(name: str) -> None:
    path = zoo.ensure(name, offline=True)
    assert download.sha256_file(path) == zoo.get_entry(name).sha256


def test_base_generator_is_converted_once(lab: FileServer, tmp_path, monkeypatch) -> None:
    calls: list[tuple[Path, Path]] = []

    def convert_pkl(src: Path, dst: Path, **options: object) -> Path:  # counts (the real one: test_base_from_pkl.py)
        assert options == {"config": "tiny", "source_name": "w.bin"}
        calls.append((src, dst))
        dst.write_bytes(b"safetensors:" + src.read_bytes()[:16])
        dst.with_suffix(".json").write_text("{}")
        return dst

    from my3dgen_cli.weights import checkpoint

    monkeypatch.setattr(checkpoint, "convert_pkl", convert_pkl)
    text = (
        f'[[artifact]]\nname = "tiny-base"\nurl = "{lab.url("/w.bin")}"\nkind = "base-generator"\n'
        f'format = "eg3d-pkl"\nconfig = "tiny"\nlicense = "test"\n'
    )
    write_registry(tmp_path, monkeypatch, text)
    result = run("fetch", "tiny-base", "--drop-pkl", "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["artifacts"][0]
    out = Path(row["converted"])
    assert out.name == "generator.safetensors" and out.with_suffix(".json").is_file() and row["path"] is None
    assert not (store.root() / "blobs" / SHA).exists(), "--drop-pkl removes the .pkl"
    assert zoo.resolve_base("tiny-base", offline=True) == out
    again = run("fetch", "tiny-base", "--offline", "--json")  # converted: no .pkl needed
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["artifacts"][0]["converted"] == str(out)
    assert len(calls) == 1 and lab.state.gets("/w.bin") == [None]
    assert run("cache", "verify", "--json").exit_code == 0
    with pytest.raises(ArtifactError, match="not a base generator"):
        zoo.resolve_base("mtcnn-onet")


def test_cache_verify_and_rm(lab: FileServer) -> None:
    blob = zoo.ensure("test-weights")
    blob.write_bytes(b"bit rot")  # same name, wrong content
    bad = run("cache", "verify")
    assert bad.exit_code != 0 and "corrupt" in bad.stdout
    assert_one_line_error(bad, "test-weights", "cache rm")
    assert run("cache", "rm", "test-weights").exit_code == 0
    assert not blob.exists() and json.loads(run("cache", "ls", "--json").stdout)["cached"] == []
    assert_one_line_error(run("cache", "rm", "test-weights"), "not in the cache")
    assert zoo.verify() == []


def test_a_registry_that_is_not_utf8_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_registry(tmp_path, monkeypatch, "")
    path.write_bytes(b'name = "x\xe9"\n')  # Latin-1: TOML files are UTF-8
    result = CliRunner().invoke(app, ["fetch", "--list"])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "not UTF-8 text" in result.output and "Traceback" not in result.output


def test_an_unrecognised_offline_value_is_an_error_not_online(monkeypatch: pytest.MonkeyPatch) -> None:
    from my3dgen_cli import paths

    for value, expected in (("1", True), ("Yes", True), ("off", False), ("", False), ("0", False)):
        monkeypatch.setenv("MY3DGEN_OFFLINE", value)
        assert paths.offline() is expected
    monkeypatch.setenv("MY3DGEN_OFFLINE", "maybe")  # once silently online
    result = CliRunner().invoke(app, ["fetch", "demo-tiny-v2"])
    assert_one_line_error(result, "MY3DGEN_OFFLINE: got 'maybe'")


def test_my3dgen_home_that_is_a_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    monkeypatch.setenv("MY3DGEN_HOME", str(afile))
    for args in (["identities"], ["cache", "ls"], ["fetch", "--list"]):
        assert_one_line_error(CliRunner().invoke(app, args), "MY3DGEN_HOME:", "is a file, expected a folder")

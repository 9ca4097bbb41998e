"""Trust on first use: a file with no published hash is trusted only once it converted or opened.

Every refusal path leaves MY3DGEN_HOME byte-identical (cache, refs, blobs, conversions and the local
registry of recorded hashes), a URL serving the wrong bytes falls back to the mirrors, and `fetch`
fetches again what no longer matches instead of returning it. A real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from official_pkl import write_discriminator_pkl, write_official_pkl
from test_zoo import BODY, SHA, assert_one_line_error, entry_toml, run, write_registry
from zoo_server import FileServer, serving, tree_listing

from my3dgen_cli import paths, zoo
from my3dgen_cli.eg3d import build_generator
from my3dgen_cli.weights.converted import read_converted_base
from my3dgen_cli.zoo import download, store


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    with serving(monkeypatch, retries=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def pickles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A good tiny base pickle (training-loop layout) and the bad files a user or a server may hand us."""
    folder = tmp_path_factory.mktemp("pickles")
    torch.manual_seed(3)
    config = build_generator("tiny").config.to_dict()
    state = build_generator("tiny").state_dict()
    init, rendering = config["init_kwargs"], config["rendering_kwargs"]
    good = write_official_pkl(folder / "good.pkl", state, init, rendering, 32).read_bytes()
    other_config = write_official_pkl(folder / "nrr16.pkl", state, init, rendering, 16).read_bytes()
    unsafe = write_official_pkl(
        folder / "evil.pkl", state, init, rendering, 32, extra_globals={"x": _SystemCall(folder / "ran")}
    ).read_bytes()
    return {
        "good": good,
        "empty": b"",
        "truncated": good[: len(good) // 2],
        # what a proxy or a moved link serves instead of the file (random bytes can be a valid prefix)
        "not a pickle": b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head></html>\n" * 64,
        "another network": write_discriminator_pkl(folder / "d.pkl").read_bytes(),
        "another config": other_config,
        "unsafe": unsafe,
    }


class _SystemCall:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


REFUSED = {
    "empty": "is empty",
    "truncated": "ends early",
    "not a pickle": "not a readable pickle",
    "another network": "is a DualDiscriminator, expected an EG3D generator",
    "another config": "neural_rendering_resolution: 16 vs 32",
    "unsafe": "refused before it could run",
}


def base_toml(name: str, url: str, *, mirrors: list[str] | None = None, sha256: str | None = None) -> str:
    lines = ["[[artifact]]", f'name = "{name}"', f'url = "{url}"', 'kind = "base-generator"',
             'format = "eg3d-pkl"', 'config = "tiny"', 'license = "test"', 'filename = "tiny.pkl"']  # fmt: skip
    if mirrors:
        lines.append(f"mirrors = {json.dumps(mirrors)}")
    if sha256:
        lines.append(f'sha256 = "{sha256}"')
    return "\n".join(lines) + "\n"


@pytest.fixture
def warm(server: FileServer, pickles: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FileServer:
    """A cache already holding one trusted base (`good-base`); `new-base` (no hash yet) at /new.pkl and
    `plain` (a published hash) at /w.bin."""
    server.state.files["/good.pkl"] = pickles["good"]
    server.state.files["/w.bin"] = BODY
    write_registry(
        tmp_path, monkeypatch,
        base_toml("good-base", server.url("/good.pkl")) + base_toml("new-base", server.url("/new.pkl"))
        + entry_toml("plain", server.url("/w.bin")),
    )  # fmt: skip
    result = run("fetch", "good-base")
    assert result.exit_code == 0, result.output
    return server


def home_listing() -> dict:
    return tree_listing(paths.home())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- refused files leave nothing


@pytest.mark.parametrize("kind", sorted(REFUSED))
@pytest.mark.parametrize("how", ["from", "download", "local"])
def test_refused_file_leaves_the_cache_byte_identical(
    kind: str, how: str, warm: FileServer, pickles: dict[str, bytes], tmp_path: Path
) -> None:
    before = home_listing()
    assert "cache/registry.local.json" in before and any(k.startswith("cache/converted/") for k in before)
    if how == "local":  # `--local` converts with the file's own config: another config is fine there
        if kind == "another config":
            return
        src = tmp_path / "tiny.pkl"
        src.write_bytes(pickles[kind])
        result = run("fetch", "my-run", "--from", str(src), "--local")
        assert result.exit_code != 0 and REFUSED[kind] in result.stderr, result.output
        assert home_listing() == before, "no lock file, no base, nothing else"
        return
    if how == "from":
        src = tmp_path / "tiny.pkl"
        src.write_bytes(pickles[kind])
        result = run("fetch", "new-base", "--from", str(src))
        todo = "--base" if kind == "another config" else "my3dgen fetch new-base --from tiny.pkl"
    else:
        warm.state.files["/new.pkl"] = pickles[kind]
        result = run("fetch", "new-base")
        todo = "--base" if kind == "another config" else "download tiny.pkl again"
    assert_one_line_error(result, "new-base", REFUSED[kind], "nothing was cached", todo)
    assert home_listing() == before
    assert zoo.get_entry("new-base").sha256 is None and zoo.read_ref("new-base") is None
    assert not (tmp_path / "ran").exists()

    # The next, good file is accepted (the refused one was never recorded as the trusted one).
    good = tmp_path / "tiny.pkl"
    good.write_bytes(pickles["good"])
    ok = run("fetch", "new-base", "--from", str(good), "--json")
    assert ok.exit_code == 0, ok.output
    assert zoo.get_entry("new-base").sha256 == sha(pickles["good"])
    assert Path(json.loads(ok.stdout)["artifacts"][0]["converted"]).is_file()


def test_unopenable_weights_with_no_published_hash_are_refused(server: FileServer, tmp_path, monkeypatch) -> None:
    server.state.files["/ir.pth"] = BODY  # random bytes, not torch weights
    write_registry(tmp_path, monkeypatch, entry_toml("ir", server.url("/ir.pth"), None, format="torch-state-dict"))
    before = home_listing()
    result = run("fetch", "ir")
    assert_one_line_error(result, "ir", "not a readable torch weights file", "nothing was cached")
    assert home_listing() == before
    weights = tmp_path / "ir.pth"
    torch.save({"w": torch.ones(3)}, weights)
    server.state.files["/ir.pth"] = weights.read_bytes()
    assert zoo.ensure("ir").read_bytes() == weights.read_bytes()
    assert zoo.get_entry("ir").sha256 == sha(weights.read_bytes())


def test_a_trusted_hash_is_recorded_only_with_its_blob_ref_and_conversion(warm: FileServer) -> None:
    ref = zoo.read_ref("good-base")
    recorded = json.loads((store.root() / "registry.local.json").read_text())["recorded"]
    assert set(recorded) == {"good-base"} and recorded["good-base"]["sha256"] == ref["sha256"]
    assert (store.root() / ref["blob"]).is_file() and (store.root() / ref["converted"]).is_file()
    assert warm.state.gets("/good.pkl") == [None]


# --------------------------------------------------------------------------- mirrors


def test_primary_serving_wrong_bytes_falls_back_to_the_mirror(
    server: FileServer, pickles: dict[str, bytes], tmp_path, monkeypatch
) -> None:
    server.state.files["/bad.pkl"] = pickles["truncated"]
    server.state.files["/mirror.pkl"] = pickles["good"]
    server.state.files["/other.bin"] = b"other bytes"
    write_registry(
        tmp_path, monkeypatch,
        base_toml("tofu-base", server.url("/bad.pkl"), mirrors=[server.url("/mirror.pkl")])
        + entry_toml("hashed", server.url("/other.bin"), mirrors=[server.url("/w.bin")]),
    )  # fmt: skip
    server.state.files["/w.bin"] = BODY
    result = run("fetch", "tofu-base", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["artifacts"][0]
    assert Path(row["path"]).read_bytes() == pickles["good"] and Path(row["converted"]).is_file()
    assert zoo.get_entry("tofu-base").sha256 == sha(pickles["good"])
    assert zoo.read_ref("tofu-base")["source"] == server.url("/mirror.pkl")
    assert server.state.gets("/bad.pkl") == [None] and server.state.gets("/mirror.pkl") == [None]
    # A published hash: the primary's bytes fail it, the mirror's match.
    assert zoo.ensure("hashed").read_bytes() == BODY
    assert zoo.read_ref("hashed")["source"] == server.url("/w.bin")


def test_every_url_refused_names_each_and_leaves_nothing(
    server: FileServer, pickles: dict[str, bytes], tmp_path, monkeypatch
) -> None:
    server.state.files["/a.pkl"] = pickles["truncated"]
    server.state.files["/b.pkl"] = pickles["another network"]
    write_registry(tmp_path, monkeypatch, base_toml("tofu-base", server.url("/a.pkl"), mirrors=[server.url("/b.pkl")]))
    result = run("fetch", "tofu-base")
    assert_one_line_error(
        result, server.url("/a.pkl"), "ends early", server.url("/b.pkl"), "DualDiscriminator", "nothing was cached"
    )
    assert home_listing() == {}


# --------------------------------------------------------------------------- fetch rehashes what is cached


def test_fetch_downloads_again_a_blob_that_fails_verification(warm: FileServer) -> None:
    assert run("fetch", "plain").exit_code == 0
    blob = zoo.cached("plain")
    blob.write_bytes(b"x" * len(BODY))  # same size: only a rehash can tell
    assert zoo.cached("plain") == blob  # the cheap check cannot
    result = run("fetch", "plain", "--json")
    assert result.exit_code == 0, result.output
    assert Path(json.loads(result.stdout)["artifacts"][0]["path"]).read_bytes() == BODY
    assert warm.state.gets("/w.bin") == [None, None]
    assert run("cache", "verify").exit_code == 0


def test_fetch_of_a_base_redoes_a_damaged_blob_or_conversion(warm: FileServer, pickles: dict[str, bytes]) -> None:
    ref = zoo.read_ref("good-base")
    converted = store.root() / ref["converted"]
    converted.write_bytes(b"\0" * converted.stat().st_size)
    result = run("fetch", "good-base")
    assert result.exit_code == 0, result.output
    # Converted again from the kept .pkl (a new conversion id, so a new file hash), nothing downloaded.
    assert download.sha256_file(converted) == zoo.read_ref("good-base")["converted_sha256"]
    assert zoo.resolve_base("good-base") == converted and read_converted_base(converted).state_dict
    assert warm.state.gets("/good.pkl") == [None]

    blob = store.root() / ref["blob"]
    blob.write_bytes(b"\0" * blob.stat().st_size)
    result = run("fetch", "good-base")
    assert result.exit_code == 0, result.output
    assert blob.read_bytes() == pickles["good"] and warm.state.gets("/good.pkl") == [None, None]
    assert run("cache", "verify").exit_code == 0


def test_published_hash_mismatch_still_says_what_to_do(server: FileServer, tmp_path, monkeypatch) -> None:
    server.state.files["/w.bin"] = BODY
    write_registry(tmp_path, monkeypatch, entry_toml("bad-hash", server.url("/w.bin"), "0" * 64, filename="w.bin"))
    result = run("fetch", "bad-hash")
    assert_one_line_error(result, SHA, "nothing was cached", "my3dgen fetch bad-hash --from w.bin")
    assert home_listing() == {}


@pytest.mark.parametrize("case", ["exists", "registry name", "not a pkl", "bad name"])
def test_refused_local_base_import_leaves_home_byte_identical(
    case: str, warm: FileServer, pickles: dict[str, bytes], tmp_path: Path
) -> None:
    """Every refusal of `fetch NAME --from F --local`, before or after taking the name's lock, leaves no lock file."""
    src = tmp_path / "tiny.pkl"
    src.write_bytes(pickles["good"])
    assert run("fetch", "taken", "--from", str(src), "--local").exit_code == 0
    before = home_listing()
    assert not any(k.endswith(".lock") for k in before), before
    name, given, needle = {
        "exists": ("taken", src, "exists already"),
        "registry name": ("good-base", src, "is a registry artifact"),
        "not a pkl": ("fresh", tmp_path, "expected an existing EG3D network pickle"),
        "bad name": ("Bad/Name", src, "local base name"),
    }[case]
    result = run("fetch", name, "--from", str(given), "--local", "--json")  # (no "converting ..." note)
    assert_one_line_error(result, needle)
    assert home_listing() == before

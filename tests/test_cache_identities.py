"""`my3dgen cache ls | prune | rm | verify` and `my3dgen identities [rm | export | import]` through the CLI, on a
home made here: tiny local bases, identities written with the library's own writers, a file:// registry entry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from render_fixtures import tiny_generator
from safetensors.torch import save_file
from test_zoo import assert_one_line_error as one_line_error
from typer.testing import CliRunner

from my3dgen_cli import identity_store
from my3dgen_cli.adapter_file import save_adapter
from my3dgen_cli.cli import app
from my3dgen_cli.generators import local_bases_dir, open_base, save_local_base
from my3dgen_cli.identity import (
    Anchors,
    IdentityPaths,
    PartialAnchors,
    identity_paths,
    write_anchors,
    write_partial_anchors,
)
from my3dgen_cli.lora import add_adapters

MEMBERS = ("adapter.safetensors", "anchors.safetensors", "log.json", "previews/grid.png")


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def tree(root: Path) -> dict[str, str]:
    """Every file under root (dot-folders too) with its sha256: equal before and after = nothing changed."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*")
            if p.is_file()}


def make_base(name: str, seed: int = 0) -> str:
    """A tiny local base; returns its fingerprint (open_base records it beside the weights)."""
    save_local_base(tiny_generator(seed), name)
    return open_base(name)[1].sha256


def make_identity(name: str, base: str, fingerprint: str, seed: int = 1) -> Path:
    """An identity folder as personalize leaves it: adapter (non-zero B), anchors, preview, log."""
    G = tiny_generator(0)
    gen = torch.Generator().manual_seed(seed)
    add_adapters(G, rank=1, generator=gen)
    with torch.no_grad():
        for n, p in G.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    ip = identity_paths(name)
    save_adapter(G, ip.adapter, base, fingerprint, extra={"photos": ["a.png", "b.png"], "created": "2026-01-01"})
    with torch.no_grad():
        ws = G.mapping(torch.randn(2, G.z_dim, generator=gen), torch.zeros(2, 25))
    write_anchors(ip.anchors, Anchors(ws, torch.randn(2, 25, generator=gen), ["a.png", "b.png"]))
    ip.previews.mkdir(parents=True)
    Image.new("RGB", (8, 4), (200, 10, 10)).save(ip.previews / "grid.png")
    ip.log.write_text(json.dumps({"loss": [1.0, 0.5]}))
    return ip.root


def make_build(name: str, base: str, stage: str) -> Path:
    """An unfinished personalize build `.NAME.build` on `base`: with its anchors done, or partway through them."""
    ip = IdentityPaths(identity_paths(name).root.with_name(f".{name}.build"))
    ws = torch.randn(2, 6, 32)  # any [N, num_ws, w_dim]: only the recorded base is read here
    if stage == "anchors":
        write_anchors(ip.anchors, Anchors(ws, torch.zeros(2, 25), ["a.png", "b.png"], {"base": base, "space": "w"}))
    else:
        ip.checkpoints.mkdir(parents=True)
        write_partial_anchors(ip.partial_anchors, PartialAnchors(ws[:1], {"base": base, "photos": ["a.png"]}))
    return ip.root


@pytest.fixture
def ana(isolated_home: Path) -> Path:
    fingerprint = make_base("tiny-a")
    return make_identity("ana", "tiny-a", fingerprint)


# --- identities -------------------------------------------------------------------------------------------------


def test_a_broken_folder_is_marked_and_the_good_ones_still_listed(ana: Path, isolated_home: Path) -> None:
    identities = isolated_home / "identities"
    (identities / "garbled").mkdir()
    (identities / "garbled" / "adapter.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    (identities / "nometa").mkdir()
    save_file({"x.lora_A": torch.zeros(1, 1)}, str(identities / "nometa" / "adapter.safetensors"),
              metadata={"format": "my3dgen-lora/1"})
    (identities / "empty").mkdir()
    (identities / "empty" / "log.json").write_text("{}")
    (identities / ".ana.new-1-abcdef12").mkdir()  # a build folder is not an identity
    shutil.copytree(ana, identities / "noanchors")
    (identities / "noanchors" / "anchors.safetensors").write_bytes(b"")  # once listed as healthy
    (identities / "dir").mkdir()
    (identities / "dir" / "adapter.safetensors").mkdir()

    doc = json.loads(run("identities", "--json").stdout)
    assert [r["name"] for r in doc["identities"]] == ["ana"]
    reasons = {b["name"]: b["reason"] for b in doc["broken"]}
    assert set(reasons) == {"dir", "empty", "garbled", "nometa", "noanchors"}
    assert "anchors.safetensors" in reasons["noanchors"]
    one_line_error(run("render", "--identity", "dir", "--seed", "0", "-o", str(isolated_home / "x.png")),
                   "identity 'dir' is broken")  # not "no identity named 'dir'"
    assert "no adapter.safetensors" in reasons["empty"]
    assert "not a readable safetensors adapter" in reasons["garbled"]
    assert "adapter metadata has no" in reasons["nometa"]  # names the missing key
    human = run("identities", "list")
    assert human.exit_code == 0, human.output
    assert "ana" in human.stdout and "BROKEN" in human.stdout and "identities rm garbled" in human.stdout


def test_identities_rm_removes_good_and_broken_folders(ana: Path, isolated_home: Path) -> None:
    (isolated_home / "identities" / "junk").mkdir()
    res = run("identities", "rm", "ana", "junk", "--json")
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in json.loads(res.stdout)["removed"]] == ["ana", "junk"]
    assert tree(isolated_home / "identities") == {}
    one_line_error(run("identities", "rm", "ana"), "no identity named 'ana'")
    one_line_error(run("identities", "rm", "../cache"), "identity name")


def test_identities_rm_of_an_unknown_name_lists_the_unfinished_builds_too(ana: Path, isolated_home: Path) -> None:
    make_build("bob", "tiny-a", "anchors")
    make_build("ana", "tiny-a", "anchors")  # a replacement of ana under way: ana is listed once
    before = tree(isolated_home)
    one_line_error(run("identities", "rm", "nosuch"), "no identity named 'nosuch' (known: ana, bob (unfinished))")
    assert tree(isolated_home) == before
    res = run("identities", "rm", "bob")  # the name the message offers is one rm takes
    assert res.exit_code == 0 and "removed bob: unfinished build" in res.stdout, res.output


def test_export_then_import_is_bit_identical_and_renders_the_same(ana: Path, tmp_path: Path) -> None:
    archive = tmp_path / "ana.zip"
    res = run("identities", "export", "ana", "-o", str(archive), "--json")
    assert res.exit_code == 0, res.output
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == sorted(["identity.json", *MEMBERS])
    original = {m: (ana / m).read_bytes() for m in MEMBERS}
    one_line_error(run("identities", "export", "ana", "-o", str(archive)), "--force")

    res = run("identities", "import", str(archive), "--name", "ana2", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["anchors"] == 2
    copy = identity_paths("ana2").root
    assert {m: (copy / m).read_bytes() for m in MEMBERS} == original

    one_line_error(run("identities", "import", str(archive)), "exists", "--force")
    assert run("identities", "rm", "ana").exit_code == 0
    assert run("identities", "import", str(archive)).exit_code == 0  # its own name by default
    assert {m: (ana / m).read_bytes() for m in MEMBERS} == original
    assert run("identities", "import", str(archive), "--force").exit_code == 0

    from my3dgen_cli.eg3d.camera import frontal_camera, lookat_camera
    from my3dgen_cli.generators import open_generator

    images = []
    for name in ("ana", "ana2"):
        G, _, _ = open_generator(identity=name)
        torch.manual_seed(0)
        with torch.no_grad():
            ws = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(3)), frontal_camera(1))
            images.append(G.synthesis(ws, lookat_camera([10.0], 0.0))["image"])
    assert torch.equal(images[0], images[1])


def _rebuild(src: Path, dst: Path, extra: dict[str, bytes] | None = None, drop: tuple[str, ...] = (),
             replace: dict[str, bytes] | None = None, manifest_files: bool = True) -> Path:
    """A copy of archive `src` with members added, dropped or replaced; the manifest lists the new hashes when
    `manifest_files` (so the check under test is the one that refuses)."""
    with zipfile.ZipFile(src) as zf:
        members = {n: zf.read(n) for n in zf.namelist() if n not in drop}
    members.update(replace or {})
    members.update(extra or {})
    manifest = json.loads(members.pop("identity.json"))
    if manifest_files:
        manifest["files"] = {n: {"sha256": hashlib.sha256(b).hexdigest()} for n, b in members.items()}
    with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("identity.json", json.dumps(manifest))
        for name, data in members.items():
            zf.writestr(name, data)
    return dst


HOSTILE = {
    "traversal": (dict(extra={"../evil.txt": b"x"}), "'../evil.txt' is not part of an identity archive"),
    "traversal-in-previews": (dict(extra={"previews/../../evil.png": b"x"}), "is not part of an identity archive"),
    "absolute": (dict(extra={"/tmp/evil.txt": b"x"}), "'/tmp/evil.txt' is not part of an identity archive"),
    "code": (dict(extra={"adapter.py": b"import os"}), "'adapter.py' is not part of"),
    "no-adapter": (dict(drop=("adapter.safetensors",)), "has no adapter.safetensors"),
    "tampered": (dict(replace={"log.json": b"{}"}, manifest_files=False), "log.json does not match its sha256"),
    "garbage-adapter": (dict(replace={"adapter.safetensors": b"not safetensors"}), "do not open"),
    "bad-manifest": (dict(replace={"identity.json": b"[1, 2]"}), "identity.json: got format"),
    "deep-manifest": (dict(), "identity.json is not JSON"),  # nested past json's recursion limit, under 1 MiB
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archives_are_refused_and_change_nothing(case: str, ana: Path, tmp_path: Path,
                                                         isolated_home: Path) -> None:
    good = tmp_path / "good.zip"
    assert run("identities", "export", "ana", "-o", str(good)).exit_code == 0
    options, needle = HOSTILE[case]
    if case in ("bad-manifest", "deep-manifest"):
        manifest = b"[1, 2]" if case == "bad-manifest" else b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
            for n in src.namelist():
                dst.writestr(n, manifest if n == "identity.json" else src.read(n))
    else:
        bad = _rebuild(good, tmp_path / "bad.zip", **options)
    before = tree(isolated_home)
    one_line_error(run("identities", "import", str(bad), "--name", "mallory", "--force"), needle)
    one_line_error(run("identities", "import", str(bad), "--name", "ana", "--force"), needle)
    assert tree(isolated_home) == before
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_outputs_inside_the_identities_or_cache_folder_are_refused_even_with_force(ana: Path, tmp_path: Path,
                                                                                   isolated_home: Path) -> None:
    """`identities export` / `export` / `render` once wrote over the identity they read (its adapter with a zip or
    a merged base): any -o inside my3dgen's own folders is refused, and the identity still renders."""
    before = tree(isolated_home)
    adapter = ana / "adapter.safetensors"
    for args in (["identities", "export", "ana", "-o", str(adapter), "--force"],
                 ["export", "--identity", "ana", "-o", str(adapter), "--force"],
                 ["render", "--identity", "ana", "--seed", "0", "-o", str(ana / "view.png"), "--force"],
                 ["identities", "export", "ana", "-o", str(isolated_home / "cache" / "x.zip")]):
        one_line_error(run(*args), "inside my3dgen's")
    assert tree(isolated_home) == before
    assert run("render", "--identity", "ana", "--seed", "0", "-o", str(tmp_path / "ok.png")).exit_code == 0


def test_an_identity_on_a_base_file_says_to_pass_that_file(ana: Path, tmp_path: Path, isolated_home: Path) -> None:
    """`personalize --base merged.safetensors` records the base as 'merged'; later commands without --base once
    said only "unknown artifact 'merged'". They name the identity and say to pass the file; with it, it renders."""
    import shutil

    fingerprint = make_base("tiny-b")
    make_identity("om", "merged", fingerprint)
    for args in (["render", "--identity", "om", "--seed", "0", "-o", str(tmp_path / "om.png")],
                 ["export", "--identity", "om", "-o", str(tmp_path / "om.onnx")]):
        one_line_error(run(*args), "identity 'om' was trained on base 'merged'", "pass that file with --base")
    merged = tmp_path / "merged.safetensors"
    shutil.copyfile(isolated_home / "cache" / "bases" / "tiny-b.safetensors", merged)
    shutil.copyfile(isolated_home / "cache" / "bases" / "tiny-b.json", merged.with_suffix(".json"))
    result = run("render", "--identity", "om", "--base", str(merged), "--seed", "0", "-o", str(tmp_path / "om.png"))
    assert result.exit_code == 0, result.output


def test_damaged_bytes_and_a_broken_identity_are_one_line(ana: Path, tmp_path: Path, isolated_home: Path) -> None:
    good = tmp_path / "good.zip"
    assert run("identities", "export", "ana", "-o", str(good)).exit_code == 0
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:
        info = zf.getinfo("adapter.safetensors")
    middle = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
    data[middle] ^= 0xFF  # inside the adapter's compressed bytes: inflate or the CRC fails
    damaged = tmp_path / "damaged.zip"
    damaged.write_bytes(bytes(data))
    before = tree(isolated_home)
    one_line_error(run("identities", "import", str(damaged), "--name", "bob"), "adapter.safetensors")
    assert tree(isolated_home) == before
    save_file({"x.lora_A": torch.zeros(1, 1)}, str(ana / "adapter.safetensors"), metadata={"format": "my3dgen-lora/1"})
    result = run("identities", "export", "ana", "-o", str(tmp_path / "x.zip"))
    one_line_error(result, "broken", "adapter metadata has no")
    assert not (tmp_path / "x.zip").exists()


def test_a_huge_member_stops_at_the_bound(ana: Path, tmp_path: Path, isolated_home: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    good = tmp_path / "good.zip"
    assert run("identities", "export", "ana", "-o", str(good)).exit_code == 0
    bomb = _rebuild(good, tmp_path / "bomb.zip", replace={"log.json": b"\0" * (4 << 20)})
    assert bomb.stat().st_size < 200_000  # 4 MiB of zeros packs to a few KiB: a (small) zip bomb
    monkeypatch.setattr(identity_store, "MAX_MEMBER_BYTES", 1 << 20)
    before = tree(isolated_home)
    one_line_error(run("identities", "import", str(bomb), "--name", "bob"), "log.json would unpack to 4,194,304 bytes")
    monkeypatch.setattr(identity_store, "MAX_MEMBER_BYTES", 1 << 30)
    monkeypatch.setattr(identity_store, "MAX_ARCHIVE_BYTES", 2 << 20)
    one_line_error(run("identities", "import", str(bomb), "--name", "bob"), "unpacks to")
    assert tree(isolated_home) == before


def test_an_archive_made_on_other_weights_or_a_missing_base_is_refused(ana: Path, tmp_path: Path,
                                                                       isolated_home: Path) -> None:
    archive = tmp_path / "ana.zip"
    assert run("identities", "export", "ana", "-o", str(archive)).exit_code == 0
    for path in local_bases_dir().glob("tiny-a.*"):
        path.unlink()
    before = tree(isolated_home)
    one_line_error(run("identities", "import", str(archive), "--name", "bob"), "base 'tiny-a'", "not here")
    make_base("tiny-a", seed=5)  # same name, other weights
    before = tree(isolated_home)
    one_line_error(run("identities", "import", str(archive), "--name", "bob"), "other weights", "nothing was imported")
    assert tree(isolated_home) == before


def test_import_dispatches_on_the_file_type(tmp_path: Path) -> None:
    one_line_error(run("identities", "import", str(tmp_path / "x.tar")), "expected an identity archive (.zip)")
    one_line_error(run("identities", "import", str(tmp_path / "snap.pkl")), "needs --name")
    not_zip = tmp_path / "x.zip"
    not_zip.write_bytes(b"PK junk")
    one_line_error(run("identities", "import", str(not_zip)), "not a readable zip archive")


# --- cache ------------------------------------------------------------------------------------------------------


@pytest.fixture
def stocked(ana: Path, tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home with a fetched artifact (file:// registry), an orphan blob, a partial download, a local base,
    an identity and a leftover identity build folder of a process that is gone."""
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(5000))
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    registry = tmp_path / "lab.toml"
    registry.write_text(f'[[artifact]]\nname = "test-weights"\nurl = "{weights.as_uri()}"\nkind = "other"\n'
                        f'license = "test"\nsha256 = "{sha}"\n')
    monkeypatch.setenv("MY3DGEN_REGISTRY", str(registry))
    assert run("fetch", "test-weights").exit_code == 0
    cache = isolated_home / "cache"
    (cache / "blobs" / ("0" * 64)).write_bytes(b"orphan")
    (cache / "partial").mkdir(exist_ok=True)
    (cache / "partial" / "big.part").write_bytes(b"half" * 100)
    leftover = isolated_home / "identities" / ".ana.new-999999999-abcdef12"
    leftover.mkdir()
    (leftover / "adapter.safetensors").write_bytes(b"half-built")
    return cache


def test_cache_ls_shows_everything_with_size_last_use_and_total(stocked: Path) -> None:
    doc = json.loads(run("cache", "ls", "--json").stdout)
    kinds = {(r["kind"], r["name"]) for r in doc["items"]}
    assert {("blob", "test-weights"), ("blob", "unreferenced"), ("partial", "big"), ("local-base", "tiny-a"),
            ("identity", "ana"), ("identity-leftover", ".ana.new-999999999-abcdef12")} <= kinds
    assert all(r["size"] > 0 and r["last_used"] > 0 for r in doc["items"])
    assert doc["total_size"] == sum(r["size"] for r in doc["items"])
    identity_row = next(r for r in doc["items"] if r["kind"] == "identity")
    assert identity_row["size"] == sum(p.stat().st_size for p in Path(identity_row["path"]).rglob("*") if p.is_file())
    human = run("cache", "ls")
    assert human.exit_code == 0 and "total" in human.stdout and "tiny-a" in human.stdout


def test_cache_prune_removes_only_what_nothing_uses(stocked: Path, isolated_home: Path) -> None:
    dry = json.loads(run("cache", "prune", "--dry-run", "--json").stdout)
    assert {(r["kind"], r["name"]) for r in dry["removed"]} == {
        ("blob", "unreferenced"), ("partial", "big"), ("identity-leftover", ".ana.new-999999999-abcdef12")}
    assert (stocked / "partial" / "big.part").exists()
    res = run("cache", "prune", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["freed"] == dry["freed"] > 0
    assert not (stocked / "partial" / "big.part").exists() and not (stocked / "blobs" / ("0" * 64)).exists()
    assert not (isolated_home / "identities" / ".ana.new-999999999-abcdef12").exists()
    assert run("fetch", "test-weights", "--offline").exit_code == 0  # still cached
    assert run("identities", "--json").stdout.count('"name": "ana"') == 1
    assert json.loads(run("cache", "prune", "--json").stdout)["removed"] == []


def test_a_running_build_folder_is_not_pruned(ana: Path, isolated_home: Path) -> None:
    mine = isolated_home / "identities" / f".ana.new-{os.getpid()}-abcdef12"
    mine.mkdir()
    assert json.loads(run("cache", "prune", "--json").stdout)["removed"] == []
    assert mine.is_dir()


def test_cache_rm_bases_and_identities_by_name(stocked: Path, isolated_home: Path) -> None:
    one_line_error(run("cache", "rm", "ana"), "is an identity", "identities rm ana")
    assert identity_paths("ana").adapter.is_file()
    res = run("cache", "rm", "tiny-a", "test-weights", "--json", "--force")  # ana was trained on tiny-a
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in json.loads(res.stdout)["removed"]] == ["tiny-a", "test-weights"]
    assert not list(local_bases_dir().glob("tiny-a.*"))
    assert run("cache", "rm", "ana", "--identity").exit_code == 0
    assert not identity_paths("ana").root.exists()
    one_line_error(run("cache", "rm", "nothing-here"), "not in the cache")


def test_cache_rm_of_a_base_in_use_needs_force(ana: Path, isolated_home: Path) -> None:
    make_build("bob", "tiny-a", "anchors")
    make_build("carl", "tiny-a", "partial")
    make_build("dora", "tiny-b", "anchors")  # another base: not named
    (isolated_home / "identities" / ".eve.build").mkdir()  # stopped before any anchor: records no base
    before = tree(isolated_home)
    one_line_error(run("cache", "rm", "tiny-a"), "identities ana, bob (unfinished), carl (unfinished) were trained on "
                   "base tiny-a; nothing was removed; --force removes it anyway (the identities stay and work again "
                   "after `my3dgen fetch tiny-a --from FILE.pkl --local`)")
    assert tree(isolated_home) == before
    res = run("cache", "rm", "tiny-a", "--force", "--json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["removed"][0]
    assert (row["name"], row["identities"], row["unfinished_identities"]) == ("tiny-a", ["ana"], ["bob", "carl"])
    assert not list(local_bases_dir().glob("tiny-a.*")) and identity_paths("ana").adapter.is_file()
    make_base("tiny-a")
    res = run("cache", "rm", "tiny-a", "--force")
    assert res.exit_code == 0 and res.stdout.strip() == "removed tiny-a", res.output
    assert res.stderr.strip() == ("warning: removed base tiny-a, which identities ana, bob (unfinished), carl "
                                  "(unfinished) were trained on; the identities stay and work again after `my3dgen "
                                  "fetch tiny-a --from FILE.pkl --local`")


def test_cache_rm_of_a_base_no_identity_uses_needs_no_force(ana: Path) -> None:
    make_base("tiny-b", seed=3)
    res = run("cache", "rm", "tiny-b", "--json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["removed"][0]
    assert (row["identities"], row["unfinished_identities"]) == ([], [])
    one_line_error(run("cache", "rm", "tiny-a", "nothing-here"), "identity ana was trained on base tiny-a")


def test_cache_verify_rereads_local_bases(ana: Path) -> None:
    res = run("cache", "verify", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["results"] == [
        {"name": "tiny-a", "status": "ok", "detail": "weights match their recorded fingerprint"}]
    weights = local_bases_dir() / "tiny-a.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor: the file still opens, the weights are not the same
    weights.write_bytes(bytes(data))
    res = run("cache", "verify", "tiny-a")
    one_line_error(res, "1 of 1")
    assert "no longer match" in res.stdout

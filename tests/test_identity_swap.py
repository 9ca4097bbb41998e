"""Replacing an identity is atomic: the old one stays whole until the new one is complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from my3dgen_cli import paths
from my3dgen_cli.identity import building_identity, identity_paths, list_identities

ROOT = Path(__file__).resolve().parents[1]


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _old_identity(name: str) -> Path:
    ip = identity_paths(name)
    ip.root.mkdir(parents=True)
    ip.adapter.write_bytes(b"old adapter")
    ip.anchors.write_bytes(b"old anchors")
    return ip.root


def test_a_failure_while_building_keeps_the_old_identity() -> None:
    root = _old_identity("ana")
    before = _listing(paths.identities_dir())
    with pytest.raises(RuntimeError), building_identity("ana") as new:
        new.adapter.write_bytes(b"half")
        raise RuntimeError("killed half-way")
    assert _listing(paths.identities_dir()) == before
    assert sorted(p.name for p in root.parent.iterdir()) == ["ana"]


def test_a_finished_build_replaces_the_whole_folder() -> None:
    _old_identity("ana")
    with building_identity("ana") as new:
        new.adapter.write_bytes(b"new adapter")
    ip = identity_paths("ana")
    assert ip.adapter.read_bytes() == b"new adapter"
    assert not ip.anchors.exists(), "a file of the old identity must not survive beside the new adapter"
    assert sorted(p.name for p in ip.root.parent.iterdir()) == ["ana"]
    assert list_identities() == ["ana"]


def test_a_killed_process_leaves_the_old_identity(tmp_path: Path) -> None:
    root = _old_identity("ana")
    before = _listing(root)
    code = (
        "import time\n"
        "from my3dgen_cli.identity import building_identity\n"
        "with building_identity('ana') as new:\n"
        "    new.adapter.write_bytes(b'half')\n"
        "    print('building', flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "building"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _listing(root) == before
    assert list_identities() == ["ana"], "a half-built dot-folder is not an identity"


def test_a_kill_between_the_two_renames_is_repaired_by_the_next_build() -> None:
    """The swap renames the old folder aside, then the new one in: a kill between the two leaves the old
    identity whole under `.ana.old-*`; the next build puts it back first, so a failing build keeps it."""
    root = _old_identity("ana")
    before = _listing(root)
    os.replace(root, root.with_name(".ana.old-123-abc"))
    assert list_identities() == []
    with pytest.raises(RuntimeError), building_identity("ana"):
        assert _listing(root) == before, "restored before the build starts"
        raise RuntimeError("this build fails too")
    assert _listing(root) == before and list_identities() == ["ana"]
    with building_identity("ana") as new:
        new.adapter.write_bytes(b"new adapter")
    assert sorted(p.name for p in root.parent.iterdir()) == ["ana"], "no .old-* or .trash-* folder left"


def test_a_resumable_build_is_kept_on_failure_and_continued() -> None:
    from my3dgen_cli.identity import build_paths

    root = _old_identity("ana")
    before = _listing(root)
    with pytest.raises(KeyboardInterrupt), building_identity("ana", resumable=True) as new:
        new.anchors.write_bytes(b"new anchors")
        raise KeyboardInterrupt
    assert _listing(root) == before and build_paths("ana").anchors.read_bytes() == b"new anchors"
    with building_identity("ana", resumable=True) as again:
        assert again.anchors.read_bytes() == b"new anchors", "the same folder, continued"
        again.adapter.write_bytes(b"new adapter")
    assert _listing(root) == {"adapter.safetensors": b"new adapter", "anchors.safetensors": b"new anchors"}
    assert not build_paths("ana").root.exists()


def test_identities_lists_an_unfinished_build_and_rm_removes_it() -> None:
    """An interrupted `personalize` is not hidden: `identities` names it with what to do; `rm` removes it."""
    import json

    from typer.testing import CliRunner

    from my3dgen_cli.cli import app
    from my3dgen_cli.identity import build_paths

    _old_identity("ana")
    with pytest.raises(RuntimeError), building_identity("ana", resumable=True) as new:
        new.partial_anchors.parent.mkdir(parents=True, exist_ok=True)
        new.partial_anchors.write_bytes(b"chunk 0")
        raise RuntimeError("Ctrl-C while projecting")
    with pytest.raises(RuntimeError), building_identity("cy", resumable=True) as new:
        raise RuntimeError("stopped at once")  # nothing saved: no folder is kept
    assert not build_paths("cy").root.exists()
    build_paths("bob").root.mkdir()  # a run killed (SIGKILL) before it saved anything
    listed = json.loads(CliRunner().invoke(app, ["identities", "--json"]).stdout)
    unfinished = {u["name"]: u["reason"] for u in listed["unfinished"]}
    assert sorted(unfinished) == ["ana", "bob"], listed
    assert "projecting anchors" in unfinished["ana"] and "ana stays as it is" in unfinished["ana"]
    assert "identities rm" not in unfinished["ana"] and "--force" in unfinished["ana"]  # rm would take ana too
    assert "without --resume" in unfinished["bob"] and "identities rm bob" in unfinished["bob"]
    human = CliRunner().invoke(app, ["identities"]).stdout
    assert "bob" in human and "UNFINISHED" in human

    result = CliRunner().invoke(app, ["identities", "rm", "ana", "bob"])
    assert result.exit_code == 0, result.output
    assert "ana: identity and its unfinished build" in result.output and "bob: unfinished build" in result.output
    assert sorted(p.name for p in paths.identities_dir().iterdir()) == []
    assert not build_paths("ana").root.exists()


def test_prune_keeps_the_only_whole_copy_of_an_identity() -> None:
    """A kill between a replacement's two renames leaves `.NAME.old-*` as the only whole copy: `cache prune`
    must not delete it (the next build puts it back); a `.trash-*` folder and an `.old-*` beside NAME go."""
    from my3dgen_cli.identity_store import leftover_builds

    root = _old_identity("ana")
    only_copy = root.with_name(".ana.old-999999-aaaaaaaa")
    os.replace(root, only_copy)
    trash = root.with_name(".ana.trash-999999-bbbbbbbb")
    trash.mkdir()
    assert [r["name"] for r in leftover_builds()] == [trash.name]
    _old_identity("ana")
    assert sorted(r["name"] for r in leftover_builds()) == sorted([only_copy.name, trash.name])

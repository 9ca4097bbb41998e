"""Personalization on several ranks (gloo on 127.0.0.1, CPU): torchrun runs the real CLI.

- one identity on 2 ranks (data-parallel) = one process with the same batch and seed;
- a rank that crashes in the anchor stage leaves the anchors of the finished rounds; `--resume`
  on 2 ranks projects only the rest and equals one process;
- a batch file of 3 people on 2 ranks: rank 1 fails mid-run (MY3DGEN_TEST_FAIL), a rerun
  finishes only what is missing (the failed person resumes from its checkpoint), and every
  adapter equals the one a single process makes (the seed comes from the name, not the rank).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from my3dgen_cli.adapter_file import read_adapter
from my3dgen_cli.personalize.config import TrainConfig
from my3dgen_cli.personalize.distributed import Dist, identity_seed, shard
from tests.personalize_helpers import TRAIN_YAWS, fresh, make_person, write_photos

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 150  # one torchrun call; each takes ~15-30 s on 2 loaded cores
# Tolerance of 2 ranks vs 1 process: the same math, gradients summed in another order, so float32 rounding
# differs slightly (ATOL). Adam's step m / sqrt(v) is about +-lr whatever a gradient's size, so where a gradient
# is near zero, rounding can move that value by up to lr per step: a few values (OUTLIERS of each tensor) may
# differ by more, within the learning rate (LR).
ATOL = 2e-6
OUTLIERS = 0.02
LR = TrainConfig.lr


@pytest.fixture(autouse=True)
def _single_process(one_thread_offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No torchrun variables leak in from the environment: the in-process runs are one process."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MY3DGEN_TEST_FAIL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def person():
    return make_person()


@pytest.fixture
def setup(person, tmp_path):
    """A local base "tiny-test" in this test's MY3DGEN_HOME and 5 aligned photos with a dataset.json."""
    from my3dgen_cli.generators import save_local_base

    save_local_base(fresh(person), "tiny-test")
    return write_photos(person, tmp_path / "photos", TRAIN_YAWS[:5])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "my3dgen_cli", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=TIMEOUT_S)


def _cli(args: list[str]):
    from my3dgen_cli.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _adapter(name: str) -> dict[str, torch.Tensor]:
    from my3dgen_cli.identity import identity_paths

    return read_adapter(identity_paths(name).adapter).tensors


def _assert_same_adapter(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        diff = (a[key] - b[key]).abs()
        assert float(diff.max()) <= LR, (key, float(diff.max()))
        assert (diff > atol).float().mean() <= OUTLIERS, (key, int((diff > atol).sum()), diff.numel())
    assert any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)  # training moved B off zero


TRAIN = ["--base", "tiny-test", "--steps", "4", "--anchor-steps", "2", "--batch", "2", "--sym-every", "2",
         "--device", "cpu", "--checkpoint-every", "0"]


def test_two_ranks_equal_one_process(setup):
    from my3dgen_cli.identity import identity_paths, read_anchors

    proc = _torchrun(["personalize", str(setup), "--name", "ddp", *TRAIN, "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout[proc.stdout.index("{"):])  # rank 0's JSON (rank 1 prints nothing)
    assert data["name"] == "ddp" and data["steps"] == 4
    _cli(["personalize", str(setup), "--name", "one", *TRAIN, "--quiet"])
    _assert_same_adapter(_adapter("ddp"), _adapter("one"), ATOL)
    # Anchors: chunk 0 (photos 0-3) on rank 0, chunk 1 (photo 4) on rank 1, broadcast: same as one process.
    ws_ddp, ws_one = read_anchors(identity_paths("ddp").anchors).ws, read_anchors(identity_paths("one").anchors).ws
    assert torch.allclose(ws_ddp, ws_one, atol=1e-6)
    log_ddp = json.loads(identity_paths("ddp").log.read_text())["steps"]
    log_one = json.loads(identity_paths("one").log.read_text())["steps"]
    assert [r["step"] for r in log_ddp] == [1, 2, 3, 4] and "sym" in log_ddp[0] and "sym" not in log_ddp[1]
    for a, b in zip(log_ddp, log_one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_anchor_crash_on_two_ranks_resumes_from_the_finished_rounds(setup, person, tmp_path):
    from my3dgen_cli.identity import build_paths, identity_paths, read_anchors, read_partial_anchors

    # 9 photos = anchor chunks 0, 1, 2: round 1 is chunk 0 on rank 0 and chunk 1 on rank 1; round 2 is
    # chunk 2 on rank 0, which crashes as it starts it.
    photos = write_photos(person, tmp_path / "nine", TRAIN_YAWS + [50.0])
    args = ["personalize", str(photos), "--name", "ddp", *TRAIN]
    first = _torchrun([*args, "--quiet"], MY3DGEN_TEST_FAIL="0:anchors:2")
    assert first.returncode != 0 and "anchor chunk 2" in first.stderr, first.stderr[-3000:]
    build = build_paths("ddp")
    partial = read_partial_anchors(build.partial_anchors)
    assert partial is not None and partial.ws.shape[0] == 8 and not build.anchors.exists()
    second = _torchrun([*args, "--resume"])  # human mode: rank 0 says what it reuses
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing 8 of 9 photos" in second.stderr + second.stdout
    ip = identity_paths("ddp")
    assert not ip.partial_anchors.exists() and not build.root.exists()
    _cli(["personalize", str(photos), "--name", "one", *TRAIN, "--quiet"])
    ws_ddp, ws_one = read_anchors(ip.anchors).ws, read_anchors(identity_paths("one").anchors).ws
    assert torch.equal(ws_ddp[:8], partial.ws)
    assert torch.allclose(ws_ddp, ws_one, atol=1e-6)
    _assert_same_adapter(_adapter("ddp"), _adapter("one"), ATOL)


def test_batch_file_survives_a_failed_rank_and_matches_one_process(setup, tmp_path, monkeypatch):
    from my3dgen_cli.identity import identity_paths
    from my3dgen_cli.personalize.people import state_of

    csv = tmp_path / "people.csv"
    csv.write_text("name,photos,labels\nann,photos,\nbob,photos,photos/dataset.json\ncid,photos,\n")
    args = ["personalize", "--batch-file", str(csv), "--base", "tiny-test", "--steps", "4", "--anchor-steps", "1",
            "--batch", "2", "--sym-every", "2", "--device", "cpu", "--checkpoint-every", "1", "--quiet"]
    # Rank 1 owns bob (row 1) and fails after its 2nd step; torchrun then stops rank 0 too.
    first = _torchrun(args, MY3DGEN_TEST_FAIL="1:2")
    assert first.returncode != 0 and "MY3DGEN_TEST_FAIL" in first.stderr, first.stderr[-3000:]
    assert state_of("bob") == "partial"
    before = {n: identity_paths(n).adapter.stat().st_mtime_ns for n in ("ann", "cid") if state_of(n) == "done"}
    second = _torchrun(args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert all(state_of(n) == "done" for n in ("ann", "bob", "cid"))
    for n, mtime in before.items():  # finished people were not redone
        assert identity_paths(n).adapter.stat().st_mtime_ns == mtime, n
    assert "skipped" in second.stdout or not before
    made = {n: _adapter(n) for n in ("ann", "bob", "cid")}
    # The same people in one process, in another home: identical adapters (bob: resumed run = fresh run).
    home2 = tmp_path / "home2"
    monkeypatch.setenv("MY3DGEN_HOME", str(home2))
    from my3dgen_cli.generators import save_local_base

    save_local_base(fresh(make_person()), "tiny-test")
    _cli(args)
    for n in ("ann", "bob", "cid"):
        _assert_same_adapter(made[n], _adapter(n), 1e-6)


def test_shards_and_identity_seeds():
    idx = torch.arange(5)
    parts = [shard(idx, Dist(r, 2)) for r in range(2)]
    assert torch.equal(torch.cat(parts), idx) and [len(p) for p in parts] == [3, 2]
    assert torch.equal(shard(idx, Dist()), idx)
    assert identity_seed(0, "ann") == identity_seed(0, "ann") != identity_seed(0, "bob")
    assert identity_seed(1, "ann") != identity_seed(0, "ann") and 0 <= identity_seed(7, "x" * 64) < 2**31


def test_batch_file_errors_are_one_line(tmp_path):
    from my3dgen_cli.cli import app

    bad = tmp_path / "bad.csv"
    bad.write_text("who,where\nann,photos\n")
    result = CliRunner().invoke(app, ["personalize", "--batch-file", str(bad)])
    assert result.exit_code != 0 and "name, photos" in result.output
    dup = tmp_path / "dup.csv"
    dup.write_text("name,photos\nann,a\nann,b\n")
    result = CliRunner().invoke(app, ["personalize", "--batch-file", str(dup)])
    assert result.exit_code != 0 and "appears twice" in result.output
    result = CliRunner().invoke(app, ["personalize", str(tmp_path), "--batch-file", str(dup)])
    assert result.exit_code != 0 and "--batch-file" in result.output
    result = CliRunner().invoke(app, ["personalize", str(tmp_path)])
    assert result.exit_code != 0 and "--name" in result.output


def test_batch_file_from_excel_bom_and_latin1(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM (read as UTF-8); a Latin-1 CSV is a one-line error, not a traceback."""
    from my3dgen_cli.cli import app
    from my3dgen_cli.personalize.people import read_batch_file

    (tmp_path / "A").mkdir()
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbfname,photos\nana,A\n")
    people = read_batch_file(bom)
    assert [p.name for p in people] == ["ana"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"name,photos\nn\xe9,A\n")
    result = CliRunner().invoke(app, ["personalize", "--batch-file", str(latin)])
    assert result.exit_code != 0 and "Traceback" not in result.output and result.exception.__class__ is SystemExit
    assert "not a UTF-8 CSV file" in result.output

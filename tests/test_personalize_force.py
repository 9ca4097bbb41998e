"""`personalize NAME --force` over an existing identity replaces it atomically (issue 14).

The new identity is built in `identities/.NAME.build` and swapped in only when complete. The real
CLI, in a subprocess on the tiny config, is killed (SIGKILL) or interrupted (SIGINT) at three
points: while projecting anchors, while training, and with the new identity complete just before
the swap (MY3DGEN_TEST_FAIL, the project's fault hook, with MY3DGEN_TEST_FAIL_SIGNAL). After each:
the old identity's files are byte-identical (a listing with sha256), `my3dgen identities` lists it
as before with nothing broken, `render --identity` renders the same image, and `--resume` finishes
the replacement (a new adapter, no build folder left).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.personalize_helpers import fresh, make_person, write_photos

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--base", "tiny-test", "--anchor-steps", "2", "--steps", "5", "--batch", "2", "--sym-every", "2",
        "--device", "cpu", "--checkpoint-every", "2", "--quiet"]
# (fault hook, the stage it stops). 5 photos: anchor chunks 0 (4 photos, saved when done) and 1; training
# checkpoints at steps 2 and 4 of 5, stopped after step 4 (the estimate's trial run before the anchors
# trains 3 steps on a copy and passes the hook's steps 1-3 too).
POINTS = [("0:anchors:1", "anchors"), ("0:4", "training"), ("0:swap:0", "swap")]

pytestmark = pytest.mark.usefixtures("one_thread_offline")


@pytest.fixture
def photos(tmp_path):
    from my3dgen_cli.generators import save_local_base

    person = make_person()
    save_local_base(fresh(person), "tiny-test")
    return write_photos(person, tmp_path / "photos", [-30.0, -15.0, 0.0, 15.0, 30.0])


def _cli(args: list[str]):
    from my3dgen_cli.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def _listing(folder: Path) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _seen(tmp_path: Path) -> tuple[list[dict], bytes]:
    """What other commands see of `ana`: the `identities --json` listing and a render's bytes."""
    listed = json.loads(_cli(["identities", "--json"]).stdout)
    assert listed["broken"] == [], listed
    out = tmp_path / "render.png"
    out.unlink(missing_ok=True)
    _cli(["render", "--identity", "ana", "--anchor", "0", "--yaw", "20", "-o", str(out)])
    return listed["identities"], out.read_bytes()


def _killed_run(photos: Path, seed: int, point: str, how: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MY3DGEN_TEST_FAIL": point, "MY3DGEN_TEST_FAIL_SIGNAL": how,
           "OMP_NUM_THREADS": "1"}
    # A shell starts background jobs with SIGINT ignored, and Python then never raises KeyboardInterrupt:
    # give the run the default disposition, as a terminal would.
    return subprocess.run([sys.executable, "-m", "my3dgen_cli", "personalize", str(photos), "--name", "ana",
                           *ARGS, "--seed", str(seed), "--force"], env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("how", ["KILL", "INT"])
def test_an_interrupted_force_keeps_the_old_identity_and_resumes(photos, tmp_path, how):
    from my3dgen_cli.identity import build_paths, identity_paths
    from my3dgen_cli.personalize.pipeline import can_resume

    _cli(["personalize", str(photos), "--name", "ana", *ARGS, "--seed", "0"])
    folder, build = identity_paths("ana").root, build_paths("ana").root
    for seed, (point, stage) in enumerate(POINTS, start=1):
        before, seen = _listing(folder), _seen(tmp_path)
        run = _killed_run(photos, seed, point, how)
        if how == "KILL":
            assert run.returncode == -signal.SIGKILL, (stage, run.stderr[-2000:])
        else:  # Ctrl-C: exit 130, one line, no traceback
            assert run.returncode == 130, (stage, run.stderr[-2000:])
            assert "Traceback" not in run.stderr and "interrupted" in run.stderr, run.stderr
        assert _listing(folder) == before, f"old identity changed by a {how} during {stage}"
        assert _seen(tmp_path) == seen, f"other commands see another identity after a {how} during {stage}"
        assert build.is_dir() and can_resume("ana"), stage
        plain = CliRunner().invoke(__import__("my3dgen_cli.cli", fromlist=["app"]).app,
                                   ["personalize", str(photos), "--name", "ana", *ARGS, "--seed", str(seed)])
        assert plain.exit_code == 2 and "--resume" in plain.output, plain.output  # refused, points at --resume
        _cli(["personalize", str(photos), "--name", "ana", *ARGS, "--seed", str(seed), "--resume"])
        after = _listing(folder)
        assert after["adapter.safetensors"] != before["adapter.safetensors"], stage
        assert "checkpoints" not in " ".join(after) and not build.exists(), stage
        assert sorted(p.name for p in folder.parent.iterdir()) == ["ana"], stage


def test_a_second_builder_of_one_name_is_refused_while_the_first_runs(photos, tmp_path):
    """Two personalize runs of one name once shared `.NAME.build`: the second emptied it under the first. While
    one process holds the identity's lock (as a running personalize does), a second personalize or an import of
    that name is refused in one line and changes nothing; afterwards no lock file is left."""
    from my3dgen_cli.cli import app
    from my3dgen_cli.identity import identity_lock
    from my3dgen_cli.paths import identities_dir

    _cli(["personalize", str(photos), "--name", "ana", *ARGS])
    archive = tmp_path / "ana.zip"
    _cli(["identities", "export", "ana", "-o", str(archive)])
    before = _listing(identities_dir())
    with identity_lock("ana"):
        for args in (["personalize", str(photos), "--name", "ana", "--force", *ARGS],
                     ["identities", "import", str(archive), "--name", "ana", "--force"]):
            result = CliRunner().invoke(app, args)
            assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
            assert f"being built by another my3dgen process (pid {os.getpid()})" in result.output
        assert {k: v for k, v in _listing(identities_dir()).items() if k != ".ana.lock"} == before
    assert _listing(identities_dir()) == before  # the lock file went with its holder
    _cli(["identities", "import", str(archive), "--name", "ana", "--force"])  # free again

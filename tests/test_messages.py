"""Messages are text: user-chosen paths and names print as given, control characters escaped.

And files my3dgen writes get the user's umask, not a private 0600 (shared lab folders).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from my3dgen_cli.errors import UserInputError
from my3dgen_cli.fileio import write_text_atomic
from my3dgen_cli.output import Output, printable

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "my3dgen_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)


@pytest.mark.parametrize("name", ["[/x]", "[old]", "[bold]me[/bold]", "a[red]b"])
def test_markup_in_a_path_prints_as_given(tmp_path: Path, name: str) -> None:
    proc = _cli("render", "--latent", f"{name}.latent", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{name}.latent" in lines[0]


def test_control_characters_are_escaped(tmp_path: Path) -> None:
    proc = _cli("render", "--latent", "a\x1b[31mred\x07.latent", cwd=tmp_path)
    assert proc.returncode != 0
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr
    assert "a\\x1b[31mred\\x07.latent" in proc.stderr


def test_error_is_one_line_even_with_newlines(capsys: pytest.CaptureFixture[str]) -> None:
    Output().error("bad file: x\ny [b]z[/b]")
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: bad file: x\\ny [b]z[/b]"]


def test_info_warn_and_result_keep_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    out = Output()
    out.info("wrote [old]/x.png")
    out.warn("skipped [/x]")
    out.result({"path": "[/y]"})
    captured = capsys.readouterr()
    assert "wrote [old]/x.png" in captured.err
    assert "warning: skipped [/x]" in captured.err
    assert captured.out.strip() == "path: [/y]"


def test_printable_keeps_plain_text() -> None:
    assert printable("ana/ü 1.png") == "ana/ü 1.png"
    assert printable("a\tb\nc") == "a\tb\nc"
    assert printable("a\tb\nc", one_line=True) == "a b\\nc"


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        target = write_text_atomic(tmp_path / "x.json", "{}")
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("where", ["afile.txt/x.png", "afile.txt/sub/x.png", "adir"])
def test_unwritable_outputs_name_the_users_path(tmp_path: Path, where: str) -> None:
    (tmp_path / "afile.txt").write_text("keep")
    (tmp_path / "adir").mkdir()
    target = tmp_path / where
    with pytest.raises(UserInputError) as info:
        write_text_atomic(target, "x")
    message = str(info.value)
    assert str(target) in message and ".tmp" not in message
    assert (tmp_path / "afile.txt").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile.txt"]
    assert list((tmp_path / "adir").iterdir()) == []

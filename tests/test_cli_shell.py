"""The CLI shell: version, help speed, one-line errors, README and CI in sync."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from typer.testing import CliRunner

from my3dgen_cli import __version__
from my3dgen_cli.cli import app
from my3dgen_cli.commands.options import ModelOptions, model_options

ROOT = Path(__file__).resolve().parents[1]


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"my3dgen {__version__}"


def test_help_is_fast_and_does_not_import_torch() -> None:
    code = (
        "import sys, my3dgen_cli.cli as c\n"
        "c.app(['--help'], standalone_mode=False)\n"
        "print('torch' in sys.modules)"
    )
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    elapsed = time.perf_counter() - start
    assert proc.stdout.strip().splitlines()[-1] == "False", "`my3dgen --help` must not import torch"
    assert elapsed < 2.0, f"--help took {elapsed:.2f}s"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(python3 -m venv .*pytest.*)$", readme, flags=re.M)
    assert commands, "README must give the test command"
    assert commands[0] in ci


def test_model_options_reach_a_command_as_one_object() -> None:
    seen: list[tuple[int, ModelOptions]] = []
    toy = typer.Typer()

    @toy.command()
    @model_options()
    def run(opts: ModelOptions, n: Annotated[int, typer.Option("--n")] = 1) -> None:
        seen.append((n, opts))

    args = ["--n", "3", "--identity", "me", "--base", "b", "--adapter", "a.safetensors", "-o", "o", "--force",
            "--json", "--device", "cpu"]
    assert CliRunner().invoke(toy, args).exit_code == 0
    assert CliRunner().invoke(toy, []).exit_code == 0
    assert seen == [(3, ModelOptions("me", "b", Path("a.safetensors"), Path("o"), True, True, "cpu")),
                    (1, ModelOptions(None, None, None, None, False, False, "auto"))]


def test_invert_has_no_adapter_option() -> None:
    result = CliRunner().invoke(app, ["invert", "x.png", "--adapter", "a.safetensors"])
    assert result.exit_code == 2 and "No such option: --adapter" in result.output

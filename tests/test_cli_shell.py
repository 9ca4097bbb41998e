"""The CLI shell: version, help speed, one-line errors, README and CI in sync."""

from __future__ import annotations

import os
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


def test_bash_completion_script_names_the_program_and_completes() -> None:
    """`my3dgen --show-completion` writes bash's script; the script's hook completes commands and Enum values."""
    hook = ("import sys; sys.argv[0] = 'my3dgen'; from my3dgen_cli.cli import main; main()")
    # Typer finds the shell from the process tree, so the command runs under bash (not exec'd by it) as a user's would.
    line = f'"{sys.executable}" -c "{hook}" --show-completion; exit $?'
    shown = subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "complete -o default -F _my3dgen_completion my3dgen" in shown.stdout
    assert "_MY3DGEN_COMPLETE=complete_bash" in shown.stdout

    def complete(words: str) -> list[str]:
        env = {**os.environ, "_MY3DGEN_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        proc = subprocess.run([sys.executable, "-c", hook], capture_output=True, text=True, cwd=ROOT, env=env)
        return proc.stdout.split()

    assert complete("my3dgen ren") == ["render"]
    assert complete("my3dgen render --amp ") == ["off", "bf16", "fp16"]
    assert complete("my3dgen personalize --amp ") == ["off", "bf16", "fp16"]  # the same option on both


def test_every_help_ends_with_an_example() -> None:
    """Each command's and subcommand's --help ends with an example line of that very command."""
    from my3dgen_cli.clidoc import command_paths, help_text

    for path in command_paths():
        last = help_text(path).splitlines()[-1].strip()
        assert last.startswith(f"my3dgen {' '.join(path)}"), (path, last)


def test_fixed_choices_are_listed_in_help() -> None:
    from my3dgen_cli.clidoc import help_text

    assert "off|bf16|fp16" in help_text(["render"])
    assert "linear|slerp" in help_text(["interpolate"])
    assert "w|w+" in help_text(["invert"])
    assert "onnx|safetensors" in help_text(["export"])


def test_shared_options_mean_the_same_everywhere() -> None:
    """--json, -q/--quiet: one spelling and one help text on every command; -o/--output (alias --out) and
    --device spelled alike (each command says what its output is)."""
    from my3dgen_cli.clidoc import command_paths

    root = typer.main.get_command(app)
    found: dict[str, list] = {}
    for path in command_paths():
        cmd = root
        for name in path:
            cmd = cmd.commands[name]
        for param in cmd.params:
            for flag in ("--json", "--quiet", "--output", "--out", "--device", "--offline"):
                if flag in param.opts:
                    found.setdefault(flag, []).append((path, param))
    for flag, spelling in (("--json", ["--json"]), ("--quiet", ["--quiet", "-q"]), ("--offline", ["--offline"])):
        assert {tuple(sorted(p.opts)) for _, p in found[flag]} == {tuple(sorted(spelling))}, found[flag]
        assert len({p.help for _, p in found[flag]}) == 1, [(path, p.help) for path, p in found[flag]]
    assert all(p.opts[0] == "--output" and "-o" in p.opts for _, p in found["--out"] + found["--output"])
    assert all(p.opts == ["--device"] and p.default in ("auto", "cpu") for _, p in found["--device"])
    assert len(found["--json"]) >= 15 and len(found["--output"]) >= 6
    downloading = {("personalize",), ("invert",), ("eval",), ("render",), ("interpolate",), ("view",), ("export",),
                   ("fetch",)}  # every command that may fetch a base or a loss network can be told not to
    assert downloading <= {tuple(path) for path, _ in found["--offline"]}, found["--offline"]


def test_import_my3dgen_is_lazy_and_gives_the_public_api() -> None:
    code = ("import sys, my3dgen\n"
            "print('torch' in sys.modules)\n"
            "from my3dgen_cli.eg3d import build_generator\n"
            "from my3dgen_cli.lora import add_adapters\n"
            "assert my3dgen.build_generator is build_generator and my3dgen.add_adapters is add_adapters\n"
            "c = my3dgen.lookat_camera(yaw=30.0, pitch=0.0)\n"
            "print(tuple(c.shape), 'torch' in sys.modules)\n"
            "for name in my3dgen.__all__: getattr(my3dgen, name)\n"
            "try:\n    my3dgen.nope\nexcept AttributeError as e:\n    print('AttributeError', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "False", "`import my3dgen` must not import torch"
    assert lines[1] == "(1, 25) True"
    assert lines[2].startswith("AttributeError") and "nope" in lines[2]


def test_a_bare_group_prints_its_help_not_an_error_line() -> None:
    """`my3dgen` and `my3dgen cache` alone show the help page (Click's no_args_is_help), not a one-line error."""
    for args in ([], ["cache"], ["identities", "--help"]):
        result = CliRunner().invoke(app, args, prog_name="my3dgen")
        assert "Usage: my3dgen" in result.output and "error:" not in result.output, result.output
        assert "\\n" not in result.output

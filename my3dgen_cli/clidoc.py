"""The CLI reference (docs/cli.md), built only from the Typer app's `--help` outputs.

    python -m my3dgen_cli.clidoc > docs/cli.md

tests/test_docs.py fails when docs/cli.md differs from this output (a stale reference).
"""

from __future__ import annotations

import sys


def help_text(args: list[str]) -> str:
    """`my3dgen ARGS --help` as a fixed-width terminal prints it (no colour)."""
    from typer.testing import CliRunner

    from my3dgen_cli.cli import app

    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "100", "TERM": "dumb", "NO_COLOR": "1"},
                                terminal_width=100)
    if result.exit_code != 0:
        raise RuntimeError(f"my3dgen {' '.join(args)} --help exited {result.exit_code}: {result.output}")
    return "\n".join(line.rstrip() for line in result.output.strip("\n").splitlines())


def command_paths() -> list[list[str]]:
    """Every command as its argument path (["fetch"], ["cache"], ["cache", "ls"], ...), in registration order."""
    from my3dgen_cli.cli import app

    def name_of(info) -> str:
        return info.name or info.callback.__name__.replace("_", "-")

    paths = [[name_of(info)] for info in app.registered_commands]
    for group in app.registered_groups:
        paths.append([group.name])
        paths += [[group.name, name_of(info)] for info in group.typer_instance.registered_commands]
    return paths


def render() -> str:
    parts = ["# CLI reference", "",
             "Generated from the `--help` of every command by `python -m my3dgen_cli.clidoc > docs/cli.md`;",
             "a test fails when this page is stale.", "", "## my3dgen", "", "```text", help_text([]), "```", ""]
    for path in command_paths():
        parts += [f"## my3dgen {' '.join(path)}", "", "```text", help_text(path), "```", ""]
    return "\n".join(parts)


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()

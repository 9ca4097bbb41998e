"""The `my3dgen` command line: parse, call the library, report. No model math here.

Heavy imports (torch and everything that pulls it in) happen inside the commands so that
`my3dgen --help` stays fast. Only Typer's public API is used (commands, options, `typer.Exit`).
Each command is registered with `@command(...)`, which routes library errors through one
error table: a one-line message on stderr and a non-zero exit, a traceback only with
`MY3DGEN_DEBUG=1`.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from my3dgen_cli import __version__
from my3dgen_cli.errors import My3DGenError
from my3dgen_cli.output import Output

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="my3dgen",
    help="Personalized 3D face priors: LoRA adapters on a frozen EG3D generator.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def one_line_errors(fn: F) -> F:
    """Turn user-facing errors into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from my3dgen_cli import paths

        try:
            return fn(*args, **kwargs)
        except My3DGenError as err:
            if paths.debug():
                raise
            Output().error(str(err))
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            Output().error("interrupted")
            raise typer.Exit(130) from None
        except OSError as err:
            if paths.debug():
                raise
            where = f": {err.filename}" if err.filename else ""
            Output().error(f"{err.strerror or err}{where}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def command(*args: Any, **kwargs: Any) -> Callable[[F], F]:
    """`app.command` with the error table applied."""

    def register(fn: F) -> F:
        app.command(*args, **kwargs)(one_line_errors(fn))
        return fn

    return register


def _version(value: bool) -> None:
    if value:
        typer.echo(f"my3dgen {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Personalized 3D face priors: LoRA adapters on a frozen EG3D generator."""


def output_for(json_mode: bool, quiet: bool = False) -> Output:
    """The output sink for one command invocation (on-demand downloads report there too)."""
    from my3dgen_cli.zoo.visible import show_downloads_on

    output = Output("json" if json_mode else "quiet" if quiet else "human")
    show_downloads_on(output)
    return output


def main() -> None:
    """Console-script entry point. Thread settings first: they only count before torch loads."""
    from my3dgen_cli.devices import cpu_thread_env

    cpu_thread_env()
    sys.exit(app())


# Command modules register themselves on `app` when imported; they must not import torch at import.
# `--help` lists commands in this order (the workflow's); each module may register several.
COMMAND_MODULES: tuple[str, ...] = (
    "fetch", "faces", "personalize", "identities", "invert", "render", "interpolate", "view", "export", "demo", "cache",
)


def _register_commands() -> None:
    import importlib

    for name in COMMAND_MODULES:
        importlib.import_module(f"my3dgen_cli.commands.{name}")


_register_commands()

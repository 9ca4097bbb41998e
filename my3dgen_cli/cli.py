"""The `my3dgen` command line: parse, call the library, report. No model math here.

Heavy imports (torch and everything that pulls it in) happen inside the commands so that
`my3dgen --help` stays fast. Typer's API is used (commands, options, `typer.Exit`, and its root
group class `typer.core.TyperGroup`). Each command is registered with `@command(...)`, which routes
library errors through one error table: a one-line message on stderr and a non-zero exit, a
traceback only with `MY3DGEN_DEBUG=1`. Click's own usage errors (a bad value, an unknown option, a
missing argument) are one line too (`OneLineUsageGroup`, exit code 2). Shell completion is on
(`--install-completion`, `--show-completion`); each command's `--help` ends with its examples from
`commands/examples.py`.
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from my3dgen_cli import __version__
from my3dgen_cli.errors import My3DGenError
from my3dgen_cli.output import Output

F = TypeVar("F", bound=Callable[..., Any])


# Click's usage errors, found through Typer's public BadParameter (Typer 0.2x vendors its own Click copy).
_USAGE_ERROR: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def usage_error_line(err: Any) -> str:
    """Click's own usage error (bad value, unknown option, missing argument) as one line, option first.

    "--fps: 'abc' is not a valid float (see `my3dgen render --help`)" instead of Click's usage block.
    """
    message = err.format_message().rstrip(".")
    kinds = {c.__name__ for c in type(err).__mro__}
    param = getattr(err, "param", None)
    if "BadParameter" in kinds and "MissingParameter" not in kinds and param is not None:
        opts = [o for o in getattr(param, "opts", []) if o.startswith("--")] or [param.human_readable_name]
        message = f"{opts[0]}: {str(err.message).removeprefix('Value error, ').rstrip('.')}"
    ctx = getattr(err, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return f"{message}{where}"


def report_usage_error(err: Any) -> NoReturn:
    """One line on stderr and exit 2; a bare group (`my3dgen`, `my3dgen cache`) prints its help instead, as Click
    does (`no_args_is_help`: that is a usage error in Click >= 8.2, but its message is the whole help page)."""
    ctx = getattr(err, "ctx", None)
    if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
        typer.echo(ctx.get_help())
    else:
        Output().error(usage_error_line(err))
    raise typer.Exit(2) from None


class OneLineUsageGroup(TyperGroup):
    """The root group: Click's usage errors, from any command below it, print as one line and exit 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except _USAGE_ERROR as err:
            report_usage_error(err)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except _USAGE_ERROR as err:
            report_usage_error(err)


app = typer.Typer(
    name="my3dgen",
    help="Personalized 3D face priors: LoRA adapters on a frozen EG3D generator.",
    cls=OneLineUsageGroup,
    no_args_is_help=True,
    add_completion=True,
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
    try:
        code = app()
    except SystemExit as done:
        if done.code == 130:  # an interrupt, handled and reported: one more Ctrl-C would kill the exiting process
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # by the signal (status -2, not 130)
        raise
    sys.exit(code)


# Command modules register themselves on `app` when imported; they must not import torch at import.
# `--help` lists commands in this order (the workflow's); each module may register several.
COMMAND_MODULES: tuple[str, ...] = (
    "fetch", "faces", "personalize", "identities", "invert", "render", "interpolate", "view", "export", "demo", "cache",
)


def _register_commands() -> None:
    import importlib

    from my3dgen_cli.commands.examples import epilog

    for name in COMMAND_MODULES:
        importlib.import_module(f"my3dgen_cli.commands.{name}")
    # Each command's --help ends with its examples (commands/examples.py), groups and subcommands too.
    for info in app.registered_commands:
        info.epilog = info.epilog or epilog(info.name or "")
    for group in app.registered_groups:
        group.epilog = group.epilog or epilog(group.name or "")
        for info in group.typer_instance.registered_commands:
            info.epilog = info.epilog or epilog(f"{group.name} {info.name}")


_register_commands()

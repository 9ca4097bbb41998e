"""How a download shows itself: one line naming the artifact, its size and licence, then a byte
progress bar, on stderr (`my3dgen fetch` and every command that fetches on demand look the same).

The CLI registers each command's `Output` (`show_downloads_on`, called by `cli.output_for`), so a
loss network or base fetched deep inside `personalize` reports there, as `my3dgen fetch` does: the
line and the bar in human mode (the bar only on a terminal), nothing in json or quiet mode;
warnings in every mode but json. From Python, with no command running, downloads report to stderr
in the human style.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from my3dgen_cli.output import Output
from my3dgen_cli.zoo.download import ProgressHook
from my3dgen_cli.zoo.registry import Entry

_registered: Output | None = None


def show_downloads_on(output: Output) -> None:
    """Report on-demand downloads of the running command to `output`."""
    global _registered
    _registered = output


def human_size(size: int | None) -> str:
    if not size:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(size)


def describe(entry: Entry, source: str) -> str:
    """The line before a download: what, how big, under which licence, from where."""
    size = human_size(entry.size) if entry.size else "size not published"
    return (
        f"downloading {entry.name} ({entry.display_filename}, {size}, licence: {entry.license or 'not stated'}) "
        f"from {source}"
    )


@contextmanager
def download_progress(output: Output, label: str) -> Iterator[ProgressHook]:
    """A byte progress bar (size, speed, ETA) on stderr; silent off a terminal or when quiet.

    Yields a `progress(done, total)` hook for `zoo.ensure` / `zoo.resolve_base`. Inside another live
    display (a command's own progress bar) rich allows no second one: then no bar is drawn.
    """
    from rich.errors import LiveError
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=output.err, disable=not output.show_progress, transient=True)
    task = bar.add_task(label, total=None)
    try:
        bar.start()
    except LiveError:
        bar.disable = True

    def hook(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)

    try:
        yield hook
    finally:
        bar.stop()


class Display:
    """What `zoo.ensure` tells the user while it fetches: notes, warnings, and a download's line and bar."""

    def __init__(self, output: Output | None = None) -> None:
        self._output = output

    @property
    def output(self) -> Output:
        if self._output is not None:
            return self._output
        if _registered is not None and _registered.err.file is sys.stderr:  # still the running command's
            return _registered
        return Output("human")

    def info(self, message: str) -> None:
        self.output.info(message)

    def warn(self, message: str) -> None:
        self.output.warn(message)

    @contextmanager
    def download(self, entry: Entry, source: str, progress: ProgressHook | None = None) -> Iterator[Any]:
        """Announce the download of `entry` from `source`; yield `progress` or a new bar's hook."""
        self.info(describe(entry, source))
        if progress is not None:  # the caller draws its own bar (`my3dgen fetch`)
            yield progress
            return
        with download_progress(self.output, entry.name) as hook:
            yield hook

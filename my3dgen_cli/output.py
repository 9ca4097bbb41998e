"""One output sink for every command: results to stdout, progress and messages to stderr.

Modes: "human" (rich text), "json" (one JSON document on stdout, nothing else there) and
"quiet" (results only, no progress). Progress bars show only on a terminal.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Output:
    """Where a command reports. Create one per invocation (tests create their own)."""

    def __init__(self, mode: str = "human") -> None:
        if mode not in {"human", "json", "quiet"}:
            raise ValueError(f"output mode: got {mode!r}, expected 'human', 'json' or 'quiet'")
        self.mode = mode
        self.out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        self.err = Console(file=sys.stderr, highlight=False, soft_wrap=True)

    @property
    def show_progress(self) -> bool:
        return self.mode == "human" and self.err.is_terminal

    def info(self, message: str) -> None:
        """A human note (stderr); silent in json and quiet modes."""
        if self.mode == "human":
            self.err.print(message)

    def warn(self, message: str) -> None:
        """A warning (stderr), shown in every mode but json."""
        if self.mode != "json":
            self.err.print(f"[yellow]warning:[/yellow] {escape(message)}")  # "my3dgen[mesh]" is no tag

    def error(self, message: str) -> None:
        self.err.print(f"[red]error:[/red] {escape(message)}", markup=True, highlight=False)

    def result(self, data: dict[str, Any], human: str | None = None) -> None:
        """The command's result: JSON in json mode, else `human` (or key: value lines)."""
        if self.mode == "json":
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
            return
        text = human if human is not None else "\n".join(f"{k}: {v}" for k, v in data.items())
        self.out.print(text, markup=False)

    @contextmanager
    def progress(self, transient: bool = False) -> Iterator[Progress]:
        """A rich Progress on stderr (disabled off a terminal, in json and quiet modes)."""
        columns = (
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        with Progress(*columns, console=self.err, disable=not self.show_progress, transient=transient) as bar:
            yield bar

"""One output sink for every command: results to stdout, progress and messages to stderr.

Modes: "human" (rich text), "json" (one JSON document on stdout, nothing else there) and
"quiet" (results only, no progress). Progress bars show only on a terminal.

Messages are text, never Rich markup: they carry paths, names and file contents that the user
chose (a folder called `[old]` must print as `[old]`), so only our own prefixes are styled, and
control characters are shown escaped (a name read from a file cannot move the cursor or hide text).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

# C0/C1 control characters and DEL, except newline and tab (multi-line notes keep their layout).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object, one_line: bool = False) -> str:
    """`text` with control characters escaped as `\\xNN` (and newlines too when `one_line`)."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))
    if one_line:
        text = text.replace("\n", "\\n").replace("\t", " ")
    return text


def _styled(prefix: str, style: str, message: object, one_line: bool = False) -> Text:
    return Text.assemble((prefix, style), " ", printable(message, one_line))


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
            self.err.print(Text(printable(message)))

    def warn(self, message: str) -> None:
        """A warning (stderr), shown in every mode but json."""
        if self.mode != "json":
            self.err.print(_styled("warning:", "yellow", message))

    def error(self, message: str) -> None:
        """One line on stderr, whatever the message holds."""
        self.err.print(_styled("error:", "red", message, one_line=True))

    def result(self, data: dict[str, Any], human: str | None = None) -> None:
        """The command's result: JSON in json mode, else `human` (or key: value lines)."""
        if self.mode == "json":
            sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
            sys.stdout.flush()
            return
        text = human if human is not None else "\n".join(f"{k}: {v}" for k, v in data.items())
        self.out.print(Text(printable(text)))

    @contextmanager
    def progress(self, transient: bool = False) -> Iterator[Progress]:
        """A rich Progress on stderr (disabled off a terminal, in json and quiet modes)."""
        columns = (
            TextColumn("{task.description}", style="progress.description", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}", markup=False),
        )
        with Progress(*columns, console=self.err, disable=not self.show_progress, transient=transient) as bar:
            yield bar

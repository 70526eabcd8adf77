"""Progress bars and logs on stderr (stdout is for data), shared by every command."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True, highlight=False)


def progress_enabled(requested: bool | None = None) -> bool:
    if requested is not None:
        return requested
    return not os.environ.get("CSGGUARD_NO_PROGRESS") and sys.stderr.isatty()


def make_progress(enabled: bool | None = None) -> Progress:
    """A rich Progress on stderr; disabled (it draws nothing) in CI, pipes and tests."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=stderr_console, transient=False, disable=not progress_enabled(enabled))


def log(message: str) -> None:
    stderr_console.print(message)

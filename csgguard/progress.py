"""Progress bars and logs on stderr (stdout is for data), shared by every command."""

from __future__ import annotations

import contextlib
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


def make_progress(enabled: bool | None = None) -> Progress | contextlib.nullcontext:
    """A rich Progress on stderr, or a do-nothing stand-in when disabled (CI, pipes, tests)."""
    if not progress_enabled(enabled):
        return _NullProgress()
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                    console=stderr_console, transient=False)


class _NullProgress:
    """Same surface as rich.progress.Progress, does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        return 0

    def update(self, task_id: int, **kwargs) -> None:
        pass

    def advance(self, task_id: int, advance: float = 1) -> None:
        pass

    def remove_task(self, task_id: int) -> None:
        pass


def log(message: str) -> None:
    stderr_console.print(message)

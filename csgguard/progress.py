"""Progress and logs on stderr (stdout is for data), shared by every command.

* stderr is a terminal: a rich progress bar.
* stderr is a pipe or a file (CI, ``2> log``, ``nohup``): a plain-text line every
  ``CSGGUARD_PROGRESS_INTERVAL`` seconds (default 30) and one when a task ends, e.g.
  ``attack: 512/10000 (5.1%), 41 s elapsed, ~760 s left, flagged 3`` -- so a long job
  is never silent, and a log file holds no terminal control codes. A task shorter
  than the interval prints nothing.
* ``--no-progress`` or ``CSGGUARD_NO_PROGRESS=1``: nothing.

Log messages are plain text: rich markup and control bytes in them (a file name such
as ``[red]x`` or one holding an ESC byte) are shown escaped, never interpreted.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .safetext import rich_safe

stderr_console = Console(stderr=True, highlight=False)
DEFAULT_INTERVAL = 30.0
# markup a message may start with (train.py's warnings); everything after it is escaped
_STYLED_PREFIXES = {"[yellow]warning:[/] ": "[yellow]warning:[/] ", "warning: ": "[yellow]warning:[/] "}


def progress_enabled(requested: bool | None = None) -> bool:
    """Whether a rich bar is shown (a terminal, or asked for with --progress)."""
    if requested is not None:
        return requested
    return not os.environ.get("CSGGUARD_NO_PROGRESS") and sys.stderr.isatty()


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get("CSGGUARD_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def make_progress(enabled: bool | None = None) -> Progress | PlainProgress:
    """A rich Progress on a terminal, plain periodic lines on a pipe, or a disabled rich Progress.

    ``enabled``: True forces the rich bar, False silences it (``Progress(disable=True)``: the
    same object, drawing nothing), None decides from stderr.
    """
    silent = enabled is False or (enabled is None and os.environ.get("CSGGUARD_NO_PROGRESS"))
    if silent or progress_enabled(enabled):
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=stderr_console, transient=False, disable=bool(silent))
    return PlainProgress(_interval())


class PlainProgress:
    """Progress as plain text lines on stderr, at most one per ``interval`` seconds per task.

    The part of rich.progress.Progress's surface the commands use.
    """

    def __init__(self, interval: float = DEFAULT_INTERVAL, stream=None) -> None:
        self.interval = interval
        self.stream = stream
        self.tasks: dict[int, dict] = {}

    def add_task(self, description: str, total: float | None = None, **fields) -> int:
        tid = len(self.tasks)
        now = time.monotonic()
        self.tasks[tid] = {"description": description, "total": total, "completed": 0.0,
                           "info": fields.get("info", ""), "start": now, "last": now, "done": False}
        return tid

    def update(self, task_id: int, **kwargs) -> None:
        t = self.tasks.get(task_id)
        if t is None:
            return
        if "total" in kwargs:
            t["total"] = kwargs["total"]
        if "completed" in kwargs:
            t["completed"] = float(kwargs["completed"])
        if "advance" in kwargs:
            t["completed"] += float(kwargs["advance"])
        if "info" in kwargs:
            t["info"] = kwargs["info"]
        if "description" in kwargs:
            t["description"] = kwargs["description"]
        self._maybe_print(t)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def remove_task(self, task_id: int) -> None:
        t = self.tasks.pop(task_id, None)
        if t is not None and not t["done"] and t["completed"] and time.monotonic() - t["start"] >= self.interval:
            self._print(t)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for t in self.tasks.values():
            if not t["done"] and t["completed"] and time.monotonic() - t["start"] >= self.interval:
                self._print(t)
        return False

    def _maybe_print(self, t: dict) -> None:
        now = time.monotonic()
        finished = t["total"] is not None and t["completed"] >= t["total"]
        if finished and not t["done"]:
            if now - t["start"] >= self.interval:  # a quick task ends quietly
                self._print(t)
            t["done"] = True
        elif not finished and now - t["last"] >= self.interval:
            self._print(t)

    def line(self, t: dict) -> str:
        elapsed = time.monotonic() - t["start"]
        done, total = t["completed"], t["total"]
        parts = [f"{t['description']}: {done:.0f}" + (f"/{total:.0f} ({100.0 * done / total:.1f}%)" if total else "")]
        parts.append(f"{elapsed:.0f} s elapsed")
        if total and 0 < done < total:
            parts.append(f"~{elapsed * (total - done) / done:.0f} s left")
        if t["info"]:
            parts.append(str(t["info"]))
        return ", ".join(parts)

    def _print(self, t: dict) -> None:
        t["last"] = time.monotonic()
        from .safetext import visible

        stream = self.stream or sys.stderr
        stream.write(visible(self.line(t)) + "\n")
        stream.flush()


def log(message: str) -> None:
    """One line on stderr; ``message`` is plain text (markup and control bytes are escaped)."""
    text = str(message)
    for prefix, styled in _STYLED_PREFIXES.items():
        if text.startswith(prefix):
            stderr_console.print(styled + rich_safe(text[len(prefix):]), soft_wrap=True)
            return
    stderr_console.print(rich_safe(text), soft_wrap=True)

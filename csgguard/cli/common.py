"""Shared CLI pieces: the error-handling group, common options, and data output formats.

Exit codes (documented in ``csgguard --help``):
  0  success (for ``screen``: it ran, whether or not anything was flagged)
  1  ``screen --fail-on-flag`` flagged at least one image, or could not screen one (fails closed)
  2  usage error or bad input (unknown name, missing/tampered file, bad value)
  3  internal error (a bug: rerun with CSGGUARD_DEBUG=1 for the traceback)
  130 interrupted (Ctrl-C); no half-written output is left behind
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..errors import CsgguardError
from ..safetext import csv_cell, rich_safe, visible_all
from ..sweep import parse_budget_list, parse_fraction  # noqa: F401 (re-exported for the commands)

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

stdout_console = Console(highlight=False, soft_wrap=False)
err_console = Console(stderr=True, highlight=False)
PIPE_WIDTH = 1_000_000  # tables on a pipe or in a file: as wide as their content, never wrapped


def table_console() -> Console:
    """The console tables print to: the terminal's width on a terminal, unwrapped when piped."""
    if stdout_console.is_terminal:
        return stdout_console
    return Console(highlight=False, soft_wrap=False, width=PIPE_WIDTH)


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """One line on stderr. ``message`` is plain text: markup and control bytes in it are escaped."""
    err_console.print(f"[bold red]error:[/] {rich_safe(message)}", soft_wrap=True, markup=True, highlight=False)
    sys.exit(code)


class CsgguardGroup(click.Group):
    """A click group that turns errors into one line on stderr and a documented exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        order = ("train", "inspect", "attack", "fit", "screen", "evaluate")  # the workflow, not a-z
        return sorted(self.commands, key=lambda n: (order.index(n) if n in order else len(order), n))

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(os.environ.get("CSGGUARD_DEBUG"))
        try:
            return super().invoke(ctx)
        except CsgguardError as exc:
            if debug:
                raise
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except click.UsageError as exc:  # a bad option value: one line too, naming the command
            if debug:
                raise
            name = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            fail(f"{name}: {exc.format_message()} (see {name} --help)", EXIT_USAGE)
        except click.ClickException as exc:
            if debug:
                raise
            fail(exc.format_message(), exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except MemoryError:
            fail("out of memory (try a smaller --batch-size or --limit)", EXIT_INTERNAL)
        except Exception as exc:  # a bug: one line, and the way to see more
            if debug:
                raise
            fail(f"internal error: {exc.__class__.__name__}: {exc} (rerun with CSGGUARD_DEBUG=1 for a traceback)",
                 EXIT_INTERNAL)


def _resolve_run(ctx, param, value):
    from ..shipped import resolve_run  # torch-free

    return None if value is None else str(resolve_run(value))


def run_option(f):
    return click.option("--run", "run_dir", type=click.Path(file_okay=False), default="runs/default",
                        show_default=True, callback=_resolve_run,
                        help="Run directory holding model.json / model.safetensors, or the name of a shipped "
                             "run: cifar10-resnet20-csg, cifar10-resnet20-std (pretrained/NAME also works).")(f)


def device_option(f):
    return click.option("--device", default="auto", show_default=True,
                        help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps. Asking for an absent "
                             "accelerator is an error, never a silent CPU fall-back.")(f)


def format_option(choices: Sequence[str] = ("table", "json", "csv")):
    def deco(f):
        return click.option("--format", "fmt", type=click.Choice(list(choices)), default="table",
                            show_default=True, help="Output format on stdout (progress and logs go to stderr).")(f)
    return deco


def progress_option(f):
    return click.option("--progress/--no-progress", default=None,
                        help="Progress bars on stderr (default: only when stderr is a terminal).")(f)


def compile_option(what: str, measured: str):
    """``--compile/--no-compile`` (parameter ``torch_compile``): ``what`` runs through torch.compile."""
    return click.option("--compile/--no-compile", "torch_compile", default=False, show_default=True,
                        help=f"Run {what} through torch.compile at fixed shapes (needs a C++ compiler on CPU): "
                             f"about a minute of compiling per shape first, faster steps after ({measured}). "
                             "For long jobs; it changes how the arithmetic runs, not what it computes.")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def emit_rows(rows: Iterable[dict[str, Any]], columns: Sequence[str], fmt: str, title: str | None = None) -> None:
    """Print rows as a rich table, JSON array, JSON lines or CSV on stdout."""
    rows = list(rows)
    if fmt == "json":
        click.echo(json_text(rows, indent=2))
    elif fmt == "jsonl":
        for r in rows:
            click.echo(json_text(r))
    elif fmt == "csv":
        click.echo(csv_header(columns) + "".join(csv_row(r, columns) for r in rows), nl=False)
    else:
        table = Table(title=None if title is None else rich_safe(title), show_lines=False)
        for c in columns:
            table.add_column(rich_safe(c), overflow="fold")
        for r in rows:
            table.add_row(*(rich_safe(_fmt(r.get(c))) for c in columns))
        table_console().print(table)


def json_text(obj: Any, indent: int | None = None) -> str:
    """JSON for stdout: every string made visible (:func:`csgguard.safetext.visible`), ASCII only."""
    from ..artifacts import to_jsonable

    return json.dumps(visible_all(to_jsonable(obj)), indent=indent)


def csv_header(columns: Sequence[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([csv_cell(c) for c in columns])
    return buf.getvalue()


def csv_row(row: dict[str, Any], columns: Sequence[str]) -> str:
    """One CSV line: text made visible and formula-neutralised (:func:`csgguard.safetext.csv_cell`)."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([csv_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def emit_mapping(data: dict[str, Any], fmt: str, title: str | None = None) -> None:
    """Print one record (key/value) as a table, JSON or CSV."""
    if fmt == "json":
        click.echo(json_text(data, indent=2))
        return
    flat = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    if fmt == "csv":
        emit_rows([flat], list(flat), "csv")
        return
    table = Table(title=None if title is None else rich_safe(title), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for k, v in flat.items():
        table.add_row(rich_safe(k), rich_safe(_fmt(v)))
    table_console().print(table)


class FiniteFloat(click.ParamType):
    """A float option that refuses NaN and infinities (click.FloatRange lets NaN through) and checks a range."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False) -> None:
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def _range(self) -> str:
        lo = "" if self.low is None else f"{self.low:g} {'<' if self.low_open else '<='} "
        hi = "" if self.high is None else f" {'<' if self.high_open else '<='} {self.high:g}"
        return f"{lo}x{hi}"

    def convert(self, value, param, ctx):
        if isinstance(value, float) and math.isfinite(value):
            v = value
        else:
            try:
                v = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
            if not math.isfinite(v):
                self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)) or \
                self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            self.fail(f"{v:g} is not in the range {self._range()}", param, ctx)
        return v


POSITIVE_INT = click.IntRange(min=1)
NON_NEGATIVE_INT = click.IntRange(min=0)

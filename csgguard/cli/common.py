"""Shared CLI pieces: the error-handling group, common options, and data output formats.

Exit codes (documented in ``csgguard --help``):
  0  success (for ``screen``: it ran, whether or not anything was flagged)
  1  ``screen --fail-on-flag`` flagged at least one image
  2  usage error or bad input (unknown name, missing/tampered file, bad value)
  3  internal error (a bug: rerun with CSGGUARD_DEBUG=1 for the traceback)
  130 interrupted (Ctrl-C); no half-written output is left behind
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ..errors import CsgguardError

EXIT_OK, EXIT_FLAGGED, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

stdout_console = Console(highlight=False, soft_wrap=False)
err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = EXIT_USAGE) -> None:
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True, markup=True, highlight=False)
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
            fail(str(exc).replace("\n", " "), exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except MemoryError:
            fail("out of memory (try a smaller --batch-size or --limit)", EXIT_INTERNAL)
        except Exception as exc:  # a bug: one line, and the way to see more
            if debug:
                raise
            fail(f"internal error: {exc.__class__.__name__}: {exc} (rerun with CSGGUARD_DEBUG=1 for a traceback)",
                 EXIT_INTERNAL)


def run_option(f):
    return click.option("--run", "run_dir", type=click.Path(file_okay=False), default="runs/default",
                        show_default=True, help="Run directory holding model.json / model.safetensors.")(f)


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


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def emit_rows(rows: Iterable[dict[str, Any]], columns: Sequence[str], fmt: str, title: str | None = None) -> None:
    """Print rows as a rich table, JSON array, JSON lines or CSV on stdout."""
    from ..artifacts import to_jsonable

    rows = list(rows)
    if fmt == "json":
        click.echo(json.dumps(to_jsonable(rows), indent=2))
    elif fmt == "jsonl":
        for r in rows:
            click.echo(json.dumps(to_jsonable(r)))
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
        click.echo(buf.getvalue(), nl=False)
    else:
        table = Table(title=title, show_lines=False)
        for c in columns:
            table.add_column(c, overflow="fold")
        for r in rows:
            table.add_row(*(_fmt(r.get(c)) for c in columns))
        stdout_console.print(table)


def emit_mapping(data: dict[str, Any], fmt: str, title: str | None = None) -> None:
    """Print one record (key/value) as a table, JSON or CSV."""
    from ..artifacts import to_jsonable

    if fmt == "json":
        click.echo(json.dumps(to_jsonable(data), indent=2))
        return
    flat = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    if fmt == "csv":
        emit_rows([flat], list(flat), "csv")
        return
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for k, v in flat.items():
        table.add_row(k, _fmt(v))
    stdout_console.print(table)


def parse_fraction(value: str, name: str = "value") -> float:
    """'8/255' -> 0.03137..., '0.1' -> 0.1; a clear error otherwise."""
    text = str(value).strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise CsgguardError(f"{name} {value!r} is not a number or fraction like 8/255") from None

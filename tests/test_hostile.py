"""Issue 11: hostile names, hostile manifests, hostile folders (tests/hostile.py) and the user's path.

Each test names the issue item it pins down; each was seen failing with its fix undone.
"""

from __future__ import annotations

import csv
import io
import json
import os

import pytest
from click.testing import CliRunner
from hostile import FORMULA

from csgguard.cli import main


def _cli(*args, **kw):
    return CliRunner().invoke(main, [a if isinstance(a, str) else os.fsdecode(os.fspath(a)) for a in args], **kw)


def one_line_error(result, code: int = 2) -> str:
    """The contract for bad input: exit 2, one line on stderr starting 'error:', no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


def _screen(tree, run, *extra):
    return _cli("screen", tree.root, "--run", run, "--no-progress", "--batch-size", "4", *extra)


def _paths(result, fmt: str) -> list[str]:
    if fmt == "jsonl":
        return [json.loads(line)["path"] for line in result.stdout.splitlines()]
    if fmt == "json":
        return [r["path"] for r in json.loads(result.stdout)]
    return [r["path"] for r in csv.DictReader(io.StringIO(result.stdout))]


# ----------------------------------------------------------------------------- items 1-3: output

def test_item1_markup_in_names_is_shown_not_interpreted(fitted_run, hostile_tree):
    r = _screen(hostile_tree, fitted_run)  # the default table
    assert r.exit_code == 0, r.output      # `[/x].png` used to crash with exit 1
    out = r.stdout
    assert "[b]a.png" in out and "[/x].png" in out
    bad = _cli("inspect", "--run", "runs/[red]x")
    assert "runs/[red]x: run directory not found" in one_line_error(bad)


def test_item1_2_every_format_prints_every_name_exactly_and_distinctly(fitted_run, hostile_tree):
    n = len(hostile_tree.readable) + len(hostile_tree.errors)
    for fmt in ("csv", "jsonl", "json"):
        r = _screen(hostile_tree, fitted_run, "--format", fmt)
        assert r.exit_code == 0, r.output
        assert "\x1b" not in r.stdout and "\x1b" not in r.stderr
        paths = _paths(r, fmt)
        assert len(paths) == len(set(paths)) == n, (fmt, paths)
        names = {p.rsplit("/", 1)[1].lstrip("'") for p in paths}
        assert {"a\\x1b[0m.png", "new\\nline.png", "tab\\tname.png", "x\\xff.png", "x\\\\xff.png"} <= names, names
    table = _screen(hostile_tree, fitted_run).stdout
    assert "\x1b" not in table and "a\\x1b[0m.png" in table and "x\\\\xff.png" in table


def test_item2_visible_is_injective_and_leaves_plain_names_alone():
    from csgguard.safetext import visible

    names = [b"x\xff.png", b"x\\xff.png", b"a\x1b[0m.png", b"a.png", b"a\n.png", b"a\\n.png", "\u202egnp.exe"]
    shown = [visible(os.fsdecode(n) if isinstance(n, bytes) else n) for n in names]
    assert len(set(shown)) == len(names)
    assert all(s.isprintable() for s in shown)
    assert visible("plain/caf\u00e9 [1].png") == "plain/caf\u00e9 [1].png"


def test_item3_csv_neutralises_formulas(fitted_run, hostile_tree, monkeypatch):
    from csgguard.safetext import csv_cell

    monkeypatch.chdir(hostile_tree.root)
    names = [os.fsdecode(n) for n in FORMULA]
    r = _cli("screen", "--run", fitted_run, "--format", "csv", "--no-progress", "--", *names)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert sorted(row["path"] for row in rows) == sorted("'" + n for n in names)
    assert all(float(row["score"]) == float(row["score"]) for row in rows)  # numbers stay numbers
    assert csv_cell(-1.5) == -1.5 and csv_cell("-1") == "'-1" and csv_cell("a=b") == "a=b"
    assert csv_cell("\t=x") == "\\t=x"  # a leading tab is escaped, so it cannot start a formula either


# ----------------------------------------------------------------------------- items 8, 9, 14: folders

def _rows(result) -> dict[str, dict]:
    return {json.loads(line)["path"].rsplit("/", 1)[1]: json.loads(line) for line in result.stdout.splitlines()}


def test_item8_9_loops_links_and_unreadable_folders_get_error_rows(fitted_run, hostile_tree, monkeypatch):
    r = _screen(hostile_tree, fitted_run, "--format", "jsonl")
    assert r.exit_code == 0, r.output  # a symlink loop used to abort the listing
    rows = _rows(r)
    for name, needle in hostile_tree.errors.items():
        row = rows[os.fsdecode(name)]
        assert needle in row["error"] and row["score"] is None, row
    assert rows["inside-link.png"]["error"] is None  # a link inside the folder is followed
    assert "2 sub-folder(s)" in r.stderr and "-r" in r.stderr
    hostile_tree.deny_locked(monkeypatch)
    rec = _screen(hostile_tree, fitted_run, "--format", "jsonl", "-r")
    assert rec.exit_code == 0, rec.output
    rows = _rows(rec)
    assert "permission denied" in rows["locked"]["error"]       # was skipped silently
    assert rows["img.png"]["error"] is None                     # sub/img.png
    follow = _rows(_screen(hostile_tree, fitted_run, "--format", "jsonl", "--follow-symlinks"))
    assert follow["outside.png"]["error"] is None and isinstance(follow["outside.png"]["score"], float)
    assert "leads outside" not in (follow["passwd.png"]["error"] or "x")  # read, and refused as no image


def test_item14_only_subfolders_without_r_says_so(fitted_run, hostile_tree):
    line = one_line_error(_cli("screen", hostile_tree.root.parent, "--run", fitted_run))
    assert "sub-folder" in line and "-r" in line

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


# ----------------------------------------------------------------------------- items 4-6: manifests

@pytest.fixture
def run_copy(digits_csg_run, tmp_path):
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(digits_csg_run, dst)
    return dst


def _edit(path, fn, raw: str | None = None):
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(raw if raw is not None else json.dumps(m))


def test_item4_huge_sizes_are_refused_before_anything_is_built(run_copy, monkeypatch):
    import time

    from csgguard.models import csg

    built = []
    real_init = csg.CSGNet.__init__

    def spy(self, config):
        import torch

        built.append(torch.empty(0).device.type)  # "meta" while shapes are checked, "cpu" for a real build
        real_init(self, config)
    monkeypatch.setattr(csg.CSGNet, "__init__", spy)
    for n in (10_000_000, 1_000_000_000, 5_000):
        _edit(run_copy / "model.json", lambda m, n=n: m["model"].update(num_classes=n))
        start = time.perf_counter()
        line = one_line_error(_cli("inspect", "--run", run_copy))
        assert time.perf_counter() - start < 5 and "model.json" in line
    assert "cpu" not in built  # nothing was built for real: the sizes were checked first


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["model"].update(num_classes=-3), "num_classes"),
    (lambda m: m.update(classes=[]), "classes"),
    (lambda m: m.update(classes=None), "classes"),
    (lambda m: m.pop("input"), "input"),
    (lambda m: m["model"].update(in_channels=0), "in_channels"),
    (lambda m: m["model"].update(input_size=-8), "input_size"),
    (lambda m: m["model"].update(std=[0]), "std"),
    (lambda m: m["model"].update(width=-4), "width"),
    (lambda m: m["model"].update(gate="yes"), "gate"),
    (lambda m: m["model"].update(arch=None), "architecture"),
    (lambda m: m["weights"].update(file="../model.safetensors"), "plain file name"),
    (lambda m: m["input"].update(height=99), "input section"),
    (lambda m: m.update(classes=[str(i) for i in range(9)] + ["0"]), "distinct"),
    (lambda m: m.update(classes=[f"c{i}" for i in range(10)]), "differ from the copy"),  # valid, but edited
])
def test_item5_6_malformed_model_json_is_one_line_exit_2(run_copy, edit, needle):
    _edit(run_copy / "model.json", edit)
    assert needle in one_line_error(_cli("inspect", "--run", run_copy))


def test_item5_non_finite_json_numbers_are_refused(run_copy):
    text = (run_copy / "model.json").read_text()
    m = json.loads(text)
    for bad in ("NaN", "Infinity", "1e400"):
        m["model"]["std"] = ["__X__"]
        (run_copy / "model.json").write_text(json.dumps(m).replace('"__X__"', bad))
        assert "finite" in one_line_error(_cli("inspect", "--run", run_copy))


@pytest.mark.parametrize("threshold", ["NaN", "1e308", "-Infinity"])
def test_item5_detector_threshold_must_be_finite_and_covered_by_the_hash(fitted_run, tmp_path, threshold):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    m = json.loads((run / "detector.json").read_text())
    m["threshold"] = "__T__"
    m["fitted"]["threshold_"] = "__T__"
    (run / "detector.json").write_text(json.dumps(m).replace('"__T__"', threshold))
    line = one_line_error(_cli("screen", run, "--run", run))
    assert "detector.json" in line


def test_item5_detector_fields_are_covered_by_the_hash(fitted_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    _edit(run / "detector.json", lambda m: (m.update(threshold=99.0), m["fitted"].update(threshold_=99.0)))
    assert "differ from the copy" in one_line_error(_cli("screen", run, "--run", run))


@pytest.mark.parametrize("value", ["nan", "inf", "1e308"])
def test_item5_screen_threshold_must_be_finite(fitted_run, value):
    line = one_line_error(_cli("screen", fitted_run, "--run", fitted_run, "--threshold", value))
    assert "--threshold" in line

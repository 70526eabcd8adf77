"""Issue 11: hostile names, hostile manifests, hostile folders (tests/hostile.py) and the user's path.

Each test names the issue item it pins down; each was seen failing with its fix undone.
"""

from __future__ import annotations

import csv
import importlib
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


def _forge(run, edit):
    """An attacker who controls both files: edit model.json, rewrite the weights' header copy and the hash."""
    from safetensors.torch import load_file

    from csgguard.artifacts import canonical_json, save_tensors
    from csgguard.models.store import COVERED

    m = json.loads((run / "model.json").read_text())
    edit(m)
    tensors = load_file(str(run / "model.safetensors"))
    m["weights"]["sha256"] = save_tensors(run / "model.safetensors", tensors, metadata={
        "format": "csgguard.model", "manifest": canonical_json({k: m[k] for k in COVERED})})
    (run / "model.json").write_text(json.dumps(m))


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
    for n in (10_000_000, 1_000_000_000, 50_000):
        _forge(run_copy, lambda m, n=n: (m["model"].update(num_classes=n), m.update(classes=[str(i) for i in range(n)])
                                        if n <= 50_000 else None))
        start = time.perf_counter()
        line = one_line_error(_cli("inspect", "--run", run_copy))
        assert time.perf_counter() - start < 5 and ("num_classes" in line or "model.json implies" in line), line
    assert "cpu" not in built  # nothing was built for real: the sizes were checked against the weights first


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["model"].update(num_classes=-3), "num_classes"),
    (lambda m: m["model"].update(num_classes=10**7), "num_classes must be an integer in [2, 100000]"),
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
    (lambda m: m.update(format_version=99), "newer csgguard"),
    (lambda m: m.update(format_version="x"), "format_version must be a positive integer"),
])
def test_item5_6_malformed_model_json_is_one_line_exit_2(run_copy, edit, needle):
    _edit(run_copy / "model.json", edit)
    assert needle in one_line_error(_cli("inspect", "--run", run_copy))


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["dataset"].update(val_fraction="abc"), "val_fraction 'abc' must be a number in (0, 1)"),
    (lambda m: m["dataset"].update(val_fraction=5), "val_fraction 5 must be a number in (0, 1)"),
    (lambda m: m["dataset"].update(split_seed="x"), "split_seed 'x' must be an integer"),
    (lambda m: m["dataset"].update(split_seed=-1), "split_seed -1 must be an integer"),
    (lambda m: m.update(dataset=[1]), "'dataset' must be a JSON object"),
    (lambda m: m["dataset"].update(sizes={"train": "x"}), "dataset sizes"),
    (lambda m: m["dataset"].update(spec=7), "dataset spec 7"),
    (lambda m: m.update(training="x"), "'training' must be a JSON object"),
])
def test_model_json_data_sections_outside_the_hash_are_checked(run_copy, edit, needle):
    """model.json's dataset / training sections are not covered by the weights' hash: a hand-edited
    value is one line naming model.json and the field (exit 2), never an internal error."""
    _edit(run_copy / "model.json", edit)
    line = one_line_error(_cli("inspect", "--run", run_copy))
    assert needle in line and "model.json" in line, line


@pytest.mark.parametrize("field,value", [("epochs", "x"), ("lr", "x"), ("gate", "yes"), ("teachers", [1]),
                                         ("milestones", "0.5")])
def test_saved_training_settings_of_the_wrong_type_are_one_line(run_copy, tmp_path, field, value):
    """--extend reads the recipe from model.json's training section: a value of the wrong type is refused by
    name before any training, not met as a TypeError once training has started."""
    _edit(run_copy / "model.json", lambda m: m["training"].update({field: value}))
    line = one_line_error(_cli("train", "--extend", run_copy, "--swa-epochs", "1", "--out", tmp_path / "x"))
    assert f"training setting {field}=" in line and "model.json" in line, line
    assert not (tmp_path / "x").exists()


def test_item5_non_finite_json_numbers_are_refused(run_copy, tmp_path):
    from csgguard.artifacts import read_json
    from csgguard.errors import ArtifactError

    for bad in ("NaN", "-Infinity", "1e400"):  # every JSON file csgguard reads, whatever field
        (tmp_path / "x.json").write_text('{"anything": [1, ' + bad + ']}')
        with pytest.raises(ArtifactError, match="finite"):
            read_json(tmp_path / "x.json")
    text = (run_copy / "model.json").read_text()
    m = json.loads(text)
    for bad in ("NaN", "Infinity", "1e400"):
        m["model"]["std"] = ["__X__"]
        (run_copy / "model.json").write_text(json.dumps(m).replace('"__X__"', bad))
        assert "finite" in one_line_error(_cli("inspect", "--run", run_copy))


@pytest.mark.parametrize("version,needle", [(99, "newer csgguard"), (0, "format_version must be")])
def test_item5_detector_of_an_unknown_format_version_is_refused(fitted_run, tmp_path, version, needle):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    m = json.loads((run / "detector.json").read_text())
    m["format_version"] = version
    (run / "detector.json").write_text(json.dumps(m))
    line = one_line_error(_cli("screen", run, "--run", run))
    assert "detector.json" in line and needle in line


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
    from csgguard.errors import CsgguardError
    from csgguard.screening import screen

    line = one_line_error(_cli("screen", fitted_run, "--run", fitted_run, "--threshold", value))
    assert "--threshold" in line
    with pytest.raises(CsgguardError, match="finite"):  # the Python API too
        screen([fitted_run], fitted_run, threshold=float(value))


@pytest.mark.parametrize("args,needle", [
    (["fit", "--param", "foo=1"], "foo"),
    (["fit", "--param", "combine=sum", "--param", "combine=max"], "given twice"),
    (["fit", "--detector", "csg-supervised", "--param", "C=NaN"], "finite"),
    (["fit", "--batch-size", "0"], "--batch-size"),
    (["fit", "--fpr", "nan"], "--fpr"),
    (["attack", "--batch-size", "0"], "--batch-size"),
    (["attack", "--steps", "-1"], "--steps"),
    (["screen", ".", "--batch-size", "0"], "--batch-size"),
    (["screen", ".", "--workers", "-1"], "--workers"),
    (["screen", ".", "--workers", "1000"], "--workers"),
    (["train", "--lr", "nan"], "--lr"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--width", "-4"], "--width"),
    (["train", "--width", "100000"], "--width"),  # over what a model.json may hold: refused before training
    (["train", "--batch-size", "0"], "--batch-size"),
    (["train", "--density", "nan"], "--density"),
    (["evaluate", "--fpr", "nan"], "--fpr"),
])
def test_item6_bad_option_values_are_one_line_exit_2_before_any_work(args, needle, monkeypatch):
    import csgguard.models.store as store

    def no_work(*a, **k):
        raise AssertionError("work started before the options were checked")
    monkeypatch.setattr(store, "load_model", no_work)
    monkeypatch.setattr(importlib.import_module("csgguard.train"), "load_dataset", no_work)
    assert needle in one_line_error(_cli(*args))


def test_item6_output_under_a_file_is_refused_before_any_work(digits_csg_run, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")

    def no_work(*a, **k):
        raise AssertionError("work started before the output path was checked")
    monkeypatch.setattr(importlib.import_module("csgguard.train"), "load_dataset", no_work)
    monkeypatch.setattr(importlib.import_module("csgguard.fitting"), "load_model", no_work)
    for args in (["train", "--out", blocker / "run"],
                 ["fit", "--run", digits_csg_run, "--out", blocker / "d.json"],
                 ["attack", "--run", digits_csg_run, "--out", blocker / "a.npz"],
                 ["attack", "--run", digits_csg_run, "--out", tmp_path / "a.npz", "--save-images", blocker / "png"],
                 ["inspect", "--run", digits_csg_run, "--heatmap", blocker / "h.png"]):
        line = one_line_error(_cli(*args))
        assert "is a file" in line and str(blocker) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing half-written


# ----------------------------------------------------------------------------- item 7: data quietly wrong

def _cifar_py(root, labels=None, data=None):
    import pickle

    import numpy as np

    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
        if name == "data_batch_2":
            if labels is not None:
                batch["labels"] = labels
            if data is not None:
                batch["data"] = data
        (d / name).write_bytes(pickle.dumps(batch))  # test data; csgguard reads it with a restricted unpickler


def _cifar_cases():
    import numpy as np

    return [
        dict(labels=[0, 1, 2]),                                    # 3 labels for 10 images
        dict(labels=list(range(5, 15))),                           # labels out of 0..9
        dict(labels=[[0]] * 10),                                   # labels not a flat list
        dict(data=np.zeros((10, 100), dtype=np.uint8)),            # wrong image size
        dict(data=np.zeros((10, 3072), dtype=np.float64)),         # wrong dtype
        dict(data=np.zeros((0, 3072), dtype=np.uint8), labels=[]),  # empty batch
    ]


@pytest.mark.parametrize("case", range(6))
def test_item7_malformed_cifar_batches_are_refused(tmp_path, case):
    from csgguard.data import load_cifar10_dataset
    from csgguard.errors import DataError

    _cifar_py(tmp_path, **_cifar_cases()[case])
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10_dataset(tmp_path)
    line = one_line_error(_cli("train", "--data", "cifar10", "--data-root", tmp_path, "--out", tmp_path / "run"))
    assert "data_batch_2" in line


def _png_tree(root, classes, n=6):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        folder = os.path.join(os.fsencode(root), os.fsencode(c))
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(
                os.fsdecode(os.path.join(folder, f"{i}.png".encode())))


@pytest.mark.parametrize("classes,needle", [
    (["only"], "only 1 class"),
    (["a\nb", "c"], "control characters"),
    (["a\x1b[31m", "c"], "control characters"),
    ([b"caf\xe9", "c"], "not UTF-8"),
])
def test_item7_one_class_and_unprintable_class_names_are_refused(tmp_path, classes, needle):
    _png_tree(tmp_path / "imgs", classes)
    line = one_line_error(_cli("train", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--out", tmp_path / "run"))
    assert needle in line and "\x1b" not in line
    assert not (tmp_path / "run" / "model.json").exists()


# ----------------------------------------------------------------------------- item 9: links in training data

@pytest.mark.parametrize("how", ["class-folder", "file", "loop"])
def test_item9_training_data_never_leaves_its_folder(tmp_path, how):
    _png_tree(tmp_path / "imgs", ["a", "b"])
    _png_tree(tmp_path / "foreign", ["x"], n=3)
    if how == "class-folder":
        os.symlink(tmp_path / "foreign" / "x", tmp_path / "imgs" / "c")
    elif how == "file":
        os.symlink(tmp_path / "foreign" / "x" / "0.png", tmp_path / "imgs" / "a" / "z.png")
    else:
        os.symlink("loop.png", tmp_path / "imgs" / "a" / "loop.png")
    line = one_line_error(_cli("train", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--out", tmp_path / "run"))
    assert ("symlink loop" if how == "loop" else "leads outside") in line


# ----------------------------------------------------------------------------- items 10-11: runs

def test_item11_a_second_writer_of_a_run_folder_is_refused(digits_csg_run, tmp_path):
    from csgguard.artifacts import LOCK_FILE, folder_lock

    run = tmp_path / "run"
    run.mkdir()
    with folder_lock(run, "train"):  # another process training into run/ (flock: per open file, so it works here)
        line = one_line_error(_cli("train", "--out", run, "--epochs", "1"))
        assert "in use by another csgguard process" in line and f"pid {os.getpid()}" in line
        assert "in use" in one_line_error(_cli("fit", "--run", digits_csg_run, "--out", run / "d.json"))
        assert "in use" in one_line_error(_cli("attack", "--run", digits_csg_run, "--out", run / "a.npz"))
    assert not (run / LOCK_FILE).exists()
    (run / LOCK_FILE).write_text("pid 999999999, csgguard train, since long ago")  # left by a killed process
    with folder_lock(run, "train"):                                                # is taken over
        assert str(os.getpid()) in (run / LOCK_FILE).read_text()


def test_item11_two_processes(tmp_path):
    """A real second process is refused while the first holds the lock."""
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom csgguard.artifacts import folder_lock\n"
        f"with folder_lock({str(run)!r}, 'train'):\n    print('held', flush=True)\n    time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        line = one_line_error(_cli("train", "--out", run, "--epochs", "1"))
        assert f"pid {holder.pid}" in line and time.perf_counter() - start < 10
    finally:
        holder.kill()
        holder.wait()
    from csgguard.artifacts import folder_lock

    with folder_lock(run, "train"):  # the kernel released the dead holder's lock
        pass


# ----------------------------------------------------------------------------- item 13: --save-images

def test_item13_saved_pngs_are_all_still_adversarial(digits_csg_run, tmp_path):
    import numpy as np
    import torch
    from PIL import Image

    from csgguard import load_model

    png = tmp_path / "png"
    r = _cli("attack", "--run", digits_csg_run, "--method", "deepfool", "--steps", "20", "--limit", "60",
             "--out", tmp_path / "df.npz", "--save-images", png, "--format", "json", "--no-progress")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["png_dropped"] > 0 and "dropped" in r.stderr  # DeepFool stops at the boundary
    files = sorted(png.glob("*.png"))
    assert len(files) == summary["png_written"] == summary["succeeded"] - summary["png_dropped"]
    model = load_model(digits_csg_run).model
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f), dtype=np.float32) / 255.0)[None] for f in files])
    with torch.no_grad():
        pred = model(x).argmax(1).tolist()
    for f, p in zip(files, pred, strict=True):
        true, adv = (int(v) for v in f.stem.split("_true")[1].split("_adv"))
        assert p == adv != true, f.name


def test_save_images_is_all_or_nothing_with_its_set(digits_csg_run, tmp_path):
    """A PNG that cannot be written (a folder in its way) fails the call with one line and leaves no
    PNG and no attack file of it behind; the same call with the way clear writes all of them."""
    png, out = tmp_path / "png", tmp_path / "a.npz"
    args = ("attack", "--run", digits_csg_run, "--limit", "20", "--eps", "0.3", "--out", out, "--save-images", png,
            "--format", "json", "--no-progress")
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in png.glob("*.png"))
    assert len(names) == json.loads(r.stdout)["png_written"] >= 3
    import shutil

    shutil.rmtree(png)
    for f in tmp_path.glob("a.npz*"):  # the set and its sidecar
        f.unlink()
    png.mkdir()
    (png / names[len(names) // 2]).mkdir()  # the middle one cannot be written
    r = _cli(*args)
    assert r.exit_code == 2 and "a folder is in the way" in r.stderr and "Traceback" not in r.output, r.output
    assert sorted(p.name for p in png.iterdir()) == [names[len(names) // 2]]  # no PNG, no temporary file
    assert not out.exists() and not list(tmp_path.glob("a.npz*"))


# ----------------------------------------------------------------------------- items 12, 15: image-folder runs

def test_item15_image_folder_split_is_described_and_sized(tmp_path):
    _png_tree(tmp_path / "imgs", ["a", "b"], n=10)
    r = _cli("train", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--out", tmp_path / "run", "--epochs", "1",
             "--no-progress", "--format", "json")
    assert r.exit_code == 0, r.output
    assert "flat tree: 80% train / 20% test" in r.stderr and "14 train / 2 val / 4 test" in r.stderr, r.stderr
    help_text = _cli("train", "--help").stdout
    assert "80/20" in help_text and "recipe" in help_text


def test_item12_image_folder_run_goes_train_attack_fit_screen(tmp_path):
    """Every command after train reopens an image-folder run's own splits (csgguard.runs.load_run_dataset)."""
    _png_tree(tmp_path / "imgs", ["a", "b", "c"], n=30)
    run = tmp_path / "run"
    steps = [["train", "--data", f"imagefolder:{tmp_path / 'imgs'}", "--out", run, "--epochs", "2"],
             ["attack", "--run", run, "--method", "fgsm", "--eps", "0.1", "--save-images", tmp_path / "adv"],
             ["fit", "--run", run, "--fpr", "0.2"],  # 7 val images (10% of 72 train): 0.1 would need 10
             ["screen", "-r", tmp_path / "imgs", "--run", run, "--format", "jsonl"]]
    for args in steps:
        r = _cli(*args, "--no-progress")
        assert r.exit_code == 0, (args[0], r.output)


# ----------------------------------------------------------------------------- item 16: piped output

def test_item16_piped_tables_are_not_wrapped(fitted_run, hostile_tree):
    r = _screen(hostile_tree, fitted_run)  # CliRunner's stdout is not a terminal, like a pipe
    long_path = str(hostile_tree.root / "=HYPERLINK(1).png")
    assert long_path in r.stdout  # whole, on one line
    from csgguard.cli.common import emit_rows

    rows = [{c: "csg-clean" for c in ("model", "detector", "attack", "seen", "auroc", "tpr_at_5pct_fpr")}]
    out = CliRunner().invoke(main, ["--help"])  # warm click
    assert out.exit_code == 0
    import contextlib
    import sys

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert not sys.stdout.isatty()
        emit_rows(rows, list(rows[0]), "table", title="evaluate")
    assert "tpr_at_5pct_fpr" in buf.getvalue() and "csg-clean" in buf.getvalue()


def test_item16_plain_progress_lines_on_a_non_terminal(monkeypatch):
    from csgguard.progress import PlainProgress, make_progress

    monkeypatch.delenv("CSGGUARD_NO_PROGRESS", raising=False)
    monkeypatch.setenv("CSGGUARD_PROGRESS_INTERVAL", "0")
    bar = make_progress(None)  # pytest's stderr is not a terminal
    assert isinstance(bar, PlainProgress)
    buf = io.StringIO()
    bar.stream = buf
    with bar:
        t = bar.add_task("attack", total=4, info="")
        for _ in range(4):
            bar.advance(t, 1)
            bar.update(t, info="flagged 1")
    lines = buf.getvalue().splitlines()
    assert lines and lines[-1].startswith("attack: 4/4 (100.0%)") and "\x1b" not in buf.getvalue()
    silent = make_progress(False)  # a rich Progress that draws nothing (tests/test_structure.py)
    assert not isinstance(silent, PlainProgress) and silent.disable


# ----------------------------------------------------------------------------- hardening sweep

@pytest.mark.parametrize("detector,param,needle", [
    ("csg-clean", "components=5", "components"),         # not a string: was an internal error
    ("csg-clean", "components=null", "components"),
    ("csg-clean", "combine=bogus", "combine"),            # was refused only after the features were extracted
    ("csg-clean", "units=x", "units"),
    ("csg-supervised", "C=-1", "C must be"),              # was refused only after the attacks had run
    ("csg-supervised", "gate=bogus", "gate"),
    ("csg-robust", "lr=abc", "lr"),                       # these four were internal errors
    ("csg-robust", "train_eps=abc", "train_eps"),
    ("csg-robust", "seed=-1", "seed"),
    ("csg-robust", "inputs=5", "inputs"),
    ("csg-robust", "head_fpr=2", "head_fpr"),
    ("union", 'part_params={"csg-clean": {"components": 5}}', "components"),
])
def test_detector_params_are_one_line_exit_2_before_any_work(digits_csg_run, tmp_path, monkeypatch, detector,
                                                             param, needle):
    def no_work(*a, **k):
        raise AssertionError("work started before the detector's parameters were checked")
    monkeypatch.setattr(importlib.import_module("csgguard.fitting"), "load_model", no_work)
    line = one_line_error(_cli("fit", "--run", digits_csg_run, "--detector", detector, "--param", param,
                               "--out", tmp_path / "d.json"))
    assert needle in line, line
    assert not list(tmp_path.iterdir())


def test_forged_nan_weights_or_detector_arrays_are_refused(fitted_run, tmp_path):
    """A hash is no signature: whoever rewrites a file can rewrite its hash. NaN in the weights or the
    detector's arrays would make every score NaN, and a NaN score is never above the threshold."""
    import shutil

    import numpy as np
    import torch
    from safetensors.torch import load as st_load

    from csgguard.artifacts import canonical_json, save_tensors
    from csgguard.detectors.store import COVERED

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    (run / "image.png").write_bytes(b"")  # anything to screen: the run is refused before it is read
    m = json.loads((run / "detector.json").read_text())
    arrays = st_load((run / "detector.safetensors").read_bytes())
    arrays["means_"] = torch.full_like(arrays["means_"], float("nan"))
    m["arrays"]["sha256"] = save_tensors(run / "detector.safetensors", arrays, metadata={
        "format": "csgguard.detector", "manifest": canonical_json({k: m.get(k) for k in COVERED})})
    (run / "detector.json").write_text(json.dumps(m))
    line = one_line_error(_cli("screen", run / "image.png", "--run", run))
    assert "detector.safetensors" in line and "means_" in line and "NaN" in line, line

    def nan_weights(m):  # _forge then re-signs these tensors
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(run / "model.safetensors"))
        key = next(k for k, t in tensors.items() if t.is_floating_point())
        tensors[key] = torch.full_like(tensors[key], np.nan)
        save_file(tensors, str(run / "model.safetensors"))
    _forge(run, nan_weights)
    line = one_line_error(_cli("inspect", "--run", run))
    assert "model.safetensors" in line and "NaN" in line, line


def test_finite_weights_that_compute_nan_are_one_line_errors_for_inspect_and_fit(fitted_run, tmp_path):
    """A negative BatchNorm variance is finite and passes every load check, yet the network then
    computes NaN: inspect and fit must say so in one line (sklearn's "Input X contains NaN" was exit 3)."""
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)

    def negative_variance(m):  # _forge then re-signs these tensors
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(run / "model.safetensors"))
        key = next(k for k in tensors if k.endswith("running_var"))
        tensors[key] = -torch.ones_like(tensors[key])
        save_file(tensors, str(run / "model.safetensors"))
    _forge(run, negative_variance)
    for args in (["inspect", "--run", run], ["fit", "--run", run, "--out", tmp_path / "d.json"]):
        line = one_line_error(_cli(*args))
        assert "computes NaN or inf" in line and str(run) in line, line
    assert not (tmp_path / "d.json").exists()


def test_a_nan_score_is_an_error_row_never_unflagged(fitted_run, tmp_path, monkeypatch):
    """Weights can be finite and still give NaN (a negative BatchNorm variance): such a row must not
    read as screened-and-clean."""
    import numpy as np

    from csgguard.screening import Screener

    real = Screener.score_batch

    def nan_first(self, x):
        pred, conf, score = real(self, x)
        score = score.copy()
        score[0] = np.nan
        return pred, conf, score
    monkeypatch.setattr(Screener, "score_batch", nan_first)
    from csgguard import load_dataset
    from csgguard.images import encode_png

    x = load_dataset("digits").test.x()[:2].numpy()
    for i in range(2):
        (tmp_path / f"{i}.png").write_bytes(encode_png(x[i]))
    r = _cli("screen", tmp_path, "--run", fitted_run, "--format", "jsonl", "--no-progress")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert rows[0]["flagged"] is None and rows[0]["score"] is None and "NaN" in rows[0]["error"]
    assert rows[1]["error"] is None and rows[1]["score"] is not None
    assert "1 errors" in r.stderr


def test_the_second_file_of_an_output_pair_is_checked_before_any_work(digits_csg_run, tmp_path):
    """attack --out x.npz also writes x.npz.json, fit --out d.json also d.safetensors: a FIFO in the
    second place used to be met after the first file was written, leaving half a pair."""
    pairs = ((["attack", "--run", digits_csg_run, "--method", "fgsm", "--eps", "0.1", "--limit", "4"],
              tmp_path / "a.npz", tmp_path / "a.npz.json"),
             (["fit", "--run", digits_csg_run], tmp_path / "d.json", tmp_path / "d.safetensors"))
    for args, first, second in pairs:
        os.mkfifo(second)
        line = one_line_error(_cli(*args, "--out", first))
        assert "not a regular file" in line and str(second) in line, line
        assert not first.exists()


def test_an_output_that_is_a_device_or_fifo_is_refused_never_replaced(digits_csg_run, tmp_path):
    """`--out /dev/null` as root used to replace /dev/null with a regular file (the rename of an
    atomic write); a FIFO stands in for the device here."""
    import stat

    fifo = tmp_path / "out.npz"
    os.mkfifo(fifo)
    for args in (["attack", "--run", digits_csg_run, "--method", "fgsm", "--eps", "0.1", "--limit", "4",
                  "--out", fifo],
                 ["inspect", "--run", digits_csg_run, "--heatmap", fifo]):
        line = one_line_error(_cli(*args))
        assert "not a regular file" in line and str(fifo) in line, line
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    from csgguard.artifacts import atomic_write_bytes
    from csgguard.errors import CsgguardError

    with pytest.raises(CsgguardError, match="not a regular file"):
        atomic_write_bytes(fifo, b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_an_image_given_as_the_detector_is_named_as_not_a_detector(fitted_run, tmp_path):
    from PIL import Image

    img = tmp_path / "imgs" / "a.png"
    img.parent.mkdir()
    Image.new("L", (8, 8)).save(img)
    line = one_line_error(_cli("screen", img.parent, "--run", fitted_run, "--detector", img, "--no-progress"))
    assert f"{img}: not a detector" in line  # was "a.png/detector.json: detector not found"


def test_evaluate_fpr_message_and_mislabelled_models(digits_csg_run, digits_std_run):
    assert "fraction like 1/20" in one_line_error(_cli("evaluate", "--run", digits_csg_run, "--fpr", "abc"))
    from csgguard.evaluate import model_role_notes
    from csgguard.models.store import load_model

    csg, std = load_model(digits_csg_run), load_model(digits_std_run)
    assert model_role_notes({"csg": csg, "std": std}) == []
    swapped = model_role_notes({"csg": std, "std": csg})
    assert len(swapped) == 2 and "has no gate" in swapped[0] and "not an STD twin" in swapped[1]


def test_a_fit_on_too_few_images_says_so_not_that_the_file_is_bad(digits_csg_run, tmp_path, monkeypatch):
    """A dozen clean fit images can leave csg-clean degenerate units and a threshold past +-1e12 (seen on a
    3-epoch digits model; forced here, as the fixture model's units may hold): the error says so and what
    to do, instead of blaming the output file for a 'non-finite' number."""
    from csgguard.detectors.gate import GateCleanDetector

    real = GateCleanDetector.calibrate

    def degenerate(self, *args, **kw):
        real(self, *args, **kw)
        self.threshold_ = 3.7e12
        return self
    monkeypatch.setattr(GateCleanDetector, "calibrate", degenerate)
    out = tmp_path / "d.json"
    r = _cli("fit", "--run", digits_csg_run, "--limit", "12", "--out", out, "--no-progress")
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    line = r.stderr.strip().splitlines()[-1]  # after fit's one line saying how many images it fits on
    assert line.startswith("error:") and "degenerate" in line and "--limit 12" in line and str(out) not in line, line
    assert not out.exists()


def test_inspect_and_attack_print_csv(digits_csg_run, tmp_path):
    """Data commands take --format csv: a header and rows a CSV reader parses, nothing else on stdout."""
    import csv
    import io

    r = _cli("inspect", "--run", digits_csg_run, "--format", "csv", "--heatmap", tmp_path / "h.png")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 10 and {"accuracy", "gate_density", "class", "filter_ids"} <= set(rows[0])
    assert float(rows[0]["accuracy"]) > 0.5
    r = _cli("attack", "--run", digits_csg_run, "--limit", "8", "--out", tmp_path / "a.npz", "--format", "csv",
             "--no-progress")
    assert r.exit_code == 0, r.output
    (row,) = list(csv.DictReader(io.StringIO(r.stdout)))
    assert row["attack"] == "pgd" and int(row["total"]) == 8

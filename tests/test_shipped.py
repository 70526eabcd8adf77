"""The shipped CIFAR-10 runs: reachable by name, hash-checked, screening without training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from csgguard.shipped import PRETRAINED_DIR, pretrained_runs, resolve_run

NAMES = ("cifar10-resnet20-csg", "cifar10-resnet20-std")


def test_names_resolve_and_user_folders_win(tmp_path, monkeypatch):
    assert set(NAMES) <= set(pretrained_runs())
    for name in NAMES:
        assert resolve_run(name) == PRETRAINED_DIR / name
        assert resolve_run(f"pretrained/{name}") == PRETRAINED_DIR / name
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAMES[0]).mkdir()
    assert resolve_run(NAMES[0]) == type(resolve_run(NAMES[0]))(NAMES[0])  # the relative folder, not the shipped one
    assert str(resolve_run("no-such-run")) == "no-such-run"


@pytest.mark.parametrize("name", NAMES)
def test_shipped_run_loads_with_its_detector(name):
    from csgguard.detectors.store import load_detector
    from csgguard.models.store import load_model

    loaded = load_model(name)
    assert loaded.config.arch == "resnet20" and loaded.classes[0] == "airplane"
    assert (loaded.model.gate is not None) == name.endswith("csg")
    det = load_detector(loaded.run_dir, model_sha256=loaded.sha256)
    assert det.name == "csg-clean" and np.isfinite(det.threshold_)


def test_screen_by_name(tmp_path):
    from csgguard.cli import main

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    r = CliRunner().invoke(main, ["screen", str(tmp_path), "--run", "cifar10-resnet20-csg", "--format", "json",
                                  "--no-progress"])
    assert r.exit_code in (0, 1), r.output
    rows = json.loads(r.stdout)
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert len(rows) == 3 and all(np.isfinite(row["score"]) for row in rows)


def test_commands_never_write_into_a_shipped_run(tmp_path, monkeypatch):
    """A shipped run's folder is part of the installed package: fit, attack and evaluate without --out
    refuse (one line, exit 2, before any work) rather than write there; a detector fitted into it would
    silently become what every later `screen --run NAME` uses. inspect reports the shipped heatmap
    instead of rewriting it. Nothing in the package folder changes."""
    from csgguard.cli import main

    monkeypatch.chdir(tmp_path)  # no user folder of that name
    before = {p: p.stat().st_mtime_ns for p in (PRETRAINED_DIR / NAMES[0]).rglob("*")}
    for cmd in (["fit"], ["attack", "--method", "fgsm", "--eps", "8/255"], ["evaluate"]):
        r = CliRunner().invoke(main, [*cmd, "--run", NAMES[0], "--data-root", str(tmp_path)])
        assert r.exit_code == 2, (cmd, r.output)
        assert "shipped inside csgguard" in r.output and "--out" in r.output and "Traceback" not in r.output
    # the Python API refuses the same, by name or by folder, before any work
    from csgguard.errors import CsgguardError
    from csgguard.evaluate import evaluate
    from csgguard.fitting import fit_detector

    for call in (lambda: fit_detector(NAMES[0]), lambda: fit_detector(PRETRAINED_DIR / NAMES[0]),
                 lambda: evaluate(NAMES[0])):
        with pytest.raises(CsgguardError, match="shipped inside csgguard"):
            call()
    from csgguard.shipped import shipped_name

    assert shipped_name(PRETRAINED_DIR / NAMES[0]) == NAMES[0] and shipped_name(tmp_path) is None
    assert shipped_name(PRETRAINED_DIR / f".{NAMES[0]}.work") is None  # ship_run's own work copy may be written
    after = {p: p.stat().st_mtime_ns for p in (PRETRAINED_DIR / NAMES[0]).rglob("*")}
    assert after == before


def test_inspect_keeps_a_shipped_heatmap_and_checks_its_own_first(tmp_path, monkeypatch, digits_csg_run):
    """inspect on a shipped run reports the heatmap it ships with and writes nothing; on a user's run a
    heatmap path it cannot write is one line before the forward pass, not after it."""
    import shutil

    import csgguard.shipped as shipped
    from csgguard.cli import main

    fake = tmp_path / "pretrained"
    shutil.copytree(digits_csg_run, fake / "digits-csg")
    (fake / "digits-csg" / "gate_heatmap.png").write_bytes(b"shipped")
    monkeypatch.setattr(shipped, "PRETRAINED_DIR", fake.resolve())
    r = CliRunner().invoke(main, ["inspect", "--run", str(fake / "digits-csg"), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["heatmap"] == str(fake / "digits-csg" / "gate_heatmap.png")
    assert (fake / "digits-csg" / "gate_heatmap.png").read_bytes() == b"shipped"
    # the Python API by the shipped name: nothing written there, and no stray ./digits-csg folder (which
    # would then hide the shipped run from every later command run here)
    from csgguard.inspect import inspect_run

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert inspect_run("digits-csg")["heatmap"] == str(fake / "digits-csg" / "gate_heatmap.png")
    assert not (tmp_path / "cwd" / "digits-csg").exists()
    assert (fake / "digits-csg" / "gate_heatmap.png").read_bytes() == b"shipped"

    mine = tmp_path / "mine"
    shutil.copytree(digits_csg_run, mine)
    (mine / "gate_heatmap.png").unlink(missing_ok=True)
    (mine / "gate_heatmap.png").mkdir()  # the default heatmap path cannot be written
    monkeypatch.setattr("csgguard.inspect.split_features", lambda *a, **k: pytest.fail("ran before the check"))
    r = CliRunner().invoke(main, ["inspect", "--run", str(mine)])
    assert r.exit_code == 2 and "gate_heatmap.png" in r.output and "Traceback" not in r.output, r.output

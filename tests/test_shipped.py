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

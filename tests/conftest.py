"""Shared fixtures: small digits models trained once per session (a few seconds each)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, int(os.environ.get("OMP_NUM_THREADS", "2")))))
os.environ.setdefault("CSGGUARD_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Decoded-dataset caches go to a temporary folder, never the user's ~/.cache."""
    if "CSGGUARD_CACHE" not in os.environ or os.environ.get("CSGGUARD_TEST_CACHE"):
        monkeypatch.setenv("CSGGUARD_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        monkeypatch.setenv("CSGGUARD_TEST_CACHE", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")
    parser.addoption("--shared-data", default=os.environ.get("CSGGUARD_SHARED_DATA"),
                     help="folder holding mnist/ and cifar10-jpeg/ (or env CSGGUARD_SHARED_DATA)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data(request) -> Path:
    """The shared data folder, from --shared-data or CSGGUARD_SHARED_DATA; skip when absent."""
    path = request.config.getoption("--shared-data")
    if not path:
        pytest.skip("shared data not given: set CSGGUARD_SHARED_DATA=/path/to/shared/data or --shared-data")
    p = Path(path)
    if not p.is_dir():
        pytest.skip(f"shared data folder {p} does not exist")
    return p


def _train(tmp_path_factory, name: str, gate: bool) -> Path:
    from csgguard import TrainConfig, train

    out = tmp_path_factory.mktemp(name)
    # CSGGUARD_FIXTURE_SEED trains other fixture models: a test must hold on any of them (another CPU or
    # thread count trains a different one from seed 0 too)
    seed = int(os.environ.get("CSGGUARD_FIXTURE_SEED", "0"))
    train(TrainConfig(data="digits", gate=gate, epochs=20, seed=seed), out, progress=False)
    return out


@pytest.fixture(scope="session")
def digits_csg_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "digits_csg", True)


@pytest.fixture(scope="session")
def digits_std_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory, "digits_std", False)


@pytest.fixture()
def hostile_tree(tmp_path, monkeypatch):
    """The hostile-files folder of tests/hostile.py, built from one digits test image."""
    import io

    import numpy as np
    from hostile import make_hostile_tree
    from PIL import Image

    from csgguard import load_dataset

    x = load_dataset("digits").test.x()[0].numpy()
    buf = io.BytesIO()
    Image.fromarray(np.clip(x[0] * 255 + 0.5, 0, 255).astype(np.uint8), "L").save(buf, format="PNG")
    tree = make_hostile_tree(tmp_path, buf.getvalue())
    yield tree
    tree.restore()


@pytest.fixture(scope="session")
def fitted_run(tmp_path_factory, digits_csg_run) -> Path:
    """A copy of the digits CSG run with a csg-clean detector fitted by the CLI."""
    import json
    import shutil

    from click.testing import CliRunner

    from csgguard.cli import main

    run = tmp_path_factory.mktemp("screen") / "run"
    shutil.copytree(digits_csg_run, run)
    r = CliRunner().invoke(main, ["fit", "--run", str(run), "--format", "json", "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (run / "detector.json").is_file() and (run / "detector.safetensors").is_file()
    assert summary["clean_fit"] > 500 and 0 < summary["realised_fpr_val"] <= 0.1
    return run

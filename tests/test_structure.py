"""Structure: a light CLI import, one version, no reloads, no backend switching, library progress bars."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _modules_after(statement: str) -> set[str]:
    probe = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out))


def test_cli_import_loads_no_heavy_module():
    loaded = _modules_after("import csgguard.cli")
    heavy = {"torch", "numpy", "sklearn", "matplotlib", "foolbox", "safetensors", "csgguard.train",
             "csgguard.distributed", "csgguard.data"}
    assert not heavy & loaded, sorted(heavy & loaded)


def test_every_command_still_registers_and_helps():
    from click.testing import CliRunner

    from csgguard.cli import main

    for cmd in ("train", "inspect", "attack", "fit", "screen", "evaluate"):
        res = CliRunner().invoke(main, [cmd, "--help"])
        assert res.exit_code == 0, res.output


def test_inspect_does_not_import_training():
    loaded = _modules_after("import csgguard.inspect")
    assert "csgguard.train" not in loaded and "csgguard.distributed" not in loaded


def test_version_is_written_once():
    import csgguard

    assert csgguard.__version__ == importlib.metadata.version("csgguard")
    source = (REPO / "csgguard" / "__init__.py").read_text()
    assert not re.search(r"__version__\s*=\s*[\"']\d", source), "the version literal lives in pyproject.toml only"


def test_cli_copies_of_names_match_their_sources():
    from csgguard.cli import evaluate_cmd, train_cmd
    from csgguard.data import DATASET_NAMES
    from csgguard.evaluate import DEFAULT_ATTACKS, DEFAULT_DETECTORS, DEFAULT_SUPERVISED_ON

    assert train_cmd.DATASET_NAMES == DATASET_NAMES
    assert evaluate_cmd.DEFAULT_ATTACKS == DEFAULT_ATTACKS
    assert evaluate_cmd.DEFAULT_DETECTORS == DEFAULT_DETECTORS
    assert evaluate_cmd.DEFAULT_SUPERVISED_ON == DEFAULT_SUPERVISED_ON


def test_package_names_keep_their_meaning():
    import csgguard
    import csgguard.train  # noqa: F401  (binds the submodule; the name must stay the function)

    assert callable(csgguard.train) and csgguard.train.__module__ == "csgguard.train"
    assert csgguard.TrainConfig.__name__ == "TrainConfig"
    with pytest.raises(AttributeError):
        csgguard.no_such_name  # noqa: B018


def test_report_draws_the_heatmap_without_reloading_the_model(digits_csg_run, tmp_path, monkeypatch):
    import csgguard.models.store as store
    from csgguard.evaluate import evaluate
    from csgguard.report import write_report

    report = evaluate(digits_csg_run, attacks=("fgsm",), detectors=("csg-clean",), adaptive=False, limit=120,
                      fpr=0.1, write=False, device="cpu")

    def refuse(*_a, **_k):
        raise AssertionError("write_report reloaded (and re-hashed) the model")

    monkeypatch.setattr(store, "load_model", refuse)
    monkeypatch.setattr(store, "load_tensors", refuse)
    out = write_report(report, tmp_path / "rep")
    assert (out / "gate_heatmap.png").stat().st_size > 0


def test_evaluate_model_defaults_to_the_runs_own_data(digits_csg_run):
    from csgguard.metrics import evaluate_model
    from csgguard.models.store import load_model
    from csgguard.runs import load_run_dataset

    loaded = load_model(digits_csg_run)
    ev = evaluate_model(loaded, split="val")
    assert ev["images"] == len(load_run_dataset(loaded).val) and 0.0 <= ev["accuracy"] <= 1.0


def test_plots_leave_the_users_pyplot_backend_alone(tmp_path):
    import matplotlib

    from csgguard.report import write_heatmap

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        write_heatmap(np.random.default_rng(0).random((12, 3)), ["a", "b", "c"], tmp_path / "h.png", "t")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_disabled_progress_is_rich_progress_drawing_nothing(capsys):
    from rich.progress import Progress

    from csgguard.progress import make_progress

    with make_progress(False) as bar:
        assert isinstance(bar, Progress) and bar.disable
        task = bar.add_task("x", total=2, info="")
        bar.update(task, advance=2, info="done")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""

"""`csgguard train` / `inspect` from the command line, including bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from interrupt import ctrl_c_at_epoch

from csgguard.cli import main


@pytest.fixture
def runner():
    return CliRunner()


def _one_line_error(result):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_train_and_inspect_json(runner, tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(main, ["train", "--out", str(out), "--epochs", "3", "--format", "json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    for key in ("test_accuracy", "gate_density", "mis", "epochs", "seconds"):
        assert key in summary
    r = runner.invoke(main, ["inspect", "--run", str(out), "--device", "cpu", "--format", "json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert set(report["filters_per_class"]) == {str(i) for i in range(10)}
    assert (out / "gate_heatmap.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,needle", [
    (["train", "--data", "svhn"], "unknown dataset 'svhn'"),
    (["train", "--data", "mnist", "--data-root", "/nonexistent/mnist"], "/nonexistent/mnist"),
    (["train", "--device", "cuda"], "CUDA is not available"),
    (["inspect", "--run", "/nonexistent/run"], "run directory not found"),
    (["inspect", "--run", "/nonexistent/run", "--device", "cuda"], "CUDA is not available"),
])
def test_bad_input_is_one_clear_line(runner, args, needle, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _one_line_error(runner.invoke(main, args))
    assert needle in line


def test_failed_train_overwrites_nothing(runner, digits_csg_run, tmp_path, monkeypatch):
    """Training into an existing run that fails part-way (after checkpoints were written) leaves its files."""
    import importlib

    trainer = importlib.import_module("csgguard.train").Trainer  # the module; csgguard.train is the function
    original, epochs_run = trainer.run_epoch, []

    def failing(self, epoch, *a, **k):
        epochs_run.append(epoch)
        if epoch == 3:
            raise RuntimeError("simulated failure in epoch 3")
        return original(self, epoch, *a, **k)

    monkeypatch.setattr(trainer, "run_epoch", failing)
    run = tmp_path / "run"
    shutil.copytree(digits_csg_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = runner.invoke(main, ["train", "--epochs", "4", "--width", "16", "--out", str(run)])
    assert result.exit_code == 3 and "simulated failure" in result.output and "Traceback" not in result.output
    assert len(epochs_run) >= 3 and epochs_run[-1] == 3  # it failed late (checkpoints written), not at the start
    assert {name: (run / name).read_bytes() for name in before} == before
    assert (run / "checkpoint.safetensors").is_file()  # what it did write is the resumable checkpoint


def test_inspect_refuses_tampered_weights(runner, digits_csg_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_csg_run, run)
    (run / "model.safetensors").write_bytes(b"junk")
    assert "does not match" in _one_line_error(runner.invoke(main, ["inspect", "--run", str(run)]))


def test_help_teaches(runner):
    r = runner.invoke(main, ["--help"])
    assert r.exit_code == 0 and "Exit codes" in r.output
    r = runner.invoke(main, ["train", "--help"])
    assert "--no-gate" in r.output and "Examples" in r.output


def test_extend_from_the_command_line(runner, tmp_path):
    base = tmp_path / "base"
    assert runner.invoke(main, ["train", "--out", str(base), "--epochs", "2", "--width", "16"]).exit_code == 0
    # the recipe comes from the run: a recipe option beside --extend is refused, by name
    line = _one_line_error(runner.invoke(main, ["train", "--extend", str(base), "--swa-epochs", "2",
                                                "--epochs", "9", "--cutout", "2", "--out", str(tmp_path / "x")]))
    assert "--cutout, --epochs" in line and "--extend takes the recipe" in line
    assert "--swa-epochs" in _one_line_error(runner.invoke(main, ["train", "--extend", str(base),
                                                                  "--out", str(tmp_path / "x")]))
    assert "is the run being extended" in _one_line_error(runner.invoke(
        main, ["train", "--extend", str(base), "--swa-epochs", "1", "--out", str(base)]))
    assert "run directory not found" in _one_line_error(runner.invoke(
        main, ["train", "--extend", str(tmp_path / "nope"), "--swa-epochs", "1", "--out", str(tmp_path / "x")]))
    r = runner.invoke(main, ["train", "--extend", str(base), "--swa-epochs", "2", "--swa-lr", "0.25",
                             "--out", str(tmp_path / "ext"), "--format", "json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["weights"] == "average of epochs 3-4" and summary["epochs"] == 2
    manifest = json.loads((tmp_path / "ext" / "model.json").read_text())
    assert manifest["training"]["swa_epochs"] == 2 and manifest["training"]["swa_lr"] == 0.25
    # an averaged run is not extended again (its history ends in averaging epochs); nor is --swa-lr 0 taken
    assert "already holds averaged weights" in _one_line_error(runner.invoke(
        main, ["train", "--extend", str(tmp_path / "ext"), "--swa-epochs", "1", "--out", str(tmp_path / "z")]))
    assert runner.invoke(main, ["train", "--swa-lr", "0", "--out", str(tmp_path / "z")]).exit_code == 2


def test_resume_takes_the_interrupted_runs_own_settings(runner, tmp_path, monkeypatch):
    """`csgguard train --out X --resume` (README, --help) must not need the options retyped."""
    out = tmp_path / "part"
    with ctrl_c_at_epoch(monkeypatch, 2):
        r = runner.invoke(main, ["train", "--out", str(out), "--epochs", "4", "--width", "16", "--seed", "3"])
        assert r.exit_code != 0 and (out / "checkpoint.safetensors").is_file()
    # an option that contradicts the checkpoint is still refused, by name
    assert "seed 3 -> 4" in _one_line_error(runner.invoke(main, ["train", "--out", str(out), "--resume",
                                                                 "--epochs", "4", "--width", "16", "--seed", "4"]))
    # --compile says how the steps run, not what they learn: it may join a resume (torch.compile stubbed);
    # an option given beside --resume that matches the checkpoint is fine, and the ones not given come
    # from the checkpoint (epochs 4, width 16), not from the defaults
    compiled = []
    monkeypatch.setattr("torch.compile", lambda net, **kw: compiled.append(kw) or net)
    r = runner.invoke(main, ["train", "--out", str(out), "--resume", "--seed", "3", "--compile", "--format", "json"])
    assert r.exit_code == 0, r.output
    assert compiled == [{"dynamic": False, "mode": None}]
    summary = json.loads(r.stdout)
    assert summary["epochs"] == 4
    assert json.loads((out / "model.json").read_text())["training"]["width"] == 16


def test_a_density_target_never_reached_is_said_with_the_density_reached(runner, tmp_path):
    """Three epochs cannot bring the gate to 2% density: the run keeps its last epoch and says how far it got."""
    out = tmp_path / "run"
    r = runner.invoke(main, ["train", "--out", str(out), "--epochs", "3", "--density", "0.02", "--format", "json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["best_epoch"] == 3 and summary["gate_density"] > 0.02
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["gate_density"]
    assert f"never reached the target 0.02 (last epoch {last:.4f})" in r.stderr

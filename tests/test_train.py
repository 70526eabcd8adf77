"""Training: accuracy, gate density, MIS, checkpoints, resume, and the run directory."""

from __future__ import annotations

import json

import pytest
import torch
from interrupt import ctrl_c_at_epoch

from csgguard import TrainConfig, load_model, train
from csgguard.errors import CsgguardError
from csgguard.train import Trainer, checkpoint_epochs, epoch_path


def test_csg_digits_run_reaches_accuracy_and_density(digits_csg_run):
    summary = json.loads((digits_csg_run / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95
    # the hinge penalty drives the density down to its target 0.2 and may settle a hair above it
    # within 20 epochs (0.2024 on one of seven fixture models): near the target, and the kept epoch
    # is one that met it whenever one did, else the last (with a warning)
    assert summary["gate_density"] <= 0.2 + 0.01
    rows = [json.loads(x) for x in (digits_csg_run / "metrics.jsonl").read_text().splitlines()]
    met = [r["epoch"] for r in rows if r["gate_density"] <= 0.2 + 1e-9]
    assert summary["best_epoch"] in met if met else summary["best_epoch"] == 20
    assert summary["mis"] is not None and summary["epochs"] == 20
    loaded = load_model(digits_csg_run)
    assert loaded.model.has_gate
    g = loaded.model.gate.weight.detach()
    assert torch.allclose(g.amax(1), torch.ones(g.shape[0]))  # every filter open for >= 1 class
    lines = (digits_csg_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 20 and {"csg", "std"} <= {json.loads(x)["path"] for x in lines}


def test_std_twin_has_no_gate_and_csg_filters_are_more_class_specific(digits_csg_run, digits_std_run):
    csg = json.loads((digits_csg_run / "summary.json").read_text())
    std = json.loads((digits_std_run / "summary.json").read_text())
    assert std["mis"] is None and std["gate_density"] is None
    assert std["test_accuracy"] >= 0.95
    assert csg["activation_mis"] > std["activation_mis"]
    assert not load_model(digits_std_run).model.has_gate


def test_schedule_alternates_after_warmup():
    cfg = TrainConfig(data="digits", warmup=2, period=3, csg_from=2).resolved()
    paths = [epoch_path(cfg, e) for e in range(9)]
    assert paths == ["std", "std", "csg", "std", "std", "csg", "std", "std", "csg"]
    cfg_std = TrainConfig(data="digits", gate=False).resolved()
    assert {epoch_path(cfg_std, e) for e in range(9)} == {"std"}


def test_csg_step_keeps_gate_normalised():
    from csgguard import load_dataset

    cfg = TrainConfig(data="digits").resolved()
    tr = Trainer(cfg, load_dataset("digits"), torch.device("cpu"))
    x, y = next(tr.ds.train.batches(32))
    tr.step("csg", x, y)
    g = tr.model.gate.weight.detach()
    assert float(g.min()) >= 0 and float(g.max()) <= 1
    assert torch.allclose(g.amax(1), torch.ones(g.shape[0]))


def test_compiled_steps_match_eager_steps():
    """--compile must change how a step runs, not what it computes: the same seed, batches and
    paths give the same losses and weights as the eager trainer, and the checkpointed module
    keeps its own parameter names (no compiled wrapper's prefix)."""
    from csgguard import load_dataset

    ds = load_dataset("digits")
    x, y = next(ds.train.batches(64))
    trainers = [Trainer(TrainConfig(data="digits", compile=c).resolved(), ds, torch.device("cpu")) for c in (False, True)]
    losses = [[float(tr.step(p, x, y)[0]) for p in ("std", "csg", "std", "csg")] for tr in trainers]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    eager, compiled = (tr.model.state_dict() for tr in trainers)
    assert list(eager) == list(compiled)
    assert all(torch.allclose(eager[k].float(), compiled[k].float(), atol=1e-4) for k in eager)
    assert trainers[1].net is not trainers[1].model  # it really was compiled


def test_a_step_torch_compile_cannot_compile_is_one_clear_error():
    """No C++ compiler, an unsupported op: torch.compile's failure names --compile and the way out."""
    from csgguard import load_dataset

    ds = load_dataset("digits")
    tr = Trainer(TrainConfig(data="digits").resolved(), ds, torch.device("cpu"))

    def fails(*_a, **_k):
        raise torch._dynamo.exc.TorchRuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore")

    tr.net = fails
    x, y = next(ds.train.batches(8))
    with pytest.raises(CsgguardError, match=r"^--compile: .*No working C\+\+ compiler found\); rerun without --compile$"):
        tr.step("std", x, y)


def test_augment_crops_flips_and_cuts_out_one_square_per_image():
    """The on-tensor CIFAR augmentation: crop + flip keep the images' content (a constant image
    stays constant away from the zero padding); cutout then sets one square of at most
    ``cutout`` x ``cutout`` pixels (less where it hangs over the border) to the dataset mean,
    a different place per image; cutout=0 draws nothing extra."""
    from csgguard import load_dataset

    ds = load_dataset("digits")
    x = torch.ones(64, 1, 8, 8)
    plain = Trainer(TrainConfig(data="digits", augment=True).resolved(), ds, torch.device("cpu"))
    cut = Trainer(TrainConfig(data="digits", augment=True, cutout=4).resolved(), ds, torch.device("cpu"))
    a, b = plain._augment(x), cut._augment(x)
    assert set(a.unique().tolist()) <= {0.0, 1.0}  # content or padding, nothing else
    fill = float(ds.mean[0])
    holes = (b - fill).abs() < 1e-7
    assert holes.any(dim=(1, 2, 3)).float().mean() > 0.9  # almost every image has a hole on the canvas
    sizes = holes.sum(dim=(1, 2, 3))
    assert int(sizes.max()) <= 16 and int(sizes.max()) == 16
    for img in holes[:, 0]:  # the hole is one axis-aligned rectangle
        rows, cols = img.any(1).nonzero()[:, 0], img.any(0).nonzero()[:, 0]
        if len(rows):
            assert int(img.sum()) == len(rows) * len(cols)
            assert int(rows[-1] - rows[0]) + 1 == len(rows) <= 4 and int(cols[-1] - cols[0]) + 1 == len(cols) <= 4
    assert len({tuple(h.nonzero()[0].tolist()) for h in holes[:, 0] if h.any()}) > 5  # placed per image
    # same seed, no cutout: the generator is left where plain augmentation leaves it
    again = Trainer(TrainConfig(data="digits", augment=True).resolved(), ds, torch.device("cpu"))
    assert torch.equal(again._augment(x), a)
    with pytest.raises(CsgguardError, match="--cutout"):
        TrainConfig(cutout=-1).validate()


def test_seeded_runs_are_reproducible(tmp_path):
    a = train(TrainConfig(data="digits", epochs=3, seed=3), tmp_path / "a", progress=False)
    b = train(TrainConfig(data="digits", epochs=3, seed=3), tmp_path / "b", progress=False)
    assert a.summary["test_accuracy"] == b.summary["test_accuracy"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def _interrupted_run(monkeypatch, cfg: dict, out, at_epoch: int) -> None:
    """Train ``cfg`` into ``out`` and press Ctrl-C when ``at_epoch`` starts (a checkpoint is left)."""
    with ctrl_c_at_epoch(monkeypatch, at_epoch):
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**cfg), out, progress=False)


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    cfg = dict(data="digits", epochs=5, seed=1)
    full = train(TrainConfig(**cfg), tmp_path / "full", progress=False)

    _interrupted_run(monkeypatch, cfg, tmp_path / "part", 3)
    assert not (tmp_path / "part" / "model.json").exists()  # no half-finished model
    # issue 11 item 10: the checkpoint is one file (no pair a kill can split); a kill mid-write leaves a .tmp
    assert sorted(p.name for p in (tmp_path / "part").iterdir()) == ["checkpoint.safetensors"]
    # what a resume would go on from (benchmarks/gpu_check.sh reads it); nothing there reads 0
    assert checkpoint_epochs(tmp_path / "part") == 3  # stopped in its fourth epoch
    assert checkpoint_epochs(tmp_path / "nowhere") == 0
    stale = tmp_path / "part" / ".checkpoint.safetensors.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    resumed = train(TrainConfig(**cfg), tmp_path / "part", resume=True, progress=False)
    assert len(resumed.history) == 5
    assert resumed.summary["test_accuracy"] == full.summary["test_accuracy"]
    sa = load_model(tmp_path / "full").model.state_dict()
    sb = load_model(tmp_path / "part").model.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)
    assert not (tmp_path / "part" / "checkpoint.safetensors").exists() and not stale.exists()


def test_resume_with_other_settings_or_nothing_to_resume(tmp_path, monkeypatch):
    with pytest.raises(CsgguardError, match="nothing to resume"):
        train(TrainConfig(data="digits", epochs=2), tmp_path / "none", resume=True, progress=False)
    # a real checkpoint (interrupted in epoch 2), then --resume with another setting
    cfg = dict(data="digits", epochs=3, seed=0, width=16)
    _interrupted_run(monkeypatch, cfg, tmp_path / "part", 2)
    assert (tmp_path / "part" / "checkpoint.safetensors").is_file()
    for other in ({"lr": 1e-2}, {"seed": 1}, {"epochs": 4}, {"cutout": 2}):
        key = next(iter(other))
        with pytest.raises(CsgguardError, match=f"different settings .*{key} "):  # the message names the setting
            train(TrainConfig(**{**cfg, **other}), tmp_path / "part", resume=True, progress=False)
    # a config saved before cutout existed (no key) reads as trained without it
    assert TrainConfig.from_dict({"data": "cifar10"}).cutout == 0
    assert (tmp_path / "part" / "checkpoint.safetensors").is_file()  # the refused resume kept the checkpoint
    # --compile says how steps run, not what they learn: a resume may add it (torch.compile is
    # stubbed here; test_compiled_steps_match_eager_steps compiles for real)
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda net, **kw: compiled.append(kw) or net)
    train(TrainConfig(**cfg, compile=True), tmp_path / "part", resume=True, progress=False)  # the same recipe resumes
    assert compiled == [{"dynamic": False, "mode": None}]


def test_bad_config_values():
    with pytest.raises(CsgguardError, match="--epochs"):
        TrainConfig(epochs=0).validate()
    with pytest.raises(CsgguardError, match="--density"):
        TrainConfig(density=0).validate()


# ---------------------------------------------------------------- weight averaging (--swa-epochs, --extend)
def test_averaging_phase_lr_cycles_and_freezes_the_gate(tmp_path):
    from csgguard.data import load_dataset

    cfg = TrainConfig(data="digits", epochs=4, swa_epochs=3, swa_lr=0.5).resolved()
    trainer = Trainer(cfg, load_dataset("digits"), torch.device("cpu"))
    assert trainer.lr_factor(4.0) == pytest.approx(0.5)      # each averaging epoch starts at the peak ...
    assert trainer.lr_factor(4.5) == pytest.approx(0.25)
    assert trainer.lr_factor(5.999) < 1e-4                    # ... and ends near 0, where the snapshot is taken
    trainer._set_lr(5.2)
    assert trainer.opt_gate.param_groups[0]["lr"] == 0.0      # the gate does not move while weights are averaged
    assert trainer.opt_csg.param_groups[0]["lr"] > 0.0


def test_extend_averages_a_finished_run_and_resumes(tmp_path, monkeypatch):
    from csgguard.train import extension_config

    base = train(TrainConfig(data="digits", epochs=5, seed=2, width=32), tmp_path / "base", progress=False)
    before = load_model(tmp_path / "base").model.state_dict()
    cfg = extension_config(tmp_path / "base", swa_epochs=3)
    assert (cfg.epochs, cfg.width, cfg.seed, cfg.swa_epochs) == (5, 32, 2, 3)  # the run's own recipe
    ext = train(cfg, tmp_path / "ext", extend=tmp_path / "base", progress=False)
    assert ext.summary["swa_epochs"] == 3 and ext.summary["best_epoch"] is None
    assert ext.summary["weights"] == "average of epochs 6-8"
    rows = ext.history
    assert len(rows) == 8 and [bool(r.get("averaged")) for r in rows] == [False] * 5 + [True] * 3
    assert rows[:5] == base.history                            # the finished run's history carries over
    after = load_model(tmp_path / "ext").model.state_dict()
    assert torch.equal(after["gate.weight"], before["gate.weight"])  # frozen gate: same density
    assert not torch.allclose(after["fc.weight"], before["fc.weight"])  # ... while the weights did move
    assert json.loads((tmp_path / "base" / "summary.json").read_text())["epochs"] == 5  # RUN left as it is
    # interrupted in the second averaging epoch, then resumed: the same average as without the interruption
    with ctrl_c_at_epoch(monkeypatch, 6):
        with pytest.raises(KeyboardInterrupt):
            train(extension_config(tmp_path / "base", swa_epochs=3), tmp_path / "part", extend=tmp_path / "base",
                  progress=False)
    resumed = train(extension_config(tmp_path / "base", swa_epochs=3), tmp_path / "part", resume=True,
                    extend=tmp_path / "base", progress=False)
    assert resumed.summary["test_accuracy"] == ext.summary["test_accuracy"]
    sa, sb = after, load_model(tmp_path / "part").model.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)


def test_extend_refuses_what_it_cannot_do(tmp_path):
    from csgguard.train import extension_config

    train(TrainConfig(data="digits", epochs=2, width=16), tmp_path / "base", progress=False)
    with pytest.raises(CsgguardError, match="--swa-epochs"):
        train(TrainConfig(data="digits", epochs=2, width=16), tmp_path / "x", extend=tmp_path / "base",
              progress=False)
    (tmp_path / "base" / "metrics.jsonl").write_text('{"epoch": 1}\n')  # an unfinished history
    with pytest.raises(CsgguardError, match="only a finished run can be extended"):
        train(extension_config(tmp_path / "base", swa_epochs=1), tmp_path / "y", extend=tmp_path / "base",
              progress=False)
    with pytest.raises(CsgguardError, match="--swa-lr"):
        TrainConfig(swa_lr=0.0).validate()
    with pytest.raises(CsgguardError, match="--swa-epochs"):
        TrainConfig(swa_epochs=-1).validate()
    assert TrainConfig.from_dict({"data": "cifar10"}).swa_epochs == 0  # configs saved before averaging existed


def test_averaged_batchnorm_is_estimated_on_images_augmented_as_in_training(monkeypatch):
    from csgguard.data import load_dataset

    cfg = TrainConfig(data="digits", epochs=1, swa_epochs=1, augment=True, cutout=2, width=16).resolved()
    trainer = Trainer(cfg, load_dataset("digits"), torch.device("cpu"))
    trainer.update_average()
    seen = []
    original = Trainer._augment

    def counting(self, x, generator=None):
        seen.append((len(x), generator is not None and generator is not self.generator))
        return original(self, x, generator)

    monkeypatch.setattr(Trainer, "_augment", counting)
    state = trainer.generator.get_state()
    net = trainer.averaged_network(limit=600)
    assert sum(n for n, _ in seen) == 600 and all(own for _, own in seen)  # every image, by its own generator
    assert torch.equal(trainer.generator.get_state(), state)                 # training's stream untouched
    first = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean.clone()
    again = trainer.averaged_network(limit=600)                               # reproducible
    assert torch.equal(first, next(m for m in again.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_mean)


@pytest.mark.parametrize("seed", [0, 1])
def test_mis_is_scikit_learns_estimate(seed):
    """MIS computes scikit-learn's mutual_info_classif by sorting: the same numbers, dead filters and
    ties included, whenever every class has >= 8 samples (scikit-learn's own neighbour search is
    then exact); below that within 0.01 (its brute-force distances round differently)."""
    import numpy as np
    from sklearn.feature_selection import mutual_info_classif

    from csgguard.metrics import mutual_information_score

    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((600, 12)) + rng.standard_normal(12), 0) * rng.uniform(0.1, 5, 12)
    x[:, 3] = 0.0                      # a dead filter
    x[:, 5] = np.round(x[:, 5], 1)     # many ties
    x[:, 7] = (np.arange(600) % 10) + rng.standard_normal(600) * 0.3  # a class-specific filter
    for labels, classes, tol in ((np.arange(600) % 10, 10, 0.0),
                                 (np.r_[np.zeros(2), np.ones(5), np.full(593, 2)].astype(int), 3, 0.01)):
        want = np.stack([mutual_info_classif(x, (labels == c).astype(int), random_state=0)
                         for c in range(classes)], 1).max(1).mean()
        got = mutual_information_score(x, labels, classes)
        assert abs(got - want) <= tol and (tol or got == want), (got, want)
    shuffled = x.copy()
    shuffled[:, 7] = rng.permutation(shuffled[:, 7])  # the class-specific filter is what lifts it
    labels = np.arange(600) % 10
    assert mutual_information_score(x, labels, 10) > mutual_information_score(shuffled, labels, 10) + 0.02

"""Distillation (--teacher): the teachers' targets, the loss, and a run that learns from them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from interrupt import ctrl_c_at_epoch

from csgguard import TrainConfig, load_dataset, load_model, train
from csgguard.distill import distillation_loss, teacher_targets
from csgguard.errors import CsgguardError
from csgguard.train import Trainer, extension_config


def test_distillation_loss_mixes_labels_and_teachers():
    torch.manual_seed(0)
    logits = torch.randn(16, 10, requires_grad=True)
    labels = torch.randint(0, 10, (16,))
    targets = F.softmax(torch.randn(16, 10) / 4.0, dim=1)
    ce = F.cross_entropy(logits, labels).item()
    assert distillation_loss(logits, targets, labels, temperature=4.0, weight=0.0).item() == pytest.approx(ce)
    # the soft term by hand: T^2 * mean over images of sum_c t_c (log t_c - log p_c)
    log_p = F.log_softmax(logits / 4.0, dim=1)
    kl = 16.0 * (targets * (targets.log() - log_p)).sum(1).mean().item()
    got = distillation_loss(logits, targets, labels, temperature=4.0, weight=0.9)
    assert got.item() == pytest.approx(0.1 * ce + 0.9 * kl, rel=1e-5)
    # a network that already says what its teachers say has nothing left to learn from them
    own = F.softmax(logits.detach() / 4.0, dim=1)
    assert distillation_loss(logits, own, labels, temperature=4.0, weight=1.0).item() == pytest.approx(0.0, abs=1e-6)
    got.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_teacher_targets_average_teachers_and_mirror_images(digits_csg_run, digits_std_run):
    ds = load_dataset("digits")
    split = ds.train.subset(list(range(40)))
    runs = [str(digits_csg_run), str(digits_std_run)]
    t = teacher_targets(runs, split, classes=ds.classes, temperature=2.0, device=torch.device("cpu"), amp=False)
    assert t.shape == (40, 10) and torch.allclose(t.sum(1), torch.ones(40), atol=1e-5)
    # by hand: each teacher's softmax at T on the image and on its mirror image, all four averaged
    x = split.x()
    parts = []
    for r in runs:
        net = load_model(r).model.eval()
        with torch.no_grad():
            parts += [F.softmax(net(x) / 2.0, 1), F.softmax(net(x.flip(3)) / 2.0, 1)]
    assert torch.allclose(t, sum(parts) / 4, atol=1e-5)
    # the target does not depend on which way the augmentation flipped the image
    mirrored = split.subset(list(range(40)))
    mirrored.images = mirrored.images.flip(3)
    t2 = teacher_targets(runs, mirrored, classes=ds.classes, temperature=2.0, device=torch.device("cpu"), amp=False)
    assert torch.allclose(t, t2, atol=1e-5)


def test_a_teacher_of_other_classes_is_refused(digits_csg_run):
    ds = load_dataset("digits")
    with pytest.raises(CsgguardError, match=f"{digits_csg_run}.*classes"):
        teacher_targets([str(digits_csg_run)], ds.train, classes=[f"c{i}" for i in range(10)], temperature=4.0,
                        device=torch.device("cpu"))
    with pytest.raises(CsgguardError, match="at least one teacher"):
        teacher_targets([], ds.train, classes=ds.classes, temperature=4.0, device=torch.device("cpu"))


def test_batches_carry_the_positions_of_their_images_in_the_old_order():
    """The positions index the right images, and the shuffle is the one split.batches(shuffle=True)
    drew before positions were kept (runs started earlier resume and reproduce as they were)."""
    cfg = TrainConfig(data="digits", epochs=1, batch_size=100).resolved()
    trainer = Trainer(cfg, load_dataset("digits"), torch.device("cpu"))
    state = trainer.generator.get_state()
    got = list(trainer._batches())
    split = trainer.train_split
    for x, y, idx, _scale, _n in got:
        assert torch.equal(x, split.x()[idx]) and torch.equal(y, split.labels[idx])
    old = list(split.batches(100, shuffle=True, generator=torch.Generator().set_state(state)))
    assert len(old) == len(got)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(old, got, strict=True))


def test_the_std_path_learns_the_teachers_targets_and_the_csg_path_the_labels(digits_std_run):
    cfg = TrainConfig(data="digits", epochs=1, teachers=(str(digits_std_run),)).resolved()
    trainer = Trainer(cfg, load_dataset("digits"), torch.device("cpu"))
    x, y = next(trainer.ds.train.batches(32))
    soft = F.softmax(torch.randn(32, 10), 1)
    with torch.no_grad():
        logits = trainer.model(x)
    want = distillation_loss(logits, soft, y, temperature=4.0, weight=0.9)
    loss, _ = trainer.step("std", x, y, soft=soft)
    assert float(loss) == pytest.approx(float(want), rel=1e-4)
    # the CSG path: the gated cross-entropy with the labels (+ the sparsity hinge), soft targets unread
    torch.manual_seed(0)
    a = Trainer(cfg, load_dataset("digits"), torch.device("cpu"))
    b = Trainer(cfg, load_dataset("digits"), torch.device("cpu"))
    la, _ = a.step("csg", x, y, soft=soft)
    lb, _ = b.step("csg", x, y, soft=None)
    assert float(la) == float(lb)


def test_a_distilled_run_records_its_teachers_and_extends(tmp_path, digits_csg_run, digits_std_run):
    teachers = (str(digits_csg_run), str(digits_std_run))
    res = train(TrainConfig(data="digits", epochs=2, width=16, teachers=teachers, distill_weight=0.5),
                tmp_path / "kd", progress=False)
    assert res.summary["test_accuracy"] > 0.3
    training = json.loads((tmp_path / "kd" / "model.json").read_text())["training"]
    assert training["teachers"] == list(teachers) and training["distill_weight"] == 0.5
    # --extend with teachers: the averaging epochs distil; the recipe is the run's own
    train(TrainConfig(data="digits", epochs=2, width=16), tmp_path / "base", progress=False)
    cfg = extension_config(tmp_path / "base", swa_epochs=1, teachers=teachers)
    assert cfg.teachers == teachers and (cfg.distill_weight, cfg.distill_temperature) == (0.9, 4.0)
    ext = train(cfg, tmp_path / "ext", extend=tmp_path / "base", progress=False)
    assert ext.summary["swa_epochs"] == 1
    assert json.loads((tmp_path / "ext" / "model.json").read_text())["training"]["teachers"] == list(teachers)
    # extending the distilled run without --teacher averages without distilling
    assert extension_config(tmp_path / "kd", swa_epochs=1).teachers == ()
    with pytest.raises(CsgguardError, match="--distill-weight"):
        TrainConfig(distill_weight=1.5).validate()
    with pytest.raises(CsgguardError, match="--distill-temperature"):
        TrainConfig(distill_temperature=0.0).validate()


def test_cli_distill_options_need_a_teacher(tmp_path):
    from csgguard.cli import main

    r = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "x"), "--distill-weight", "0.5"])
    assert r.exit_code == 2, r.output
    assert "give at least one --teacher" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "y"), "--teacher", str(tmp_path / "nowhere"),
                                  "--epochs", "1"])
    assert r.exit_code != 0 and "nowhere" in r.output and "Traceback" not in r.output


def _interrupted_and_resumed(tmp_path, monkeypatch, cfg: dict, epoch: int):
    """Train ``cfg`` whole, and again interrupted when (0-based) ``epoch`` starts then resumed with the
    teachers stubbed out; assert the resume scored no teacher and ended where the whole run did."""
    import importlib

    train_module = importlib.import_module("csgguard.train")  # the module (csgguard.train is also the function)
    full = train(TrainConfig(**cfg), tmp_path / "full", progress=False)
    with ctrl_c_at_epoch(monkeypatch, epoch):
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig(**cfg), tmp_path / "part", progress=False)
    calls = []
    with monkeypatch.context() as m:
        m.setattr(train_module, "teacher_targets", lambda *a, **k: calls.append(1))
        resumed = train(TrainConfig(**cfg), tmp_path / "part", resume=True, progress=False)
    assert calls == []  # the targets came from the checkpoint, not recomputed
    assert resumed.summary["test_accuracy"] == full.summary["test_accuracy"]
    sa = load_model(tmp_path / "full").model.state_dict()
    sb = load_model(tmp_path / "part").model.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)
    return full


def test_a_resumed_distilled_run_reads_its_targets_from_the_checkpoint(tmp_path, monkeypatch, digits_std_run):
    """The teachers score the training images once per run: a resume reads their targets from the
    checkpoint and ends where an uninterrupted run ends."""
    _interrupted_and_resumed(tmp_path, monkeypatch,
                             dict(data="digits", epochs=3, seed=1, width=16, teachers=(str(digits_std_run),)), 2)


def test_distilling_from_the_first_epoch_resumes_inside_the_averaging_epochs(tmp_path, monkeypatch, digits_std_run):
    """The path of a long distilled run (benchmarks/cpu_cifar.sh with KD): teachers from the first epoch,
    then averaging epochs, interrupted in the second averaging epoch (0-based 3) and resumed: the
    targets come from the checkpoint and the average is the one an uninterrupted run makes."""
    full = _interrupted_and_resumed(tmp_path, monkeypatch, dict(data="digits", epochs=2, swa_epochs=2, seed=4, width=16,
                                                                 teachers=(str(digits_std_run),)), 3)
    assert [bool(r.get("averaged")) for r in full.history] == [False, False, True, True]
    assert full.summary["weights"] == "average of epochs 3-4"

"""The adaptive attacks (csgguard.adaptive) and the csg-robust detector (detectors/robust.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from csgguard import extract_features, load_dataset, load_model
from csgguard.adaptive import LOSSES, STRONGEST, adaptive_attack, parse_forms, step_sizes
from csgguard.detectors import build_detector
from csgguard.errors import CsgguardError
from csgguard.models.csg import ModelOutput
from csgguard.scores import SCREEN_DTYPE, as_tensors

# ----------------------------------------------------------------------------- a detector known in closed form


class _Toy(torch.nn.Module):
    """Two classes on 16 pixels: ``z1 - z0 = 2 * (sum(A) - sum(B)) - 3`` (A = first 8 pixels, B = last 8).
    At Linf 0.25 the classifier can be flipped through A alone; pooled = the pixels themselves."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.gate, self.fc = None, torch.nn.Linear(16, 2)  # what extract_features reads besides the pass

    def forward_signals(self, x):
        p = x.flatten(1)
        s = 2 * (p[:, :8].sum(1) - p[:, 8:].sum(1)) - 3 + 0 * self.dummy
        return ModelOutput(torch.stack([torch.zeros_like(s), s], 1), p, ())

    def forward(self, x):
        return self.forward_signals(x).logits


class _ToyDetector:
    """Score = how far the B pixels fell below 0.5: lowering B (what plain PGD does) is flagged."""

    name = "toy"
    threshold_ = 0.5

    def torch_score(self, logits, pooled, taps=()):
        return (4.0 - pooled[:, 8:].sum(1)).double()


def _toy_inputs(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.01 * (torch.rand(n, 1, 4, 4, generator=g) * 2 - 1)), torch.zeros(n, dtype=torch.int64)


def _evasion(adv, scores, threshold):
    return float(np.sum(adv.success & (scores <= threshold)) / max(int(adv.attacked.sum()), 1))


def test_attack_evades_a_known_detector_where_evasion_is_possible():
    """Flipping through A while keeping B is always within Linf 0.25: every image must evade. Plain PGD
    (which also lowers B) is flagged at every misclassified step, so the detector is not trivially blind
    and an attack that ignores it (or keeps a wrong iterate) fails here."""
    from csgguard.attacks import run as run_attack

    model, det = _Toy(), _ToyDetector()
    x, y = _toy_inputs()
    plain = run_attack(model, x, y, "pgd", eps=0.25, steps=20, progress=False)
    plain_scores = det.torch_score(None, torch.as_tensor(plain.x_adv).flatten(1)).numpy()
    assert plain.success.mean() == 1 and np.mean(plain_scores[plain.success] > det.threshold_) > 0.9
    adv = adaptive_attack(model, x, y, det, eps=0.25, threshold=det.threshold_, scale=1.0, steps=20,
                          weights=(1.0,))
    assert np.abs(adv.x_adv - adv.x).max() <= 0.25 + 1e-6 and adv.x_adv.min() >= 0 and adv.x_adv.max() <= 1
    scores = det.torch_score(None, torch.as_tensor(adv.x_adv).flatten(1)).numpy()
    assert _evasion(adv, scores, det.threshold_) >= 0.98
    # the best iterate is the misclassified one with the lowest score: nothing misclassified scores lower
    assert adv.meta["attack"] == "adaptive" and sum(adv.meta["best_by_form"].values()) == len(x)


@pytest.mark.parametrize("form", list(LOSSES))
def test_every_loss_form_runs_and_keeps_the_budget(form):
    model, det = _Toy(), _ToyDetector()
    x, y = _toy_inputs(12)
    adv = adaptive_attack(model, x, y, det, eps=0.25, threshold=0.5, scale=1.0, steps=10, weights=(1.0, 4.0),
                          forms=form)
    assert adv.meta["attack"] == f"adaptive-{form}" and adv.success.mean() > 0.5
    assert np.abs(adv.x_adv - adv.x).max() <= 0.25 + 1e-6


def test_forms_and_steps_are_checked():
    assert [lo.name for lo in parse_forms("strongest")] == list(STRONGEST)
    with pytest.raises(CsgguardError, match="unknown adaptive loss"):
        parse_forms("margin,nope")
    s = step_sizes(0.1, 10)
    assert s[0] == pytest.approx(0.025) and s[-1] == pytest.approx(0.001) and all(np.diff(s) < 0)
    with pytest.raises(CsgguardError, match="eps"):
        adaptive_attack(_Toy(), *_toy_inputs(4), _ToyDetector(), eps=0.0, threshold=0.5, scale=1.0)


# ----------------------------------------------------------------------------- a real detector on digits

@pytest.fixture(scope="module")
def digits(digits_csg_run):
    loaded = load_model(digits_csg_run, "cpu")
    ds = load_dataset("digits")
    model = loaded.model.eval()
    f = extract_features(model, ds.train.x())
    keep = np.flatnonzero(f.pred == ds.train.labels.numpy())
    return model, ds, f.subset(keep), ds.train.x()[keep], extract_features(model, ds.val.x())


def test_strongest_attack_beats_the_old_fixed_weight_attack(digits):
    """The old attack (unhinged detector term at fixed weights 0.5, 2, 8) hardly evades csg-clean at Linf 0.1
    on digits; the strongest attack, with one initial weight instead of three, evades far more often
    (measured: 0.076 vs 0.168 of 119 attacked images on one CPU, 0.229 vs 0.339 on another, whose bf16
    kernels train a slightly different fixture model: the margin asked is absolute, +0.05)."""
    model, ds, fit, _, val = digits
    det = build_detector("csg-clean").fit(fit).calibrate(val)
    x, y = ds.test.x()[:120], ds.test.labels[:120]
    kw = dict(eps=0.1, threshold=det.threshold_, scale=float(np.std(det.calibration_scores_)), steps=20)
    rates = {}
    for forms, weights in (("fixed", (0.5, 2.0, 8.0)), ("strongest", (2.0,))):
        adv = adaptive_attack(model, x, y, det, weights=weights, forms=forms, **kw)
        scores = det.score_samples(extract_features(model, torch.as_tensor(adv.x_adv)))
        rates[forms] = _evasion(adv, scores, det.threshold_)
    assert rates["strongest"] >= rates["fixed"] + 0.05, rates


def test_csg_robust_fits_scores_and_roundtrips(digits, tmp_path):
    """Fitted against its own attacks (tiny settings), its torch score is its score, it is calibrated on clean
    images only, saved as arrays and reloaded to the same scores; without the model it refuses to fit."""
    from csgguard.detectors.store import load_detector, save_detector

    model, ds, fit, x_fit, val = digits
    det = build_detector("csg-robust", rounds=1, steps=5, limit=150, epochs=60, hidden=16).bind_model(model)
    det.fit(fit, inputs=x_fit).calibrate(val)
    assert [h["adaptive"] for h in det.history_] == [False, True] and det.history_[1]["new_adversarial"] > 0
    assert det.needs_inputs is False and 0 < np.mean(det.calibration_scores_ > det.threshold_) <= 0.05
    x = ds.test.x()[:50].requires_grad_(True)
    out = model.forward_signals(x)
    s = det.torch_score(out.logits, out.pooled, out.taps)
    (grad,) = torch.autograd.grad(s.sum(), x)
    assert grad.abs().sum() > 0
    feats = extract_features(model, x.detach())
    # one function: the attack differentiates it in float64, screening computes it in float32 (float32
    # rounding reaches ~1e-4 relative on far-off scores of some fixture models)
    np.testing.assert_allclose(s.detach().numpy(), det.score_samples(feats), rtol=1e-3, atol=1e-5)
    s32 = det.torch_score(out.logits, out.pooled, out.taps, dtype=SCREEN_DTYPE).detach().numpy()
    np.testing.assert_allclose(s32, det.score_samples(feats), rtol=1e-6, atol=1e-6)
    path = save_detector(det, tmp_path, model_sha256="a" * 64)
    again = load_detector(tmp_path, model_sha256="a" * 64)
    np.testing.assert_array_equal(again.score_samples(feats), det.score_samples(feats))
    assert again.threshold_ == det.threshold_ and "pickle" not in json.loads(path.read_text())["arrays"]["file"]
    with pytest.raises(CsgguardError, match="bind_model"):
        build_detector("csg-robust").fit(fit)


def test_csg_robust_guard_is_the_union_with_csg_clean(digits, tmp_path):
    """With the clean guard the score is the soft maximum of the heads and a csg-clean fitted on the same clean
    images, each in its clean units; an input csg-clean finds far off is flagged whatever the heads say; guard
    'none' is the heads alone, and a state without the parameter (older files) loads as 'none'."""
    from csgguard.detectors.robust import GateRobustDetector
    from csgguard.detectors.store import load_detector, save_detector

    model, ds, fit, x_fit, val = digits
    kw = dict(rounds=0, steps=3, limit=100, epochs=40, hidden=8)
    det = build_detector("csg-robust", **kw).bind_model(model).fit(fit, inputs=x_fit).calibrate(val)
    bare = build_detector("csg-robust", guard="none", **kw).bind_model(model).fit(fit, inputs=x_fit).calibrate(val)
    assert det.guard_ is not None and bare.guard_ is None
    feats = extract_features(model, ds.test.x()[:60])
    heads = det._head_score(*as_tensors(feats, SCREEN_DTYPE), SCREEN_DTYPE).numpy()
    np.testing.assert_allclose(heads, bare.score_samples(feats), rtol=1e-6, atol=1e-6)
    hq, hs, gq, gs = det.union_
    clean_only = build_detector("csg-clean").fit(fit)
    expected = np.logaddexp((bare.score_samples(feats) - hq) / hs, (clean_only.score_samples(feats) - gq) / gs)
    np.testing.assert_allclose(det.score_samples(feats), expected, rtol=1e-5, atol=1e-5)  # float32 screening
    # an image far from every clean class (pure noise) is flagged by the union
    noise = extract_features(model, torch.rand((20, *ds.test.x().shape[1:]), generator=torch.Generator().manual_seed(0)))
    assert det.predict(noise).mean() >= clean_only.calibrate(val).predict(noise).mean() - 0.05
    assert det.predict(noise).mean() > 0.5
    save_detector(det, tmp_path, model_sha256="b" * 64)
    again = load_detector(tmp_path, model_sha256="b" * 64)
    np.testing.assert_array_equal(again.score_samples(feats), det.score_samples(feats))
    arrays, extra = bare.state()
    params = {k: v for k, v in bare.get_params().items() if k != "guard"}
    old = GateRobustDetector.from_state(params, arrays, extra)
    assert old.guard == "none" and np.array_equal(old.score_samples(feats), bare.score_samples(feats))
    with pytest.raises(CsgguardError, match="unknown guard"):
        build_detector("csg-robust", guard="lid").bind_model(model).fit(fit, inputs=x_fit)


def test_csg_robust_cross_fitted_units_match_unseen_clean_images(digits):
    """Heads that fit their clean images closely score those images lower than clean images they never
    saw, so an operating point set on in-sample clean scores over-flags unseen clean images; units="cross-fit"
    takes each part's clean units from out-of-fold scores, and its fit operating point over-flags them less.
    Measured on the 827 val+test images over six fixture models (seeds 0-4 on one thread, seed 0 on two):
    realised FPR 0.156-0.198 in-sample vs 0.115-0.157 cross-fit, a gap of 0.03-0.07 every time. (The heads'
    95% quantile alone, on 108 val images, is too noisy to order the two.) Folds are stratified by predicted
    class; an unknown value is refused; files without the parameter load as in-sample."""
    from csgguard.detectors.base import stratified_folds
    from csgguard.detectors.robust import UNIT_FOLDS, GateRobustDetector

    model, ds, fit, x_fit, val = digits
    folds = stratified_folds(fit.pred, UNIT_FOLDS, np.random.default_rng(0))
    for c in np.unique(fit.pred):
        counts = np.bincount(folds[fit.pred == c], minlength=UNIT_FOLDS)
        assert counts.max() - counts.min() <= 1
    kw = dict(rounds=0, steps=3, limit=100, epochs=300, hidden=64, weight_decay=0.0, lr=0.03)
    dets = {u: build_detector("csg-robust", units=u, **kw).bind_model(model).fit(fit, inputs=x_fit)
            for u in ("in-sample", "cross-fit")}
    np.testing.assert_array_equal(dets["in-sample"].w1_, dets["cross-fit"].w1_)  # the same heads either way
    unseen = [val, extract_features(model, ds.test.x())]
    fpr = {u: float(np.mean(np.concatenate([d.score_samples(f) for f in unseen]) > d.fit_threshold_))
           for u, d in dets.items()}
    assert fpr["in-sample"] > 0.05 and fpr["cross-fit"] < fpr["in-sample"] - 0.015, fpr
    arrays, extra = dets["in-sample"].state()
    params = {k: v for k, v in dets["in-sample"].get_params().items() if k != "units"}
    assert GateRobustDetector.from_state(params, arrays, extra).units == "in-sample"
    with pytest.raises(CsgguardError, match="unknown units"):
        build_detector("csg-robust", units="oracle").bind_model(model).fit(fit, inputs=x_fit)


def test_csg_robust_head_fpr_moves_the_heads_zero_and_leaves_the_guard(digits):
    """``head_fpr`` puts the heads' clean zero at their ``1 - head_fpr`` clean quantile instead of the
    ``1 - fpr`` one: the heads are the same, the guard's units are the same, and on every clean image the
    guard's term wins at least wherever it won before (the false-positive budget moves toward the guard).
    ``None`` is ``fpr``; a value outside (0, 1) is refused before any work."""
    model, ds, fit, x_fit, val = digits
    # heads large enough that no class's head is constant on its clean images (tiny ones can be)
    kw = dict(rounds=0, steps=3, limit=100, epochs=300, hidden=64, weight_decay=0.0, lr=0.03, units="in-sample")
    base = build_detector("csg-robust", **kw).bind_model(model).fit(fit, inputs=x_fit)
    low = build_detector("csg-robust", head_fpr=0.01, **kw).bind_model(model).fit(fit, inputs=x_fit)
    same = build_detector("csg-robust", head_fpr=0.05, **kw).bind_model(model).fit(fit, inputs=x_fit)
    np.testing.assert_array_equal(base.w1_, low.w1_)
    heads_fit = base._head_score(*as_tensors(fit)).numpy()
    assert low.union_[0] == pytest.approx(np.quantile(heads_fit, 0.99))
    assert base.union_[0] == pytest.approx(np.quantile(heads_fit, 0.95)) and low.union_[0] > base.union_[0]
    assert low.union_[1:] == base.union_[1:] and same.union_ == base.union_

    def guard_wins(det):
        rows = as_tensors(val)
        hq, hs, gq, gs = det.union_
        h = (det._head_score(*rows).numpy() - hq) / hs
        g = (det.guard_.torch_score(*rows).numpy() - gq) / gs
        return g > h

    assert np.all(guard_wins(low) >= guard_wins(base)) and guard_wins(low).sum() > guard_wins(base).sum()
    for bad in (0, 1, -0.1, "0.01", True):
        with pytest.raises(CsgguardError, match="head_fpr"):
            build_detector("csg-robust", head_fpr=bad).bind_model(model).fit(fit, inputs=x_fit)


def test_cli_attack_adaptive_saves_a_set_against_the_run_detector(fitted_run):
    from click.testing import CliRunner

    from csgguard.attacks import load_adversarial_set
    from csgguard.cli import main

    out = fitted_run.parent / "adaptive.npz"
    r = CliRunner().invoke(main, ["attack", "--method", "adaptive-margin", "--run", str(fitted_run), "--eps", "0.1",
                                  "--limit", "30", "--steps", "3", "--out", str(out), "--format", "json",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    adv = load_adversarial_set(out)
    assert adv.meta["attack"] == "adaptive-margin" and adv.meta["target_detector"] == "csg-clean"
    assert 0 <= adv.meta["evaded"] <= adv.meta["succeeded"] and np.abs(adv.x_adv - adv.x).max() <= 0.1 + 1e-6
    r = CliRunner().invoke(main, ["attack", "--method", "adaptive-nope", "--run", str(fitted_run)])
    assert r.exit_code != 0 and "unknown adaptive loss" in r.output


def test_cli_fit_csg_robust_trains_against_itself(digits_csg_run, tmp_path):
    """`csgguard fit --detector csg-robust` hands the detector the model and the fit images."""
    from click.testing import CliRunner

    from csgguard.cli import main
    from csgguard.detectors.store import load_detector
    from csgguard.models.store import load_model

    out = tmp_path / "robust"
    r = CliRunner().invoke(main, ["fit", "--run", str(digits_csg_run), "--detector", "csg-robust", "--limit", "200",
                                  "--param", "rounds=1", "--param", "steps=3", "--param", "epochs=30",
                                  "--out", str(out), "--format", "json", "--no-progress"])
    assert r.exit_code == 0, r.output
    det = load_detector(out, model_sha256=load_model(digits_csg_run).sha256)
    assert det.name == "csg-robust" and np.isfinite(det.threshold_)

"""Gate detectors on arrays: shapes, calibration, persistence, refusal of foreign or altered files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from csgguard import (
    ArtifactError,
    CsgguardError,
    Features,
    extract_features,
    load_dataset,
    load_model,
)
from csgguard.detectors import NotFittedError, build_detector
from csgguard.detectors.gate import (
    CLEAN_SCORES,
    GateCleanDetector,
    GateSupervisedDetector,
    pseudo_gate,
)
from csgguard.detectors.store import detector_paths, load_detector, save_detector
from csgguard.metrics import auroc


def _clean(model, split):
    f = extract_features(model, split.x())
    return f.subset(np.flatnonzero(f.pred == split.labels.numpy()))


def _features(run):
    loaded = load_model(run)
    ds = load_dataset("digits")
    feats = {name: _clean(loaded.model, getattr(ds, name)) for name in ("train", "val", "test")}
    return loaded, ds, feats


@pytest.fixture(scope="module")
def csg(digits_csg_run):
    return _features(digits_csg_run)


@pytest.fixture(scope="module")
def std(digits_std_run):
    return _features(digits_std_run)


@pytest.fixture(scope="module")
def csg_adv(csg):
    """Successful FGSM examples (eps 0.15) from train and test images, via the attacks API."""
    from csgguard.attacks import run

    loaded, ds, _ = csg
    out = {}
    for split in ("train", "test"):
        s = getattr(ds, split)
        adv = run(loaded, s.x()[:300], s.labels[:300], "fgsm", eps=0.15, progress=False).successful()
        out[split] = extract_features(loaded.model, torch.as_tensor(adv.x_adv))
    assert len(out["train"]) >= 30 and len(out["test"]) >= 30
    return out


@pytest.mark.parametrize("score", CLEAN_SCORES)
def test_clean_detector_shapes_and_predict(csg, score):
    _, _, f = csg
    det = GateCleanDetector(score=score).fit(f["train"]).calibrate(f["val"])
    s = det.score_samples(f["test"])
    assert s.shape == (len(f["test"]),) and np.isfinite(s).all()
    p = det.predict(f["test"])
    assert p.shape == s.shape and set(np.unique(p)) <= {0, 1}
    np.testing.assert_allclose(det.decision_function(f["test"]), s - det.threshold_)
    assert 0.0 < p.mean() < 0.5  # clean images: some false positives, far from all flagged


def test_realised_fpr_on_heldout_clean_near_target(csg):
    _, _, f = csg
    det = GateCleanDetector(fpr=0.1).fit(f["train"]).calibrate(f["val"])
    realised = float(det.predict(f["test"]).mean())  # test split: used by neither fit nor calibrate
    assert 0.1 / 2 <= realised <= 0.1 * 2, realised


def test_clean_detector_separates_adversarial(csg, csg_adv):
    _, _, f = csg
    det = GateCleanDetector().fit(f["train"]).calibrate(f["val"])
    assert auroc(det.score_samples(f["test"]), det.score_samples(csg_adv["test"])) > 0.85
    # the one-sided mismatch share is kept selectable but is a weaker score (docs/method.md section 3)
    weak = GateCleanDetector(score="mismatch").fit(f["train"])
    assert auroc(weak.score_samples(f["test"]), weak.score_samples(csg_adv["test"])) < \
        auroc(det.score_samples(f["test"]), det.score_samples(csg_adv["test"]))


def test_supervised_detector(csg, csg_adv):
    _, _, f = csg
    det = GateSupervisedDetector().fit(f["train"], csg_adv["train"]).calibrate(f["val"])
    assert det.coef_.shape == (det.feature_matrix(f["test"]).shape[1],)
    assert auroc(det.score_samples(f["test"]), det.score_samples(csg_adv["test"])) > 0.85
    assert det.predict(csg_adv["test"]).mean() > 0.5
    with pytest.raises(CsgguardError, match="supervised"):
        GateSupervisedDetector().fit(f["train"])


def test_std_model_uses_pseudo_gate(std):
    _, _, f = std
    det = GateCleanDetector().fit(f["train"]).calibrate(f["val"])
    assert det.gate_source_ == "pseudo" and det.gate_.shape == (f["train"].num_filters, 10)
    assert np.allclose(det.gate_.max(1), 1.0) and det.gate_.min() >= 0
    assert det.predict(f["test"]).mean() < 0.5
    with pytest.raises(CsgguardError, match="CSG model"):
        GateCleanDetector(gate="model").fit(f["train"])


def test_pseudo_gate_is_row_max_normalised():
    rng = np.random.default_rng(0)
    a = rng.random((40, 6))
    g = pseudo_gate(a, np.arange(40) % 4, 4)
    assert g.shape == (6, 4) and np.allclose(g.max(1), 1)


def test_errors_before_fit_and_on_foreign_features(csg):
    _, _, f = csg
    with pytest.raises(NotFittedError):
        GateCleanDetector().score_samples(f["test"])
    det = GateCleanDetector().fit(f["train"])
    with pytest.raises(NotFittedError, match="calibrated"):
        det.predict(f["test"])
    other = Features(f["test"].logits, f["test"].pooled[:, :5], None, f["test"].fc_weight[:, :5], f["test"].fc_bias)
    with pytest.raises(CsgguardError, match="K=5"):
        det.score_samples(other)
    with pytest.raises(CsgguardError, match="unknown score"):
        GateCleanDetector(score="nope").fit(f["train"])


@pytest.mark.parametrize("name", ["csg-clean", "csg-supervised"])
def test_save_load_round_trip(tmp_path, csg, csg_adv, name):
    loaded, _, f = csg
    det = build_detector(name, fpr=0.05)
    det.fit(f["train"], csg_adv["train"] if det.supervised else None).calibrate(f["val"])
    path = save_detector(det, tmp_path, model_sha256=loaded.sha256, extra_meta={"fitted_on": {"split": "train"}})
    manifest = json.loads(path.read_text())
    assert manifest["name"] == name and manifest["model_sha256"] == loaded.sha256
    assert manifest["threshold"] == det.threshold_ and manifest["fitted_on"] == {"split": "train"}
    back = load_detector(tmp_path, model_sha256=loaded.sha256)
    assert type(back) is type(det) and back.get_params() == det.get_params()
    np.testing.assert_array_equal(back.score_samples(f["test"]), det.score_samples(f["test"]))
    assert back.threshold_ == det.threshold_


def test_load_refuses_tampered_or_foreign(tmp_path, csg):
    loaded, _, f = csg
    det = GateCleanDetector().fit(f["train"]).calibrate(f["val"])
    save_detector(det, tmp_path / "d.json", model_sha256=loaded.sha256)
    with pytest.raises(ArtifactError, match="belongs to model"):
        load_detector(tmp_path / "d.json", model_sha256="0" * 64)
    _, arrays = detector_paths(tmp_path / "d.json")
    data = bytearray(arrays.read_bytes())
    data[-3] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_detector(tmp_path / "d.json", model_sha256=loaded.sha256)
    with pytest.raises(ArtifactError, match="not found"):
        load_detector(tmp_path / "missing", model_sha256=loaded.sha256)


@pytest.mark.parametrize("score", ["classcov-margin", "maha-margin", "classcov", "mahalanobis", "combined"])
def test_adaptive_surrogate_equals_numpy_score(csg, score):
    """The adaptive attack's torch rewrite must be the detector's score (else the attack is not exact)."""
    from csgguard.adaptive import gate_clean_surrogate

    loaded, ds, f = csg
    det = GateCleanDetector(score=score).fit(f["train"])
    model = loaded.model.eval()
    with torch.no_grad():
        logits, pooled = model.forward_features(ds.test.x()[:200])
        torch_scores = gate_clean_surrogate(det, model)(logits, pooled).double().numpy()
    feats = Features(logits.numpy(), pooled.numpy(), f["test"].gate, f["test"].fc_weight, f["test"].fc_bias)
    np.testing.assert_allclose(torch_scores, det.score_samples(feats), rtol=1e-3, atol=1e-3)


def test_two_sided_score_flags_boundary_inputs(csg):
    """classcov-margin: a clean pattern whose top-2 logits tie is flagged though the pattern is typical."""
    _, _, f = csg
    det = GateCleanDetector(score="classcov-margin").fit(f["train"]).calibrate(f["val"])
    plain = GateCleanDetector(score="classcov").fit(f["train"]).calibrate(f["val"])
    t = f["test"]
    typical = np.flatnonzero(plain.score_samples(t) < np.median(plain.score_samples(t)))
    z = t.logits[typical].copy()
    order = np.argsort(-z, 1)
    rows = np.arange(len(z))
    z[rows, order[:, 1]] = z[rows, order[:, 0]] - 1e-4  # same argmax, margin ~0
    tied = Features(z, t.pooled[typical], t.gate, t.fc_weight, t.fc_bias)
    assert plain.predict(tied).mean() == 0  # the pattern distance alone does not see it
    assert det.predict(tied).mean() == 1    # the boundary half of the two-sided score does
    # and it is the max of the two z-scores: never below the pattern half
    comps = det._two_sided_components(t)
    zc = (comps[:, 1] - det.twosided_center_[1]) / det.twosided_scale_[1]
    assert np.all(det.score_samples(t) >= zc - 1e-12)


def test_detector_saved_without_new_arrays_still_loads(tmp_path, csg):
    """Files written before class_precision_ / twosided_* existed load; only the scores needing them refuse."""
    loaded, _, f = csg
    det = GateCleanDetector(score="mahalanobis").fit(f["train"]).calibrate(f["val"])
    arrays, extra = det.state()
    old = {k: v for k, v in arrays.items() if k not in GateCleanDetector.OPTIONAL_ARRAYS}
    back = GateCleanDetector.from_state({"score": "mahalanobis", "gate": "auto", "fpr": 0.05}, old, extra)
    np.testing.assert_array_equal(back.score_samples(f["test"]), det.score_samples(f["test"]))
    newer = GateCleanDetector.from_state({"score": "classcov-margin", "gate": "auto", "fpr": 0.05}, old, extra)
    with pytest.raises(CsgguardError, match="refit"):
        newer.score_samples(f["test"])
    bad = {**arrays, "twosided_center_": np.zeros(5)}
    with pytest.raises(CsgguardError, match="twosided_center_"):
        GateCleanDetector.from_state({"score": "classcov-margin", "gate": "auto", "fpr": 0.05}, bad, extra)


@pytest.mark.parametrize("score", ["classcov-margin", "mahalanobis"])
def test_score_does_not_depend_on_batch_composition(csg, score):
    """Screening shards must equal one run bit for bit: a row's score is the same alone or in any batch."""
    _, _, f = csg
    det = GateCleanDetector(score=score).fit(f["train"])
    t = f["test"]
    whole = det.score_samples(t)
    for rows in ([0], [3], [0, 1], list(range(5, 12)), list(range(40, 120, 3))):
        np.testing.assert_array_equal(det.score_samples(t.subset(np.array(rows))), whole[rows])

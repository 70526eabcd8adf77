"""Same-harness baselines: fit / score / state round trip on arrays, and a real signal."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from csgguard.detectors import build_detector, detector_class
from csgguard.errors import CsgguardError
from csgguard.features import Features
from csgguard.metrics import auroc

K, C = 16, 4


def _features(n: int, rng: np.random.Generator, adversarial: bool = False) -> Features:
    """Class clusters in pooled space; 'adversarial' points sit between clusters (off-manifold)."""
    w = np.eye(C, K) * 3.0
    y = rng.integers(0, C, n)
    centres = np.random.default_rng(123).normal(0, 1, (C, K)) * 4  # fixed class centres
    pooled = centres[y] + rng.normal(0, 1, (n, K))
    if adversarial:
        other = (y + 1) % C
        pooled = 0.45 * centres[y] + 0.55 * centres[other] + rng.normal(0, 1.5, (n, K))
    logits = pooled @ (centres / 4).T
    return Features(logits.astype(np.float32), pooled.astype(np.float32), None, w.astype(np.float32),
                    np.zeros(C, np.float32))


def _roundtrip(det):
    """Arrays through safetensors bytes, extras through JSON: no pickle anywhere."""
    arrays, extra = det.state()
    arrays = st_load(st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()})) if arrays else {}
    extra = json.loads(json.dumps(extra))
    params = json.loads(json.dumps(det.get_params()))
    return type(det).from_state(params, arrays, extra)


@pytest.mark.parametrize("name,params", [("mahalanobis", {}), ("mahalanobis", {"mode": "pred"}),
                                         ("lid", {"k": 10}), ("kd-bu", {"passes": 20})])
def test_array_baseline_fit_score_roundtrip(name, params):
    rng = np.random.default_rng(0)
    fit_c, fit_a = _features(300, rng), _features(200, rng, adversarial=True)
    cal, ev_c, ev_a = _features(200, rng), _features(200, rng), _features(200, rng, adversarial=True)
    det = build_detector(name, **params)
    det.fit(fit_c, fit_a if det.supervised else None).calibrate(cal)
    clean, adv = det.score_samples(ev_c), det.score_samples(ev_a)
    assert clean.shape == (200,) and np.isfinite(clean).all() and np.isfinite(adv).all()
    assert auroc(clean, adv) > 0.9, "off-manifold points must score higher than clean ones"
    assert 0.0 <= (clean > det.threshold_).mean() <= 0.15
    det2 = _roundtrip(det)
    np.testing.assert_allclose(det2.score_samples(ev_a), adv, rtol=1e-10, atol=1e-10)
    assert det2.threshold_ == det.threshold_


@pytest.mark.parametrize("name,params", [("mahalanobis", {}), ("lid", {"k": 10}), ("kd-bu", {"passes": 20})])
def test_array_baseline_score_is_the_inputs_own(name, params):
    """Screening scores a folder batch by batch: an input's score must not depend on which other
    inputs share its batch, nor on its place in it (kd-bu's dropout masks once drew per row)."""
    rng = np.random.default_rng(4)
    det = build_detector(name, **params)
    det.fit(_features(300, rng), _features(200, rng, adversarial=True) if det.supervised else None)
    test = _features(60, rng, adversarial=True)
    whole = det.score_samples(test)
    for rows in ([0], [7], [3, 2, 1], list(range(10, 60, 4)), list(range(59, -1, -1))):
        np.testing.assert_allclose(det.score_samples(test.subset(np.array(rows))), whole[rows], rtol=1e-9,
                                   atol=1e-9)


@pytest.mark.parametrize("name,cut", [("mahalanobis", "means"), ("mahalanobis", "precision"), ("lid", "ref_logits"),
                                      ("lid", "lr_coef"), ("kd-bu", "ref"), ("kd-bu", "feat_scale")])
def test_array_baseline_with_arrays_that_do_not_fit_together_is_refused_on_loading(name, cut):
    """Hash-valid arrays that disagree in shape (one cut to 5 columns) are refused by name when the
    detector is loaded, not met as a numpy / scikit-learn error on the first image it scores."""
    rng = np.random.default_rng(5)
    det = build_detector(name, **({"passes": 5} if name == "kd-bu" else {}))
    det.fit(_features(120, rng), _features(80, rng, adversarial=True) if det.supervised else None)
    arrays, extra = det.state()
    bad = {**arrays, cut: arrays[cut][..., :3] if arrays[cut].ndim > 1 or arrays[cut].size > 3 else arrays[cut][:1]}
    assert np.shape(bad[cut]) != np.shape(arrays[cut])
    try:  # refused on loading where the arrays disagree among themselves ...
        loaded = type(det).from_state(json.loads(json.dumps(det.get_params())), bad, extra)
    except CsgguardError as exc:
        assert re.search(r"array \w+ has shape .* expected", str(exc)), exc
        return
    with pytest.raises(CsgguardError, match="fitted for K="):  # ... else where they disagree with the features
        loaded.score_samples(_features(10, rng))


def test_supervised_baselines_need_adversarial():
    rng = np.random.default_rng(1)
    for name in ("lid", "kd-bu"):
        assert detector_class(name).supervised
        with pytest.raises(CsgguardError, match="is supervised: it needs adversarial examples"):
            build_detector(name).fit(_features(50, rng))


def test_lid_estimates_intrinsic_dimension():
    from csgguard.detectors.lid import lid_mle

    rng = np.random.default_rng(2)
    ref2 = np.c_[rng.normal(size=(2000, 2)), np.zeros((2000, 8))]    # a 2-d plane in 10-d
    ref6 = np.c_[rng.normal(size=(2000, 6)), np.zeros((2000, 4))]    # a 6-d subspace
    q2, q6 = ref2[:100] * 0.5, ref6[:100] * 0.5
    assert lid_mle(q2, ref2, 20).mean() < lid_mle(q6, ref6, 20).mean()
    assert 1.0 < np.median(lid_mle(q2, ref2, 20)) < 3.5


def test_kd_bandwidth_chosen_on_fit_data_only():
    rng = np.random.default_rng(3)
    fit_c, fit_a = _features(200, rng), _features(100, rng, adversarial=True)
    det = build_detector("kd-bu", passes=5).fit(fit_c, fit_a)
    h = det.bandwidth_
    det.score_samples(_features(100, rng, adversarial=True))
    assert det.bandwidth_ == h and h > 0
    assert build_detector("kd-bu", passes=5, bandwidth=0.7).fit(fit_c, fit_a).bandwidth_ == 0.7


def test_too_few_clean_fit_images_is_a_clear_error():
    """One clean image per predicted class leaves kd-bu no pair to choose a bandwidth from, and lid no
    neighbour: both were internal errors (``csgguard fit --limit 2``)."""
    rng = np.random.default_rng(4)
    clean, adv = _features(40, rng), _features(20, rng, adversarial=True)
    one_each = clean.subset(np.array([np.flatnonzero(clean.pred == c)[0] for c in np.unique(clean.pred)]))
    with pytest.raises(CsgguardError, match="kd-bu: no predicted class has two"):
        build_detector("kd-bu", passes=2).fit(one_each, adv)
    assert build_detector("kd-bu", passes=2, bandwidth=1.0).fit(one_each, adv).bandwidth_ == 1.0
    with pytest.raises(CsgguardError, match="lid: 1 clean fit image is too few"):
        build_detector("lid").fit(clean.subset(np.array([0])), adv)


def test_feature_squeezing_median_sizes_are_checked_first():
    """A median size is checked before any work (fit's validate_params), and against the images before
    any model pass: a window wider than the image is one clear line, not torch's padding error."""
    from csgguard.detectors.squeeze import FeatureSqueezingDetector

    for bad in ([0], [1], [2.5], [True]):
        with pytest.raises(CsgguardError, match="median sizes must be integers >= 2"):
            FeatureSqueezingDetector(median=bad).validate_params()
    det = FeatureSqueezingDetector(median=[9]).bind_model(torch.nn.Flatten())
    rng = np.random.default_rng(6)
    with pytest.raises(CsgguardError, match="median size 9 is larger than the 8x8 images"):
        det.fit(_features(20, rng), inputs=torch.rand(20, 1, 8, 8))


def test_squeezers_and_median():
    from csgguard.detectors.squeeze import median_smooth, reduce_bit_depth

    x = torch.rand(2, 1, 8, 8)
    assert set(reduce_bit_depth(x, 1).unique().tolist()) <= {0.0, 1.0}
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0  # an isolated speck vanishes under a 3x3 median
    assert median_smooth(x, 3).abs().max() == 0
    assert median_smooth(torch.ones(1, 3, 4, 4), 2).shape == (1, 3, 4, 4)


@pytest.fixture(scope="module")
def digits_model(digits_csg_run):
    from csgguard import load_dataset, load_model

    loaded = load_model(digits_csg_run)
    ds = load_dataset("digits")
    return loaded.model, ds.test.x()[:120]


def test_feature_squeezing_needs_model_and_roundtrip(digits_model):
    from csgguard import extract_features

    model, x = digits_model
    feats = extract_features(model, x)
    det = build_detector("feature-squeezing")
    assert det.needs_inputs
    det.fit(feats.subset(np.arange(40)))
    with pytest.raises(CsgguardError, match="feature-squeezing needs the model"):
        det.score_samples(feats)
    det.bind_model(model).calibrate(feats.subset(np.arange(40, 120)), inputs=x[40:120])
    s = det.score_samples(feats, inputs=x)
    assert s.shape == (120,) and (s >= 0).all() and (s <= 2).all()
    noisy = (x + 0.5 * torch.rand_like(x)).clamp(0, 1)
    assert det.score_samples(extract_features(model, noisy), inputs=noisy).mean() > s.mean()
    det2 = _roundtrip(det).bind_model(model)
    np.testing.assert_allclose(det2.score_samples(feats, inputs=x), s)


def test_mahalanobis_preprocessing_uses_inputs(digits_model):
    from csgguard import extract_features

    model, x = digits_model
    feats = extract_features(model, x)
    plain = build_detector("mahalanobis").fit(feats)
    assert not plain.needs_inputs
    pre = build_detector("mahalanobis", noise=0.01).fit(feats).bind_model(model)
    assert pre.needs_inputs
    s_plain, s_pre = plain.score_samples(feats), pre.score_samples(feats, inputs=x)
    assert not np.allclose(s_plain, s_pre)
    assert s_pre.mean() < s_plain.mean()  # the step moves inputs towards their closest class
    with pytest.raises(CsgguardError, match="noise > 0 needs the model"):
        build_detector("mahalanobis", noise=0.01).fit(feats).score_samples(feats)


BASELINES = ["mahalanobis", "lid", "kd-bu", "feature-squeezing"]


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_are_scikit_learn_estimators(name):
    from sklearn.base import BaseEstimator, clone

    det = build_detector(name, fpr=0.1)
    assert isinstance(det, BaseEstimator)
    params = det.get_params(deep=True)
    assert params == det.get_params(deep=False) and params["fpr"] == 0.1
    copy = clone(det)  # refuses estimators whose __init__ alters its parameters
    assert copy is not det and copy.get_params() == params
    assert copy.set_params(fpr=0.2) is copy and copy.fpr == 0.2 and det.fpr == 0.1


@pytest.mark.parametrize("name, bad", [("mahalanobis", {"mode": "max"}), ("mahalanobis", {"noise": -1.0}),
                                       ("mahalanobis", {"shrinkage": 2.0}), ("lid", {"k": 0}),
                                       ("kd-bu", {"dropout": 1.0}), ("kd-bu", {"passes": 0}),
                                       ("feature-squeezing", {"bits": 9}), ("lid", {"fpr": 1.5})])
def test_parameters_are_stored_untouched_and_validated_in_fit(name, bad):
    rng = np.random.default_rng(4)
    det = build_detector(name, **bad)  # __init__ only stores
    key, value = next(iter(bad.items()))
    assert getattr(det, key) == value
    with pytest.raises(CsgguardError, match=f"{key}"):
        det.fit(_features(60, rng), _features(40, rng, adversarial=True))


def test_threshold_is_the_only_cut_no_offset():
    """Scores are higher = more adversarial, so scikit-learn's offset_ (higher = normal) is not set."""
    rng = np.random.default_rng(5)
    det = build_detector("mahalanobis").fit(_features(200, rng)).calibrate(_features(200, rng))
    assert hasattr(det, "threshold_") and not hasattr(det, "offset_")
    f = _features(50, rng)
    np.testing.assert_allclose(det.decision_function(f), det.score_samples(f) - det.threshold_)
    assert not hasattr(_roundtrip(det), "offset_")


def test_lid_neighbours_match_a_brute_force_search():
    from csgguard.detectors.lid import lid_mle

    rng = np.random.default_rng(6)
    ref, q, k = rng.normal(size=(300, 5)), rng.normal(size=(40, 5)), 10

    def brute(d):
        d = np.maximum(d, 1e-12)
        return -1.0 / np.log(d / d[:, -1:]).mean(1)

    d = np.sqrt(((q[:, None] - ref[None]) ** 2).sum(-1))
    np.testing.assert_allclose(lid_mle(q, ref, k), brute(np.sort(d, 1)[:, :k]), rtol=1e-9)
    d_self = np.sqrt(((ref[:, None] - ref[None]) ** 2).sum(-1))
    np.testing.assert_allclose(lid_mle(None, ref, k), brute(np.sort(d_self, 1)[:, 1:k + 1]), rtol=1e-9)


def test_logistic_pipeline_exports_arrays_that_score_like_the_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from csgguard.detectors.logistic import fit_logistic_pipeline, logistic_decision

    rng = np.random.default_rng(7)
    x = np.c_[rng.normal(size=(200, 3)) * [1, 10, 0.1], np.ones(200)]  # a constant column too
    y = (x[:, 0] + 0.1 * x[:, 1] + rng.normal(size=200) > 0).astype(int)
    arrays = fit_logistic_pipeline(x, y, C=0.5, seed=0)
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000, random_state=0)).fit(x, y)
    np.testing.assert_allclose(logistic_decision(arrays, x), ref.decision_function(x), rtol=1e-10)


def test_mahalanobis_covariance_is_ledoit_wolf():
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(8)
    f = _features(300, rng)
    det = build_detector("mahalanobis").fit(f)
    pooled, pred = np.asarray(f.pooled, np.float64), f.pred
    centred = np.concatenate([pooled[pred == c] - pooled[pred == c].mean(0) for c in np.unique(pred)])
    np.testing.assert_allclose(det.precision_, LedoitWolf(assume_centered=True).fit(centred).precision_,
                               rtol=1e-8)


def test_a_non_finite_calibration_threshold_is_refused_with_its_reason():
    """Mahalanobis scores a predicted class it never saw in fit as inf; when those reach the threshold's
    quantile the error must say so at calibration, not later as a broken detector file."""
    rng = np.random.default_rng(0)
    fit = _features(200, rng)
    fit = fit.subset(np.flatnonzero(fit.pred != 0))  # class 0 never predicted in fit
    det = build_detector("mahalanobis", mode="pred").fit(fit)
    calib = _features(200, rng)
    with pytest.raises(CsgguardError, match=r"clean calibration scores are not finite"):
        det.calibrate(calib)


def test_a_detector_that_scores_every_clean_image_alike_is_refused_at_calibration():
    """Mahalanobis fitted on too few images scored every image 0: a threshold of 0 then flagged nothing,
    silently. A calibration whose scores do not vary is an error that says so."""
    from csgguard.detectors.base import Detector

    class Flat(Detector):
        name = "flat"

        def _fit(self, clean, adversarial=None, *, inputs=None, adversarial_inputs=None):
            pass

        def score_samples(self, features, *, inputs=None):
            return np.zeros(len(features))

    rng = np.random.default_rng(0)
    det = Flat().fit(_features(50, rng))
    with pytest.raises(CsgguardError, match="same score .* separates nothing"):
        det.calibrate(_features(100, rng))

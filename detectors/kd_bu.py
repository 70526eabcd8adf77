"""Kernel density + Bayesian uncertainty baseline (Feinman et al., 2017).

* KD: a Gaussian kernel density of the (standardised) pooled gated-layer features of
  clean fit samples of the *predicted* class, evaluated at the input's features;
  adversarial inputs tend to sit in low-density regions of their (wrong) class.
  The bandwidth is chosen on the fit data only, by leave-one-out log-likelihood
  over a grid of multiples of the median nearest-neighbour distance.
* BU: Monte-Carlo dropout variance of the softmax. This backbone has no dropout,
  so -- our documented choice -- dropout (rate ``dropout``) is applied to the pooled
  features in front of the linear classifier, in ``passes`` stochastic passes of the
  fc layer only (numpy, no extra backbone pass). The masks are seeded and drawn once per
  pass for all inputs alike (one dropout sub-network per pass), so an input's score is
  reproducible and never depends on which other inputs share its batch.
* A logistic regression on the standardised (log KD, BU) pair separates clean from
  adversarial fit samples (supervised, as in the paper; the one scikit-learn
  pipeline of :mod:`csgguard.detectors.logistic`). Kernel sums use SciPy's
  ``logsumexp`` over scikit-learn's squared ``euclidean_distances``.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.utils._param_validation import Interval

from ..errors import CsgguardError
from ..features import Features
from .base import Detector, check_array_shapes
from .logistic import fit_logistic_pipeline, load_pipeline_arrays, logistic_decision


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from sklearn.metrics.pairwise import euclidean_distances

    return euclidean_distances(a, b, squared=True)


class KDBUDetector(Detector):
    name = "kd-bu"
    supervised = True
    _parameter_constraints = {
        **Detector._parameter_constraints,
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "passes": [Interval(Integral, 1, None, closed="left")],
        "bandwidth": [None, Interval(Real, 0, None, closed="neither")],
        "c": [Interval(Real, 0, None, closed="neither")],
        "seed": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, *, fpr: float = 0.05, dropout: float = 0.5, passes: int = 50,
                 bandwidth: float | None = None, c: float = 1.0, seed: int = 0) -> None:
        super().__init__(fpr=fpr)
        self.dropout = dropout
        self.passes = passes
        self.bandwidth = bandwidth
        self.c = c
        self.seed = seed

    # -- the two signals -----------------------------------------------------
    def _standardise(self, pooled: np.ndarray) -> np.ndarray:
        return (np.asarray(pooled, np.float64) - self.feat_mean_) / self.feat_scale_

    def _log_kd(self, features: Features) -> np.ndarray:
        f = self._standardise(features.pooled)
        pred = features.pred
        out = np.full(len(f), -1e6)
        h = self.bandwidth_
        for c in np.unique(pred):
            ref = self.ref_[self.ref_class_ == c]
            rows = np.flatnonzero(pred == c)
            if len(ref) == 0:
                continue
            out[rows] = logsumexp(-_sq_dists(f[rows], ref) / (2 * h * h), 1) - np.log(len(ref))
        return out

    def _bu(self, features: Features) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        a = np.asarray(features.pooled, np.float64)
        w, b = np.asarray(features.fc_weight, np.float64), np.asarray(features.fc_bias, np.float64)
        keep = 1.0 - self.dropout
        sq_sum = np.zeros(len(a))
        mean = np.zeros((len(a), len(b)))
        # one mask per pass over the K features, the same for every row: a row's score is its own
        masks = rng.random((self.passes, a.shape[1])) < keep
        for mask in masks:
            p = softmax((a * mask / keep) @ w.T + b, axis=-1)
            sq_sum += (p * p).sum(1)
            mean += p
        mean /= self.passes
        return sq_sum / self.passes - (mean * mean).sum(1)

    def _signals(self, features: Features) -> np.ndarray:
        return np.stack([self._log_kd(features), self._bu(features)], 1)

    # -- fit ------------------------------------------------------------------
    def _choose_bandwidth(self, f: np.ndarray, cls: np.ndarray) -> float:
        """Leave-one-out log-likelihood of the clean fit features, per class, over a grid."""
        d2_by_class = [_sq_dists(f[cls == c], f[cls == c]) for c in np.unique(cls) if (cls == c).sum() > 1]
        if not d2_by_class:
            raise CsgguardError(f"kd-bu: no predicted class has two of the {len(f)} clean fit images; choosing the "
                                "kernel bandwidth needs a pair (raise --limit, or set --param bandwidth=X)")
        nn = np.concatenate([np.sqrt(np.sort(d2, 1)[:, 1]) for d2 in d2_by_class])
        base = float(np.median(nn)) or 1.0
        dim = f.shape[1]
        best, best_ll = base, -np.inf
        for mult in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0):
            h = base * mult
            ll = 0.0
            for d2 in d2_by_class:
                logk = -d2 / (2 * h * h)
                np.fill_diagonal(logk, -np.inf)
                ll += float((logsumexp(logk, 1) - np.log(len(d2) - 1) - dim * np.log(h)).sum())
            if ll > best_ll:
                best, best_ll = h, ll
        return best

    def _fit(self, clean: Features, adversarial: Features | None, *, inputs=None, adversarial_inputs=None) -> None:
        pooled = np.asarray(clean.pooled, np.float64)
        self.feat_mean_ = pooled.mean(0)
        scale = pooled.std(0)
        scale[scale < 1e-12] = 1.0
        self.feat_scale_ = scale
        self.ref_ = self._standardise(pooled)
        self.ref_class_ = clean.pred.astype(np.int64)
        self.bandwidth_ = float(self.bandwidth) if self.bandwidth else self._choose_bandwidth(self.ref_, self.ref_class_)
        # clean fit samples are in the reference: score them leave-one-out, as at test time
        s_clean = self._signals(clean)
        s_clean[:, 0] = self._log_kd_loo(self.ref_, self.ref_class_)
        x = np.concatenate([s_clean, self._signals(adversarial)])
        y = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
        self.lr_ = fit_logistic_pipeline(x, y, C=self.c, seed=self.seed)

    def _log_kd_loo(self, f: np.ndarray, cls: np.ndarray) -> np.ndarray:
        out = np.full(len(f), -1e6)
        h = self.bandwidth_
        for c in np.unique(cls):
            rows = np.flatnonzero(cls == c)
            if len(rows) < 2:
                continue
            logk = -_sq_dists(f[rows], f[rows]) / (2 * h * h)
            np.fill_diagonal(logk, -np.inf)
            out[rows] = logsumexp(logk, 1) - np.log(len(rows) - 1)
        return out

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        return logistic_decision(self.lr_, self._signals(features))

    def _fitted_shape(self) -> tuple[int | None, int | None]:
        return self.ref_.shape[1], None

    # -- persistence ----------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return ({"feat_mean": self.feat_mean_, "feat_scale": self.feat_scale_, "ref": self.ref_,
                 "ref_class": self.ref_class_, **self.lr_}, {"bandwidth_": self.bandwidth_})

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        # (log KD, BU) feed the logistic regression
        check_array_shapes(arrays, {"feat_mean": ("K",), "feat_scale": ("K",), "ref": ("N", "K"), "ref_class": ("N",),
                                    "lr_mean": (2,), "lr_scale": (2,), "lr_coef": (2,), "lr_intercept": (1,)})
        self.feat_mean_ = np.asarray(arrays["feat_mean"], np.float64)
        self.feat_scale_ = np.asarray(arrays["feat_scale"], np.float64)
        self.ref_ = np.asarray(arrays["ref"], np.float64)
        self.ref_class_ = np.asarray(arrays["ref_class"], np.int64)
        self.bandwidth_ = float(extra["bandwidth_"])
        self.lr_ = load_pipeline_arrays(arrays)

"""Gate-pattern detectors: is this activation pattern typical of the class it was given?

A CSG CNN assigns each filter of its last conv layer to one or a few classes (the gate
``G``, K x C). An adversarial input changes the prediction with a small perturbation;
what it rarely manages is to make the *whole pattern* of filters look like a clean
input of the new class. Both detectors here read that pattern from the single forward
pass that classifies the input (:class:`csgguard.features.Features`).

* :class:`GateCleanDetector` (``csg-clean``) learns, from clean inputs only, what each
  predicted class's pattern looks like, and scores the distance from it. Two-sided on
  purpose: method.md section 3 measured that strong attacks make the pattern *more*
  concentrated on the predicted class's filters than a clean input's, so the naive
  "more mismatch = adversarial" score points the wrong way. Several scores are
  selectable (``score=``); the default was chosen by a rule stated before the
  measurements in docs/detectors.md (benchmarks/gate_variants_mnist.py).
* :class:`GateSupervisedDetector` (``csg-supervised``) feeds a handful of those
  statistics to a logistic regression fitted on clean vs adversarial inputs. Saved as
  arrays (coefficients, scaler), never pickled.

Both work on a STD model too: the gate is then replaced by a *pseudo-gate* built from
the per-class mean activations (same row-max normalisation as the real gate), so the
CSG and STD models are compared with the very same detector.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CsgguardError
from ..features import Features
from .base import Detector

#: the scores :class:`GateCleanDetector` can use (``score=``)
CLEAN_SCORES = ("classcov-margin", "mahalanobis", "classcov", "maha-margin", "gated-diagonal", "gated-logits", "logits",
                "mismatch", "mismatch-z", "combined")
#: the default score (chosen by the rule in docs/detectors.md, benchmarks/gate_variants_mnist.py)
DEFAULT_SCORE = "classcov-margin"
#: the statistics the supervised detector feeds to its logistic regression, in order
SUPERVISED_FEATURES = ("log_mahalanobis", "log_gated_diagonal", "log_gated_logits", "mismatch", "mismatch_z",
                       "max_softmax", "logit_margin", "gated_logit_margin", "log_pooled_norm")
_COMBINED = ("mahalanobis", "gated-logits", "mismatch-z")
#: the log components the two-sided scores standardise, in the order of ``twosided_center_``
TWO_SIDED = ("mahalanobis", "classcov", "margin")
#: score -> the TWO_SIDED components whose max z it takes
_TWO_SIDED_SCORES = {"maha-margin": (0, 2), "classcov-margin": (1, 2)}
_EPS = 1e-12
_MARGIN_FLOOR = 1e-6


def pseudo_gate(pooled: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """A gate for a model without one: per-class mean |activation|, each filter's row max-normalised.

    The same normalisation the CSG gate receives after every step (row max 1), so
    ``mismatch`` and the gated statistics mean the same thing on both models.
    """
    a = np.abs(np.asarray(pooled, dtype=np.float64))
    means = np.stack([a[pred == c].mean(0) if np.any(pred == c) else a.mean(0) for c in range(num_classes)], 1)
    return np.clip(means / np.maximum(means.max(1, keepdims=True), _EPS), 0.0, 1.0)


def _shrunk_precision(residuals: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk inverse covariance: stable with fewer samples than dimensions."""
    from sklearn.covariance import LedoitWolf

    if len(residuals) < 2:
        return np.eye(residuals.shape[1])
    return LedoitWolf(assume_centered=True).fit(residuals).precision_


def _quad(r: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Row-wise ``r P r^T``, bit-identical whatever the number of rows.

    OpenBLAS hands a one-row product to gemv, which sums in another order than gemm; a
    lone row is therefore computed as part of a two-row product, so that a score never
    depends on which other inputs share its batch (screen's shards must match one run).
    """
    if len(r) == 1:
        return _quad(np.concatenate([r, r]), precision)[:1]
    return ((r @ precision) * r).sum(1)


class _GateStatistics:
    """Per-class clean statistics of the gate pattern, shared by both detectors."""

    ARRAYS = ("gate_", "means_", "precision_", "var_", "logit_means_", "logit_precision_",
              "mismatch_mean_", "mismatch_std_", "combined_center_", "combined_scale_")
    #: arrays added later: a detector saved without them loads, but cannot use the scores that need them
    OPTIONAL_ARRAYS = ("class_precision_", "twosided_center_", "twosided_scale_")

    def _use_model_gate(self, features: Features) -> bool:
        if self.gate == "model" and features.gate is None:
            raise CsgguardError("gate='model' needs a CSG model (this model has no gate); use gate='auto' or 'pseudo'")
        return features.gate is not None and self.gate in ("auto", "model")

    def _fit_statistics(self, clean: Features) -> None:
        if self.gate not in ("auto", "model", "pseudo"):
            raise CsgguardError(f"gate must be 'auto', 'model' or 'pseudo', not {self.gate!r}")
        a = clean.pooled.astype(np.float64)
        pred, c_num = clean.pred, clean.num_classes
        self.gate_source_ = "model" if self._use_model_gate(clean) else "pseudo"
        self.gate_ = (clean.gate.astype(np.float64) if self.gate_source_ == "model"
                      else pseudo_gate(a, pred, c_num))
        self.means_ = np.stack([a[pred == c].mean(0) if np.any(pred == c) else a.mean(0) for c in range(c_num)])
        r = a - self.means_[pred]
        self.precision_ = _shrunk_precision(r)
        self.var_ = np.maximum(r.var(0), _EPS)
        # per-class covariance (Ledoit-Wolf shrinks it towards a scaled identity when a class has few samples)
        self.class_precision_ = np.stack([_shrunk_precision(r[pred == c]) if np.sum(pred == c) > 2
                                          else self.precision_ for c in range(c_num)])
        z = self._gated_logits(clean)
        self.logit_means_ = np.stack([z[pred == c].mean(0) if np.any(pred == c) else z.mean(0)
                                      for c in range(c_num)])
        self.logit_precision_ = _shrunk_precision(z - self.logit_means_[pred])
        m = self._mismatch(clean)
        self.mismatch_mean_ = np.array([m[pred == c].mean() if np.any(pred == c) else m.mean()
                                        for c in range(c_num)])
        self.mismatch_std_ = np.array([max(m[pred == c].std(), 1e-6) if np.sum(pred == c) > 1
                                       else max(m.std(), 1e-6) for c in range(c_num)])
        comps = np.stack([self._log_component(name, clean) for name in _COMBINED], 1)
        self.combined_center_ = np.median(comps, 0)
        self.combined_scale_ = np.maximum(comps.std(0), 1e-6)
        comps = self._two_sided_components(clean)
        self.twosided_center_ = comps.mean(0)
        self.twosided_scale_ = np.maximum(comps.std(0), 1e-6)

    # -- the statistics (each a function of one forward pass) -----------------
    def _gated_logits(self, f: Features) -> np.ndarray:
        return f.pooled.astype(np.float64) @ (f.fc_weight.T.astype(np.float64) * self.gate_) + f.fc_bias

    def _mismatch(self, f: Features) -> np.ndarray:
        """Share of activation mass on filters closed for the predicted class (one-sided)."""
        a = np.abs(f.pooled.astype(np.float64))
        closed = 1.0 - self.gate_.T[f.pred]  # (N, K)
        return (a * closed).sum(1) / np.maximum(a.sum(1), _EPS)

    def _two_sided_components(self, f: Features, cols: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
        """(N, len(cols)) of: log tied Mahalanobis, log class-covariance Mahalanobis, -log logit margin.

        The first two grow when the pattern is atypical of its class (strong attacks push
        deep into the wrong class); the last grows when the input sits on a decision
        boundary (minimum-norm attacks such as C&W and DeepFool stop just across it).
        """
        def margin():
            z = f.logits.astype(np.float64)
            top2 = np.partition(z, -2, axis=1)[:, -2:] if z.shape[1] > 1 else np.c_[z, z]
            return top2[:, 1] - top2[:, 0]

        parts = (lambda: np.log(self._component("mahalanobis", f) + _EPS),
                 lambda: np.log(self._component("classcov", f) + _EPS),
                 lambda: -np.log(margin() + _MARGIN_FLOOR))
        return np.stack([parts[i]() for i in cols], 1)

    def _component(self, name: str, f: Features) -> np.ndarray:
        pred = f.pred
        if name == "mahalanobis":
            return _quad(f.pooled.astype(np.float64) - self.means_[pred], self.precision_)
        if name == "classcov":
            self._need("class_precision_", name)
            r = f.pooled.astype(np.float64) - self.means_[pred]
            out = np.empty(len(r))
            for c in np.unique(pred):  # per class: no (N, K, K) gather, one small product each
                rows = pred == c
                out[rows] = _quad(r[rows], self.class_precision_[c])
            return out
        if name == "gated-diagonal":
            g = self.gate_.T[pred]
            r2 = (f.pooled.astype(np.float64) - self.means_[pred]) ** 2 / self.var_
            return (g * r2).sum(1) / np.maximum(g.sum(1), _EPS)
        if name == "gated-logits":
            return _quad(self._gated_logits(f) - self.logit_means_[pred], self.logit_precision_)
        if name == "logits":
            # plain logits' distance: the gate-free control (same maths on f.logits)
            z = f.logits.astype(np.float64)
            return -(z[np.arange(len(z)), pred] - np.partition(z, -2, axis=1)[:, -2])
        if name == "mismatch":
            return self._mismatch(f)
        if name == "mismatch-z":
            return np.abs(self._mismatch(f) - self.mismatch_mean_[pred]) / self.mismatch_std_[pred]
        raise CsgguardError(f"unknown score {name!r}; choose from {', '.join(CLEAN_SCORES)}")

    def _log_component(self, name: str, f: Features) -> np.ndarray:
        return np.log1p(np.maximum(self._component(name, f), 0.0))

    def _need(self, array: str, score: str) -> None:
        if getattr(self, array, None) is None:
            raise CsgguardError(f"score {score!r} needs array {array}, which this (older) detector file lacks; "
                                "refit it")

    def _statistic(self, name: str, f: Features) -> np.ndarray:
        if name in _TWO_SIDED_SCORES:
            self._need("twosided_center_", name)
            cols = list(_TWO_SIDED_SCORES[name])
            zs = (self._two_sided_components(f, tuple(cols)) - self.twosided_center_[cols]) / self.twosided_scale_[cols]
            return zs.max(1)
        if name != "combined":
            return self._component(name, f)
        comps = np.stack([self._log_component(n, f) for n in _COMBINED], 1)
        return ((comps - self.combined_center_) / self.combined_scale_).sum(1)

    def _stat_arrays(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(getattr(self, k), dtype=np.float64) for k in self.ARRAYS + self.OPTIONAL_ARRAYS
                if getattr(self, k, None) is not None}

    def _load_stat_arrays(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        missing = [k for k in self.ARRAYS if k not in arrays]
        if missing:
            raise CsgguardError(f"detector state lacks arrays {', '.join(missing)}")
        for k in self.ARRAYS:
            setattr(self, k, np.asarray(arrays[k], dtype=np.float64))
        for k in self.OPTIONAL_ARRAYS:
            setattr(self, k, np.asarray(arrays[k], dtype=np.float64) if k in arrays else None)
        c_num, k_num = self.means_.shape
        if self.class_precision_ is not None and self.class_precision_.shape != (c_num, k_num, k_num):
            raise CsgguardError(f"class_precision_ has shape {self.class_precision_.shape}, "
                                f"expected ({c_num}, {k_num}, {k_num})")
        for k in ("twosided_center_", "twosided_scale_"):
            if getattr(self, k) is not None and getattr(self, k).shape != (len(TWO_SIDED),):
                raise CsgguardError(f"{k} has shape {getattr(self, k).shape}, expected ({len(TWO_SIDED)},)")
        self.gate_source_ = str(extra.get("gate_source_", "model"))

    def _check_features(self, f: Features) -> None:
        if f.num_filters != self.means_.shape[1] or f.num_classes != self.means_.shape[0]:
            raise CsgguardError(f"features have K={f.num_filters}, C={f.num_classes} but the detector was fitted "
                                f"for K={self.means_.shape[1]}, C={self.means_.shape[0]} (another model?)")


class GateCleanDetector(_GateStatistics, Detector):
    """Clean-only, attack-agnostic: distance of the gate pattern from its predicted class's clean profile.

    Parameters
    ----------
    score : one of :data:`CLEAN_SCORES`.
        ``classcov-margin`` (default): two-sided, flags an input when *either* its pattern is
        atypical of the predicted class *or* it sits on a decision boundary: the max of the
        clean-standardised z-scores of ``log classcov`` and ``-log(logit margin)``. Strong
        attacks (PGD) are caught by the first, minimum-norm attacks (C&W, DeepFool), which
        stop just across the boundary, by the second.
        ``mahalanobis``: squared Mahalanobis distance of the pooled activations
        to the predicted class's clean mean, tied Ledoit-Wolf covariance.
        ``classcov``: the same with one Ledoit-Wolf covariance per class.
        ``maha-margin``: like ``classcov-margin`` with the tied ``mahalanobis``.
        ``gated-diagonal``: per-filter standardised distance weighted by the predicted
        class's gate column (only the class's own filters count).
        ``gated-logits``: Mahalanobis distance of the gated-logit vector (the classifier
        applied to ``G[:, c] * a`` for every c) to the class's clean mean.
        ``logits``: negative logit margin (a gate-free control).
        ``mismatch``: one-sided share of mass on closed filters (kept to show it fails).
        ``mismatch-z``: two-sided, class-standardised mismatch share.
        ``combined``: sum of the standardised log of mahalanobis, gated-logits and mismatch-z.
    gate : ``auto`` (the model's gate, or a pseudo-gate on a STD model), ``model`` or ``pseudo``.
    fpr : target false-positive rate for :meth:`calibrate`.
    """

    name = "csg-clean"
    supervised = False

    def __init__(self, *, score: str = DEFAULT_SCORE, gate: str = "auto", fpr: float = 0.05) -> None:
        super().__init__(fpr=fpr)
        self.score = score
        self.gate = gate

    def _fit(self, clean: Features, adversarial=None, *, inputs=None, adversarial_inputs=None) -> None:
        if self.score not in CLEAN_SCORES:
            raise CsgguardError(f"unknown score {self.score!r}; choose from {', '.join(CLEAN_SCORES)}")
        self._fit_statistics(clean)

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        self._check_features(features)
        return self._statistic(self.score, features)

    def statistics(self, features: Features) -> dict[str, np.ndarray]:
        """Every selectable score at once (for comparisons; one forward pass, many readings)."""
        self._check_fitted()
        return {name: self._statistic(name, features) for name in CLEAN_SCORES}

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return self._stat_arrays(), {"gate_source_": self.gate_source_}

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        self._load_stat_arrays(arrays, extra)


class GateSupervisedDetector(_GateStatistics, Detector):
    """Logistic regression on gate-pattern statistics, fitted on clean vs adversarial features.

    The statistics (:data:`SUPERVISED_FEATURES`) are a few numbers per input, not the
    raw K-dim activations: a low-dimensional summary generalises better to attacks the
    fit never saw, and keeps the model inspectable (one coefficient per statistic).
    The score is the log-odds of "adversarial".

    Parameters
    ----------
    C : inverse L2 regularisation strength of the logistic regression.
    gate : as for :class:`GateCleanDetector`.
    fpr : target false-positive rate for :meth:`calibrate`.
    """

    name = "csg-supervised"
    supervised = True

    def __init__(self, *, C: float = 1.0, gate: str = "auto", fpr: float = 0.05) -> None:
        super().__init__(fpr=fpr)
        self.C = C
        self.gate = gate

    def feature_matrix(self, f: Features) -> np.ndarray:
        """The (N, len(SUPERVISED_FEATURES)) statistics of one forward pass."""
        self._check_features(f)
        z = f.logits.astype(np.float64)
        z = z - z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        top2 = np.sort(z, 1)[:, -2:] if z.shape[1] > 1 else np.c_[z, z]
        gz = self._gated_logits(f)
        pred = f.pred
        gz_pred = gz[np.arange(len(gz)), pred]
        gz_other = np.where(np.eye(gz.shape[1], dtype=bool)[pred], -np.inf, gz).max(1)
        cols = [self._log_component("mahalanobis", f), self._log_component("gated-diagonal", f),
                self._log_component("gated-logits", f), self._mismatch(f), self._component("mismatch-z", f),
                p.max(1), top2[:, 1] - top2[:, 0], gz_pred - gz_other,
                np.log1p(np.linalg.norm(f.pooled.astype(np.float64), axis=1))]
        return np.nan_to_num(np.stack(cols, 1), nan=0.0, posinf=1e6, neginf=-1e6)

    def _fit(self, clean: Features, adversarial: Features | None, *, inputs=None, adversarial_inputs=None) -> None:
        from sklearn.linear_model import LogisticRegression

        self._fit_statistics(clean)
        x = np.concatenate([self.feature_matrix(clean), self.feature_matrix(adversarial)])
        y = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
        self.scaler_mean_ = x.mean(0)
        self.scaler_scale_ = np.where(x.std(0) > 1e-12, x.std(0), 1.0)
        lr = LogisticRegression(C=self.C, class_weight="balanced", max_iter=2000)
        lr.fit((x - self.scaler_mean_) / self.scaler_scale_, y)
        self.coef_ = lr.coef_.ravel().astype(np.float64)
        self.intercept_ = np.asarray(lr.intercept_, dtype=np.float64).ravel()
        self.n_fit_ = {"clean": int(len(clean)), "adversarial": int(len(adversarial))}

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        x = (self.feature_matrix(features) - self.scaler_mean_) / self.scaler_scale_
        return x @ self.coef_ + self.intercept_[0]

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {**self._stat_arrays(), "coef_": self.coef_, "intercept_": self.intercept_,
                  "scaler_mean_": self.scaler_mean_, "scaler_scale_": self.scaler_scale_}
        return arrays, {"gate_source_": self.gate_source_, "features": list(SUPERVISED_FEATURES),
                        "n_fit_": getattr(self, "n_fit_", {})}

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        self._load_stat_arrays(arrays, extra)
        for k in ("coef_", "intercept_", "scaler_mean_", "scaler_scale_"):
            if k not in arrays:
                raise CsgguardError(f"detector state lacks array {k}")
            setattr(self, k, np.asarray(arrays[k], dtype=np.float64))
        if self.coef_.shape != (len(SUPERVISED_FEATURES),):
            raise CsgguardError(f"coef_ has shape {self.coef_.shape}, expected ({len(SUPERVISED_FEATURES)},)")
        self.n_fit_ = extra.get("n_fit_", {})

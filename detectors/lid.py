"""LID baseline (Ma et al., ICLR 2018): local intrinsic dimensionality + logistic regression.

For each input and each available layer (the pooled gated-layer activations and the
logits, both from the one forward pass), the maximum-likelihood LID estimate

    LID(x) = -( (1/k) * sum_i log(r_i(x) / r_k(x)) )^-1

uses the distances r_1..r_k to its k nearest neighbours in a *reference batch of
clean fit samples* (the paper's minibatch). A fit sample that is itself in the
reference skips its zero self-distance (neighbours from scikit-learn's
``NearestNeighbors``). A logistic regression on the standardised LID vector
separates clean from adversarial (supervised, as in the paper; one scikit-learn
pipeline, :mod:`csgguard.detectors.logistic`). The
paper's optional "noisy" negatives are not used. Everything persists as arrays:
the reference activations, the scaler and the regression's coefficients.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
from sklearn.utils._param_validation import Interval

from ..errors import CsgguardError
from ..features import Features
from .base import Detector, check_array_shapes
from .logistic import fit_logistic_pipeline, load_pipeline_arrays, logistic_decision


def lid_mle(query: np.ndarray | None, reference: np.ndarray, k: int) -> np.ndarray:
    """MLE of the LID of each ``query`` row w.r.t. its ``k`` nearest ``reference`` rows.

    ``query=None`` scores the reference rows themselves, each without its own point
    (scikit-learn's ``kneighbors(None)`` leaves it out).
    """
    from sklearn.neighbors import NearestNeighbors

    r = np.asarray(reference, dtype=np.float64)
    kk = min(k, r.shape[0] - (1 if query is None else 0))
    nn = NearestNeighbors(n_neighbors=kk).fit(r)
    dist, _ = nn.kneighbors(None if query is None else np.asarray(query, dtype=np.float64))
    dist = np.maximum(dist, 1e-12)
    mean = np.log(dist / dist[:, -1:]).mean(1)
    return -1.0 / np.minimum(mean, -1e-12)


class LIDDetector(Detector):
    name = "lid"
    supervised = True
    _parameter_constraints = {
        **Detector._parameter_constraints,
        "k": [Interval(Integral, 1, None, closed="left")],
        "max_reference": [Interval(Integral, 2, None, closed="left")],
        "c": [Interval(Real, 0, None, closed="neither")],
        "seed": [Interval(Integral, 0, None, closed="left")],
    }

    def __init__(self, *, fpr: float = 0.05, k: int = 20, max_reference: int = 1000, c: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__(fpr=fpr)
        self.k = k
        self.max_reference = max_reference
        self.c = c
        self.seed = seed

    def _layers(self, features: Features) -> list[np.ndarray]:
        return [np.asarray(features.pooled, np.float64), np.asarray(features.logits, np.float64)]

    def _lids(self, features: Features | None) -> np.ndarray:
        """LID per layer of ``features``; None: of the reference rows themselves (each without itself)."""
        refs = [self.ref_pooled_, self.ref_logits_]
        queries = [None, None] if features is None else self._layers(features)
        return np.stack([lid_mle(q, r, self.k) for q, r in zip(queries, refs, strict=True)], 1)

    def _fit(self, clean: Features, adversarial: Features | None, *, inputs=None, adversarial_inputs=None) -> None:
        rng = np.random.default_rng(self.seed)
        n = len(clean)
        if n < 2:  # each reference row's LID is measured against the others
            raise CsgguardError(f"lid: {n} clean fit image is too few (need at least 2; raise --limit)")
        ref = np.sort(rng.choice(n, min(n, self.max_reference), replace=False))
        self.ref_pooled_ = np.asarray(clean.pooled[ref], np.float64)
        self.ref_logits_ = np.asarray(clean.logits[ref], np.float64)
        in_ref = np.zeros(n, bool)
        in_ref[ref] = True
        lid_clean = np.zeros((n, 2))
        if in_ref.any():
            lid_clean[in_ref] = self._lids(None)  # the reference rows, in the same (sorted) order
        if (~in_ref).any():
            lid_clean[~in_ref] = self._lids(clean.subset(np.flatnonzero(~in_ref)))
        lid_adv = self._lids(adversarial)
        x = np.concatenate([lid_clean, lid_adv])
        y = np.r_[np.zeros(len(lid_clean)), np.ones(len(lid_adv))]
        self.lr_ = fit_logistic_pipeline(x, y, C=self.c, seed=self.seed)

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        return logistic_decision(self.lr_, self._lids(features))

    def _fitted_shape(self) -> tuple[int | None, int | None]:
        return self.ref_pooled_.shape[1], self.ref_logits_.shape[1]

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"ref_pooled": self.ref_pooled_, "ref_logits": self.ref_logits_, **self.lr_}, {}

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        # one LID per reference layer (pooled, logits) feeds the logistic regression
        check_array_shapes(arrays, {"ref_pooled": ("N", "K"), "ref_logits": ("N", "C"), "lr_mean": (2,),
                                    "lr_scale": (2,), "lr_coef": (2,), "lr_intercept": (1,)})
        self.ref_pooled_ = np.asarray(arrays["ref_pooled"], np.float64)
        self.ref_logits_ = np.asarray(arrays["ref_logits"], np.float64)
        self.lr_ = load_pipeline_arrays(arrays)

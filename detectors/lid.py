"""LID baseline (Ma et al., ICLR 2018): local intrinsic dimensionality + logistic regression.

For each input and each available layer (the pooled gated-layer activations and the
logits, both from the one forward pass), the maximum-likelihood LID estimate

    LID(x) = -( (1/k) * sum_i log(r_i(x) / r_k(x)) )^-1

uses the distances r_1..r_k to its k nearest neighbours in a *reference batch of
clean fit samples* (the paper's minibatch). A fit sample that is itself in the
reference skips its zero self-distance. A logistic regression on the standardised
LID vector separates clean from adversarial (supervised, as in the paper). The
paper's optional "noisy" negatives are not used. Everything persists as arrays:
the reference activations, the scaler and the regression's coefficients.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..features import Features
from .base import Detector


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Standardise, fit a scikit-learn logistic regression, return its arrays (no estimator object)."""
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(0)
    scale = x.std(0)
    scale[scale < 1e-12] = 1.0
    lr = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit((x - mean) / scale, y)
    return {"lr_mean": mean, "lr_scale": scale, "lr_coef": lr.coef_[0].astype(np.float64),
            "lr_intercept": lr.intercept_.astype(np.float64)}


def logistic_decision(arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The regression's log-odds of "adversarial" (what scikit-learn's decision_function returns)."""
    z = (x - arrays["lr_mean"]) / arrays["lr_scale"]
    return z @ arrays["lr_coef"] + arrays["lr_intercept"][0]


def lid_mle(query: np.ndarray, reference: np.ndarray, k: int, skip_self: bool = False) -> np.ndarray:
    """MLE of the LID of each ``query`` row w.r.t. ``reference`` (k nearest neighbours)."""
    q = np.asarray(query, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    d2 = (q * q).sum(1)[:, None] + (r * r).sum(1)[None, :] - 2.0 * q @ r.T
    d = np.sqrt(np.maximum(d2, 0.0))
    start = 1 if skip_self else 0
    kk = min(k, r.shape[0] - start)
    nn = np.sort(d, axis=1)[:, start:start + kk]
    nn = np.maximum(nn, 1e-12)
    ratios = np.log(nn / nn[:, -1:])
    mean = ratios.mean(1)
    return -1.0 / np.minimum(mean, -1e-12)


class LIDDetector(Detector):
    name = "lid"
    supervised = True

    def __init__(self, *, fpr: float = 0.05, k: int = 20, max_reference: int = 1000, c: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__(fpr=fpr)
        self.k = k
        self.max_reference = max_reference
        self.c = c
        self.seed = seed

    def _layers(self, features: Features) -> list[np.ndarray]:
        return [np.asarray(features.pooled, np.float64), np.asarray(features.logits, np.float64)]

    def _lids(self, features: Features, skip_self: bool = False) -> np.ndarray:
        refs = [self.ref_pooled_, self.ref_logits_]
        return np.stack([lid_mle(q, r, self.k, skip_self) for q, r in zip(self._layers(features), refs, strict=True)], 1)

    def _fit(self, clean: Features, adversarial: Features | None, *, inputs=None, adversarial_inputs=None) -> None:
        rng = np.random.default_rng(self.seed)
        n = len(clean)
        ref = np.sort(rng.choice(n, min(n, self.max_reference), replace=False))
        self.ref_pooled_ = np.asarray(clean.pooled[ref], np.float64)
        self.ref_logits_ = np.asarray(clean.logits[ref], np.float64)
        in_ref = np.zeros(n, bool)
        in_ref[ref] = True
        lid_clean = np.zeros((n, 2))
        if in_ref.any():
            lid_clean[in_ref] = self._lids(clean.subset(np.flatnonzero(in_ref)), skip_self=True)
        if (~in_ref).any():
            lid_clean[~in_ref] = self._lids(clean.subset(np.flatnonzero(~in_ref)))
        lid_adv = self._lids(adversarial)
        x = np.concatenate([lid_clean, lid_adv])
        y = np.r_[np.zeros(len(lid_clean)), np.ones(len(lid_adv))]
        self.lr_ = fit_logistic(x, y, self.c, self.seed)

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        return logistic_decision(self.lr_, self._lids(features))

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"ref_pooled": self.ref_pooled_, "ref_logits": self.ref_logits_, **self.lr_}, {}

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        self.ref_pooled_ = np.asarray(arrays["ref_pooled"], np.float64)
        self.ref_logits_ = np.asarray(arrays["ref_logits"], np.float64)
        self.lr_ = {k: np.asarray(arrays[k], np.float64) for k in ("lr_mean", "lr_scale", "lr_coef", "lr_intercept")}

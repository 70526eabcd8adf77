"""Mahalanobis baseline (Lee et al., NeurIPS 2018), on the pooled gated-layer activations.

Class-conditional Gaussians with one tied covariance are fitted to clean fit
features (class = the model's prediction, so no labels are needed). The tied
covariance of the class-centred features is shrunk towards a scaled identity by
scikit-learn: Ledoit-Wolf's estimated shrinkage by default (``shrinkage=None``), or
a fixed ``shrinkage`` in [0, 1] (``ShrunkCovariance``). The
confidence score of the paper is ``M(x) = max_c -(f - mu_c)^T S^-1 (f - mu_c)``;
as an "adversarial" score we return ``-M(x)``: the Mahalanobis distance to the
closest class mean (``mode="min"``, the paper's), or to the predicted class's
mean (``mode="pred"``).

Input pre-processing (the paper's optional step): ``x' = x - noise * sign(grad_x d(x))``,
one gradient step that brings the input closer to its closest class; clean inputs
move more than adversarial ones. It needs the model and the inputs (one forward +
backward + forward per image), so ``needs_inputs`` is true only when ``noise > 0``.
The paper's multi-layer logistic-regression ensemble is not used: this model
exposes one feature layer (the gated layer), so the score is unsupervised.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions

from ..features import Features
from .base import Detector, check_array_shapes


class _NoiseNeedsInputs:
    """``needs_inputs``: False on the class (no extra passes by default), ``noise > 0`` on an instance."""

    def __get__(self, obj, owner=None) -> bool:
        return False if obj is None else bool(obj.noise > 0)


class MahalanobisDetector(Detector):
    name = "mahalanobis"
    supervised = False
    needs_inputs = _NoiseNeedsInputs()  # extra passes only with input pre-processing
    _parameter_constraints = {
        **Detector._parameter_constraints,
        "mode": [StrOptions({"min", "pred"})],
        "noise": [Interval(Real, 0, None, closed="left")],
        "shrinkage": [None, Interval(Real, 0, 1, closed="both")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, *, fpr: float = 0.05, mode: str = "min", noise: float = 0.0,
                 shrinkage: float | None = None, batch_size: int = 256) -> None:
        super().__init__(fpr=fpr)
        self.mode = mode
        self.noise = noise
        self.shrinkage = shrinkage
        self.batch_size = batch_size

    # -- fit ----------------------------------------------------------------
    def _fit(self, clean: Features, adversarial, *, inputs=None, adversarial_inputs=None) -> None:
        f = np.asarray(clean.pooled, dtype=np.float64)
        pred = clean.pred
        c = clean.num_classes
        means = np.zeros((c, f.shape[1]))
        centred = []
        for j in range(c):
            fj = f[pred == j]
            if len(fj):
                means[j] = fj.mean(0)
                centred.append(fj - means[j])
            else:  # a class never predicted on fit data: its mean never wins
                means[j] = np.inf
        from sklearn.covariance import LedoitWolf, ShrunkCovariance

        centred = np.concatenate(centred)
        est = LedoitWolf(assume_centered=True) if self.shrinkage is None else \
            ShrunkCovariance(shrinkage=self.shrinkage, assume_centered=True)
        est.fit(centred)
        self.means_ = means
        self.precision_ = est.precision_

    # -- score --------------------------------------------------------------
    def _distances(self, f: np.ndarray) -> np.ndarray:
        """(N, C) squared Mahalanobis distances (inf for unseen classes)."""
        out = np.full((len(f), len(self.means_)), np.inf)
        for j, mu in enumerate(self.means_):
            if np.isfinite(mu).all():
                d = f - mu
                out[:, j] = ((d @ self.precision_) * d).sum(1)
        return out

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        f = np.asarray(features.pooled, dtype=np.float64)
        if self.noise > 0:
            f = self._preprocessed_pooled(features, inputs)
        d = self._distances(f)
        if self.mode == "pred":
            return d[np.arange(len(d)), features.pred]
        return d.min(1)

    def torch_score(self, logits: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The same score, differentiable (used by the adaptive attack)."""
        mu = torch.as_tensor(np.where(np.isfinite(self.means_), self.means_, 1e6), dtype=pooled.dtype,
                             device=pooled.device)
        p = torch.as_tensor(self.precision_, dtype=pooled.dtype, device=pooled.device)
        d = pooled[:, None, :] - mu[None]
        dist = torch.einsum("nck,kl,ncl->nc", d, p, d)
        if self.mode == "pred":
            return dist.gather(1, logits.argmax(1, keepdim=True))[:, 0]
        return dist.min(1).values

    def _preprocessed_pooled(self, features: Features, inputs) -> np.ndarray:
        model = self._bound_model(inputs, "mahalanobis with noise > 0")
        device = next(model.parameters()).device
        x_all = torch.as_tensor(inputs)
        out = []
        for s in range(0, len(x_all), self.batch_size):
            x = x_all[s:s + self.batch_size].to(device).float().requires_grad_(True)
            with torch.enable_grad():
                logits, pooled, _ = model.forward_signals(x)
                score = self.torch_score(logits, pooled).sum()
                (grad,) = torch.autograd.grad(score, x)
            x2 = (x - self.noise * grad.sign()).clamp(0, 1).detach()
            with torch.no_grad():
                out.append(model.forward_signals(x2).pooled.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, features.num_filters))

    def _fitted_shape(self) -> tuple[int | None, int | None]:
        return self.precision_.shape[0], self.means_.shape[0]

    # -- persistence --------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {"means": self.means_, "precision": self.precision_}, {}

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        check_array_shapes(arrays, {"means": ("C", "K"), "precision": ("K", "K")})
        self.means_ = np.asarray(arrays["means"], dtype=np.float64)
        self.precision_ = np.asarray(arrays["precision"], dtype=np.float64)

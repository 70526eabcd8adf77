"""Gate-pattern detectors: is this forward pass typical of the class it predicts?

A CSG CNN assigns each filter of its last conv layer to one or a few classes (the gate
``G``, K x C). An adversarial input changes the prediction with a small perturbation;
what it rarely manages is to make the *whole* forward pass look like a clean input of
the new class: the early layers still carry the perturbation, the gated layer's filters
fire in a pattern atypical of the predicted class, and the logits sit either on a
decision boundary or unusually far past it. The statistics that read this
(:mod:`csgguard.scores`, written once in torch) come from the single forward pass that
classifies the input (:class:`csgguard.features.Features`).

* :class:`GateCleanDetector` (``csg-clean``) learns, from clean inputs only, what each
  predicted class's statistics look like and scores how far an input's are from them.
  Its default components and combiner were chosen by a rule stated before the
  measurements (docs/detectors.md, ``benchmarks/detector_variants.py``).
* :class:`GateSupervisedDetector` (``csg-supervised``) feeds the same standardised
  statistics to a logistic regression fitted on clean vs adversarial inputs (several
  attacks and budgets). Saved as arrays, never pickled.

Both work on a STD model too: the gate is then replaced by a *pseudo-gate* built from
the per-class mean activations (same row-max normalisation as the real gate), so the
CSG and STD models are compared with the very same detector.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import scores as S
from ..errors import CsgguardError
from ..features import Features
from .base import Detector, calibration_halves

#: the default components, combiner and covariance of ``csg-clean``, chosen by the second rule of
#: docs/detectors.md (minimax regret over digits, MNIST and CIFAR-10, CSG and STD); ``votes`` added by
#: the same rule in the sixth question, confirmed on the shipped CIFAR-10 pair
DEFAULT_COMPONENTS = "taps-joint,votes,pattern,margin"
DEFAULT_COMBINE = "sum"
DEFAULT_COVARIANCE = "tied"
#: where csg-clean's units come from (``GateCleanDetector.units``; the halves: base.calibration_halves)
UNITS = ("fit", "held-out")
DEFAULT_UNITS = "fit"
pseudo_gate = S.pseudo_gate  # re-exported: part of the public detector API


class _GateProfile:
    """Fitting, scoring and persistence shared by both gate detectors (the arrays of :mod:`csgguard.scores`)."""

    @classmethod
    def from_state(cls, params, arrays, extra):
        # files written before ``covariance`` existed were all fitted with one covariance per class
        return super().from_state({"covariance": "class", **params}, arrays, extra)

    def _resolved_components(self) -> tuple[str, ...]:
        return S.parse_components(self.components)

    def validate_params(self) -> None:
        """The parameters both gate detectors share; checked by ``fit`` and by ``csgguard fit`` before any work."""
        super().validate_params()
        if self.gate not in ("auto", "model", "pseudo"):
            raise CsgguardError(f"gate must be 'auto', 'model' or 'pseudo', not {self.gate!r}")
        self._resolved_components()
        S.check_covariance(self.covariance)

    def _fit_profile(self, clean: Features) -> None:
        if self.gate == "model" and clean.gate is None:
            raise CsgguardError("gate='model' needs a CSG model (this model has no gate); use gate='auto' or 'pseudo'")
        comps = self._resolved_components()
        if S.uses_taps(comps) and not clean.taps:
            raise CsgguardError("components 'taps' / 'taps-joint' / 'votes' need features with earlier-layer taps "
                                "(extract_features gives them)")
        use_model = clean.gate is not None and self.gate in ("auto", "model")
        self.gate_source_ = "model" if use_model else "pseudo"
        gate = (np.asarray(clean.gate, dtype=np.float64) if use_model
                else S.pseudo_gate(clean.pooled, clean.pred, clean.num_classes))
        self.components_ = list(comps)
        self.arrays_ = S.fit_profile(clean, gate, comps, covariance=self.covariance)
        self.n_taps_ = len(clean.taps) if S.uses_taps(comps) else 0
        self.columns_ = S.expand(comps, self.n_taps_)
        self._torch = {}

    def _tensors(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        """The fitted arrays as tensors of ``dtype`` (float64: fitting, gradients; S.SCREEN_DTYPE: screening)."""
        key = (str(device), dtype)
        cache = self.__dict__.setdefault("_torch", {})
        if key not in cache:
            cache[key] = S.to_torch(self.arrays_, device, dtype)
        return cache[key]

    def _check_features(self, f: Features) -> None:
        self._check_shape(f.num_filters, f.num_classes)

    def _fitted_shape(self) -> tuple[int, int]:
        c_num, k_num = self.arrays_["means_"].shape
        return k_num, c_num

    def statistics(self, features: Features) -> dict[str, np.ndarray]:
        """Each component's clean z-score (two-sided ones as |z|): what the score combines."""
        self._check_fitted()
        self._check_features(features)
        v = torch.from_numpy(S.components_numpy(self._tensors(), self.components_, features))
        z = S.standardised(self._tensors(), self.columns_, v, torch.from_numpy(features.pred))
        return {name: z[:, i].numpy() for i, name in enumerate(self.columns_)}

    def _profile_state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return dict(self.arrays_), {"gate_source_": self.gate_source_, "components_": self.components_,
                                    "n_taps_": self.n_taps_}

    def _load_profile(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        comps = S.parse_components(extra.get("components_", []))
        n_taps = int(extra.get("n_taps_", 0))
        need = ["gate_", "means_", "class_precision_", "n_taps", "comp_mean_", "comp_std_", "comp_precision_",
                "tail_q_", "tail_s_"]
        if "taps" in comps:
            need += [f"tap_{kind}_{i}" for i in range(n_taps) for kind in ("means", "precision")]
        if "taps-joint" in comps or "votes" in comps:
            need += ["tapj_means", "tapj_precision"]
        missing = [k for k in need if k not in arrays]
        if missing:
            raise CsgguardError(f"detector state lacks arrays {', '.join(missing)} (saved by an older csgguard? "
                                "refit it)")
        c_num, k_num = np.shape(arrays["means_"])
        m = len(S.expand(comps, n_taps))
        if ("taps-joint" in comps or "votes" in comps) and (np.ndim(arrays["tapj_means"]) != 2 or np.shape(arrays["tapj_precision"]) != (
                np.shape(arrays["tapj_means"])[1],) * 2 or np.shape(arrays["tapj_means"])[0] != c_num):
            raise CsgguardError(f"detector arrays tapj_means / tapj_precision have shapes "
                                f"{np.shape(arrays['tapj_means'])} / {np.shape(arrays['tapj_precision'])}")
        shapes = {"gate_": (k_num, c_num), "comp_mean_": (c_num, m), "comp_std_": (c_num, m),
                  "comp_precision_": (m, m), "tail_q_": (m, S.TAIL_LEVELS), "tail_s_": (S.TAIL_LEVELS,)}
        for k, shape in shapes.items():
            if np.shape(arrays[k]) != shape:
                raise CsgguardError(f"detector array {k} has shape {np.shape(arrays[k])}, expected {shape}")
        allowed = ((1, k_num, k_num),) if self.covariance == "tied" else (
            (c_num, k_num, k_num), (1, k_num, k_num))
        if np.shape(arrays["class_precision_"]) not in allowed:
            raise CsgguardError(f"detector array class_precision_ has shape {np.shape(arrays['class_precision_'])}")
        self.arrays_ = {k: np.asarray(arrays[k], dtype=np.float64) for k in need}
        self.components_, self.n_taps_ = list(comps), n_taps
        self.columns_ = S.expand(comps, n_taps)
        self.gate_source_ = str(extra.get("gate_source_", "model"))
        self._torch = {}


class GateCleanDetector(_GateProfile, Detector):
    """Clean-only, attack-agnostic: how atypical is this forward pass for its predicted class?

    Parameters
    ----------
    components : comma-separated families of :data:`csgguard.scores.COMPONENTS`
        (``taps``, ``taps-joint``, ``votes``, ``pattern``, ``mismatch``, ``margin``, ``norm``); see
        :mod:`csgguard.scores`.
    combine : ``max`` (largest clean surprise), ``sum`` (summed surprises, Fisher's method),
        ``zmax`` (largest per-class clean z-score) or ``density`` (Mahalanobis distance of the
        component vector to its class's clean mean); see :mod:`csgguard.scores`.
    gate : ``auto`` (the model's gate, or a pseudo-gate on a STD model), ``model`` or ``pseudo``.
    covariance : how ``pattern`` reads the gated layer: ``class`` (one covariance per predicted
        class) or ``tied`` (one shared covariance).
    units : where the combiner's units (each component's per-class clean mean / std and surprise
        table) come from: ``fit`` (out-of-fold halves of the fit images) or ``held-out``
        (:meth:`calibrate` splits its clean images in two halves stratified by predicted class:
        one re-measures the units, the other sets the threshold). ``held-out`` is for fit images
        the network was trained on, whose components are tighter than an unseen image's
        (docs/detectors.md, the third question).
    fpr : target false-positive rate for :meth:`calibrate`.
    """

    name = "csg-clean"
    supervised = False

    def __init__(self, *, components: str = DEFAULT_COMPONENTS, combine: str = DEFAULT_COMBINE,
                 gate: str = "auto", covariance: str = DEFAULT_COVARIANCE, units: str = DEFAULT_UNITS,
                 fpr: float = 0.05) -> None:
        super().__init__(fpr=fpr)
        self.components = components
        self.combine = combine
        self.gate = gate
        self.covariance = covariance
        self.units = units

    def _check_units(self) -> None:
        if self.units not in UNITS:
            raise CsgguardError(f"csg-clean: unknown units {self.units!r}; choose from {', '.join(UNITS)}")

    def validate_params(self) -> None:
        super().validate_params()
        if self.combine not in S.COMBINERS:
            raise CsgguardError(f"unknown combine {self.combine!r}; choose from {', '.join(S.COMBINERS)}")
        self._check_units()

    def _fit(self, clean: Features, adversarial=None, *, inputs=None, adversarial_inputs=None) -> None:
        self._fit_profile(clean)

    def calibrate(self, clean_heldout: Features, *, inputs=None) -> GateCleanDetector:
        """The threshold on held-out clean images; with ``units="held-out"`` one half of them
        (stratified by predicted class, fixed seed) first re-measures the units, the other half
        sets the threshold."""
        self._check_units()
        if self.units == "fit":
            return super().calibrate(clean_heldout, inputs=inputs)
        self._check_fitted()
        unit_rows, threshold_rows = calibration_halves(clean_heldout.pred)
        self.arrays_ = S.anchor_units(self.arrays_, self.components_, clean_heldout.subset(unit_rows))
        self._torch = {}
        return super().calibrate(clean_heldout.subset(threshold_rows),
                                 inputs=None if inputs is None else inputs[threshold_rows])

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        self._check_features(features)
        return S.score_numpy(self._tensors(dtype=S.SCREEN_DTYPE), self.components_, self.combine, features)

    def torch_score(self, logits: torch.Tensor, pooled: torch.Tensor, taps=(), *,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The same score as :meth:`score_samples`, differentiable (for the adaptive attack); float64
        unless ``dtype`` says otherwise (screening computes it in ``S.SCREEN_DTYPE``)."""
        self._check_fitted()
        return S.score(self._tensors(logits.device, dtype), self.components_, self.combine, logits, pooled, taps)

    def score_signals(self, logits: torch.Tensor, pooled: torch.Tensor, taps=()) -> torch.Tensor:
        self._check_fitted()
        self._check_shape(pooled.shape[1], logits.shape[1])
        dt = S.SCREEN_DTYPE
        return self.torch_score(logits.to(dt), pooled.to(dt), tuple(t.to(dt) for t in taps), dtype=dt)

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return self._profile_state()

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        if self.combine not in S.COMBINERS:
            raise CsgguardError(f"unknown combine {self.combine!r}")
        self._load_profile(arrays, extra)


class GateSupervisedDetector(_GateProfile, Detector):
    """Logistic regression on the standardised gate statistics, fitted on clean vs adversarial inputs.

    The inputs are the per-class clean z-scores of every component (signed, plus |z| of
    the two-sided ones): a few numbers per input rather than the raw activations, which
    generalises better to attacks the fit never saw and keeps the model inspectable
    (one coefficient per statistic). The score is the log-odds of "adversarial". Fit it
    on several attacks and budgets (``csgguard fit --attacks pgd,fgsm --eps ...``).

    Parameters
    ----------
    C : inverse L2 regularisation strength of the logistic regression.
    components : as for :class:`GateCleanDetector` (default: all).
    gate, covariance : as for :class:`GateCleanDetector`.
    fpr : target false-positive rate for :meth:`calibrate`.
    """

    name = "csg-supervised"
    supervised = True

    def __init__(self, *, C: float = 1.0, components: str = "taps,pattern,mismatch,margin,norm", gate: str = "auto",
                 covariance: str = "class", fpr: float = 0.05) -> None:
        super().__init__(fpr=fpr)
        self.C = C
        self.components = components
        self.gate = gate
        self.covariance = covariance

    def feature_matrix(self, f: Features) -> torch.Tensor:
        """(N, M + two-sided) standardised statistics: signed z, then |z| of the two-sided columns."""
        self._check_features(f)
        arrays = self._tensors(dtype=S.SCREEN_DTYPE)
        v = torch.from_numpy(S.components_numpy(arrays, self.components_, f)).to(S.SCREEN_DTYPE)
        z = (v - arrays["comp_mean_"][torch.from_numpy(f.pred)]) / arrays["comp_std_"][torch.from_numpy(f.pred)]
        two = [i for i, n in enumerate(self.columns_) if n in S.TWO_SIDED]
        return torch.cat([z, z[:, two].abs()], 1).clamp(-1e6, 1e6)

    def validate_params(self) -> None:
        super().validate_params()
        if isinstance(self.C, bool) or not (isinstance(self.C, (int, float)) and np.isfinite(self.C) and self.C > 0):
            raise CsgguardError(f"C must be a positive number, got {self.C!r}")

    def _fit(self, clean: Features, adversarial: Features | None, *, inputs=None, adversarial_inputs=None) -> None:
        from sklearn.linear_model import LogisticRegression

        self._fit_profile(clean)
        x = torch.cat([self.feature_matrix(clean), self.feature_matrix(adversarial)]).numpy()
        y = np.r_[np.zeros(len(clean)), np.ones(len(adversarial))]
        lr = LogisticRegression(C=self.C, class_weight="balanced", max_iter=5000).fit(x, y)
        self.coef_ = lr.coef_.ravel().astype(np.float64)
        self.intercept_ = np.asarray(lr.intercept_, dtype=np.float64).ravel()
        self.n_fit_ = {"clean": int(len(clean)), "adversarial": int(len(adversarial))}

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        return self.feature_matrix(features).numpy() @ self.coef_ + self.intercept_[0]

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, extra = self._profile_state()
        return ({**arrays, "coef_": self.coef_, "intercept_": self.intercept_},
                {**extra, "n_fit_": getattr(self, "n_fit_", {})})

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        self._load_profile(arrays, extra)
        for k in ("coef_", "intercept_"):
            if k not in arrays:
                raise CsgguardError(f"detector state lacks array {k}")
            setattr(self, k, np.asarray(arrays[k], dtype=np.float64))
        width = len(self.columns_) + sum(n in S.TWO_SIDED for n in self.columns_)
        if self.coef_.shape != (width,):
            raise CsgguardError(f"coef_ has shape {self.coef_.shape}, expected ({width},)")
        self.n_fit_ = extra.get("n_fit_", {})

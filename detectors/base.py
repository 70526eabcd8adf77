"""The detector contract: a scikit-learn estimator on :class:`csgguard.features.Features`.

* Every detector subclasses :class:`sklearn.base.BaseEstimator`: ``__init__`` only
  stores its keyword-only parameters, untouched; ``get_params(deep=True)``,
  ``set_params`` and :func:`sklearn.base.clone` work; parameters are validated in
  ``fit`` (``_parameter_constraints``, scikit-learn's own checker), where a bad
  value raises :class:`~csgguard.errors.CsgguardError`.
* ``fit(clean, adversarial=None)`` learns attributes ending in ``_`` from clean
  features (and, for supervised detectors, adversarial ones).
* ``calibrate(clean_heldout)`` sets ``threshold_`` so that the share of held-out
  clean inputs with ``score > threshold_`` is at most ``fpr`` -- on data the fit
  did not use (scikit-learn's novelty detectors instead take a percentile of the
  training scores; calibrating on held-out data is the honest version).
* ``score_samples(features)``: one score per input, **higher = more adversarial**.
* ``decision_function(features) = score_samples - threshold_``; ``predict`` = 1
  (adversarial) where > 0, else 0.

Sign convention and the name of the cut: scikit-learn's novelty detectors score
*higher = more normal*, call their cut ``offset_`` (``decision_function =
score_samples - offset_``) and predict +1 / -1. csgguard's scores point the other
way, so its cut is called ``threshold_`` and there is **no** ``offset_``: an
attribute with scikit-learn's name but the opposite sign would mislead.
* ``state()`` / ``from_state()``: arrays + JSON-able params, so a fitted detector is
  saved as safetensors + JSON (see :mod:`csgguard.detectors.store`), never pickled.

Detectors that need more than features (feature squeezing, Mahalanobis with input
pre-processing) set ``needs_inputs = True`` and receive the model and the [0, 1]
input batch explicitly through ``bind_model`` and the ``inputs=`` keyword.
"""

from __future__ import annotations

from numbers import Real
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils._param_validation import Interval, InvalidParameterError

from ..errors import CsgguardError
from ..features import Features
from ..metrics import check_calibration_size, threshold_at_fpr

if TYPE_CHECKING:  # annotations only: the detectors' numpy path never needs torch imported here
    import torch


class NotFittedError(CsgguardError):
    pass


class Detector(BaseEstimator):
    """Base class: subclasses implement ``_fit`` and ``_score``; calibration lives here once."""

    name: ClassVar[str] = "base"
    supervised: ClassVar[bool] = False     # needs adversarial features to fit
    needs_inputs: ClassVar[bool] = False   # needs the model and raw inputs (extra forward passes)
    needs_gate: ClassVar[bool] = False     # only meaningful on a CSG model
    #: scikit-learn parameter constraints; subclasses extend it with their own parameters
    _parameter_constraints: ClassVar[dict] = {"fpr": [Interval(Real, 0, 1, closed="neither")]}

    def __init__(self, *, fpr: float = 0.05) -> None:
        self.fpr = fpr

    def validate_params(self) -> None:
        """Check every parameter against ``_parameter_constraints`` (scikit-learn's checker)."""
        try:
            self._validate_params()
        except InvalidParameterError as exc:
            raise CsgguardError(f"detector {self.name!r}: {exc}") from None

    def bind_model(self, model) -> Detector:
        """The model a ``needs_inputs`` detector runs its extra passes through; returns ``self``.

        Not a parameter (it is not saved and ``clone`` does not copy it): bind it again
        after loading or cloning.
        """
        self._model = model
        return self

    def _bound_model(self, inputs, who: str):
        model = getattr(self, "_model", None)
        if inputs is None or model is None:
            raise CsgguardError(f"{who} needs the model (bind_model) and the input images")
        return model

    # -- learning -----------------------------------------------------------
    def fit(self, clean: Features, adversarial: Features | None = None, *, inputs=None,
            adversarial_inputs=None) -> Detector:
        self.validate_params()
        if self.needs_gate and clean.gate is None:
            raise CsgguardError(f"detector {self.name!r} needs a CSG model (this model has no gate)")
        if self.supervised and (adversarial is None or len(adversarial) == 0):
            raise CsgguardError(f"detector {self.name!r} is supervised: it needs adversarial examples to fit")
        if len(clean) == 0:
            raise CsgguardError(f"detector {self.name!r}: no clean samples to fit on")
        self._fit(clean, adversarial, inputs=inputs, adversarial_inputs=adversarial_inputs)
        self.fitted_ = True
        return self

    def calibrate(self, clean_heldout: Features, *, inputs=None) -> Detector:
        """Choose ``threshold_`` on held-out clean data for the target ``fpr``."""
        self.validate_params()
        n = len(clean_heldout)
        if n == 0:
            raise CsgguardError("no clean held-out samples to calibrate the threshold on")
        check_calibration_size(n, self.fpr, "clean calibration images")
        scores = self.score_samples(clean_heldout, inputs=inputs)
        threshold = threshold_at_fpr(scores, self.fpr)  # assigned only once it is known to hold
        if np.ptp(scores) == 0:  # a threshold on one value flags all or nothing, whatever comes
            raise CsgguardError(f"detector {self.name!r} gives all {n} clean calibration images the same score "
                                f"({float(scores[0]):g}): it separates nothing (too few clean fit images? raise --limit)")
        if not np.isfinite(threshold):  # say why here, not later as a broken file
            raise CsgguardError(f"detector {self.name!r}: {int((~np.isfinite(scores)).sum())} of {n} clean calibration "
                                f"scores are not finite, so no threshold holds a {self.fpr:g} false-positive rate "
                                "(too few clean fit images for some class? raise --limit)")
        self.threshold_ = threshold
        self.calibration_size_ = n
        # kept (not saved) so a report can read other operating points off the same calibration
        self.calibration_scores_ = scores
        return self

    def threshold_at(self, fpr: float) -> float:
        """The threshold the last :meth:`calibrate` would have chosen for another ``fpr``."""
        scores = getattr(self, "calibration_scores_", None)
        if scores is None:
            raise NotFittedError(f"detector {self.name!r} has no calibration scores (call calibrate)")
        if isinstance(fpr, bool) or not (isinstance(fpr, (int, float)) and 0 < fpr < 1):
            raise CsgguardError(f"fpr must be a number in (0, 1), got {fpr!r}")
        return threshold_at_fpr(scores, fpr)

    # -- scoring ------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not getattr(self, "fitted_", False):
            raise NotFittedError(f"detector {self.name!r} is not fitted yet")

    def score_samples(self, features: Features, *, inputs=None) -> np.ndarray:
        self._check_fitted()
        self._check_shape(features.num_filters, features.num_classes)
        return np.asarray(self._score(features, inputs=inputs), dtype=np.float64)

    def _fitted_shape(self) -> tuple[int | None, int | None]:
        """(K filters, C classes) the fitted arrays read, where they say (``None``: not stated)."""
        return None, None

    def _check_shape(self, k: int, c: int) -> None:
        """The features' K filters and C classes are the fitted ones (not another model's)."""
        k_fit, c_fit = self._fitted_shape()
        if (k_fit is not None and k != k_fit) or (c_fit is not None and c != c_fit):
            raise CsgguardError(f"{self.name}: features have K={k}, C={c} but the detector was fitted "
                                f"for K={k_fit}, C={c_fit} (another model?)")

    def score_signals(self, logits: torch.Tensor, pooled: torch.Tensor, taps=()) -> torch.Tensor | None:
        """The score straight from one forward pass's tensors, on their device, or ``None``.

        Screening on a GPU pays for every host round trip: :class:`Features` are host
        arrays, so scoring through them copies each signal back and waits for it. A
        single-pass detector whose score is a torch function of the signals overrides this to
        give the very number :meth:`score_samples` gives (same function, same dtype), and the
        screener then copies one (N, 3) block back per batch. ``None`` (the default): use
        :meth:`score_samples`.
        """
        return None

    def decision_function(self, features: Features, *, inputs=None) -> np.ndarray:
        if not hasattr(self, "threshold_"):
            raise NotFittedError(f"detector {self.name!r} is not calibrated (call calibrate)")
        return self.score_samples(features, inputs=inputs) - self.threshold_

    def predict(self, features: Features, *, inputs=None) -> np.ndarray:
        """1 = flagged at the calibrated threshold. A NaN score (a damaged input or model) is flagged:
        it compares False with any threshold, and screening must fail closed, never clear it."""
        d = self.decision_function(features, inputs=inputs)
        return ((d > 0) | np.isnan(d)).astype(np.int64)

    # -- to implement -------------------------------------------------------
    def _fit(self, clean: Features, adversarial: Features | None, *, inputs=None, adversarial_inputs=None) -> None:
        raise NotImplementedError

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        raise NotImplementedError

    # -- persistence (arrays + JSON, no pickle) ------------------------------
    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Fitted arrays and JSON-able extras; subclasses extend ``_state``."""
        self._check_fitted()
        arrays, extra = self._state()
        if hasattr(self, "threshold_"):
            extra = {**extra, "threshold_": float(self.threshold_),
                     "calibration_size_": int(getattr(self, "calibration_size_", 0))}
        return arrays, extra

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        raise NotImplementedError

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> Detector:
        det = cls(**params)
        det._load_state(arrays, extra)
        det.fitted_ = True
        if "threshold_" in extra:
            det.threshold_ = float(extra["threshold_"])
            det.calibration_size_ = int(extra.get("calibration_size_", 0))
        return det

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        raise NotImplementedError


def check_array_shapes(arrays: dict[str, np.ndarray], expected: dict[str, tuple[int | str, ...]]) -> dict[str, int]:
    """Each named array has the expected shape: an int is a fixed size, a letter a size every array
    that names it must share (``K`` filters, ``C`` classes ...). Returns the letters' sizes.

    A loaded detector's arrays are checked against each other, so that a file whose arrays are hash-
    valid but do not fit together is refused on loading, naming the array, instead of failing inside
    numpy or scikit-learn on the first image it scores."""
    sizes: dict[str, int] = {}
    for key, dims in expected.items():
        if key not in arrays:
            raise CsgguardError(f"detector state lacks array {key}")
        shape = np.shape(arrays[key])
        ok = len(shape) == len(dims)
        for got, want in zip(shape, dims, strict=False):
            if isinstance(want, str):
                ok = ok and sizes.setdefault(want, got) == got
            else:
                ok = ok and got == want
        if not ok or 0 in shape:
            named = "(" + ", ".join(f"{d}={sizes[d]}" if isinstance(d, str) and d in sizes else str(d)
                                    for d in dims) + ")"
            raise CsgguardError(f"array {key} has shape {shape}, expected {named}")
    return sizes


def stratified_folds(pred: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """A fold (0 .. n_folds - 1) per row, dealt round-robin within each predicted class in a random
    order: every fold holds each class's share to within one row, and every fold's complement holds
    every class that has two rows or more."""
    folds = np.empty(len(pred), dtype=np.int64)
    for c in np.unique(pred):
        rows = rng.permutation(np.flatnonzero(pred == c))
        folds[rows] = (np.arange(len(rows)) + int(rng.integers(n_folds))) % n_folds
    return folds


#: the seed of :func:`calibration_halves` (fixed: a refit splits the same images the same way)
UNITS_SEED = 0


def calibration_halves(pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of held-out clean images in two halves stratified by predicted class (fixed seed): the
    first sets a detector's clean units or tables, the second its threshold, so neither is read
    off images that set the other (csg-clean ``units="held-out"``, ``union``)."""
    half = stratified_folds(pred, 2, np.random.default_rng(UNITS_SEED))
    return np.flatnonzero(half == 0), np.flatnonzero(half == 1)

"""``union``: several clean-only detectors flag together, each read on one clean scale.

Why it exists. No statistic of the single forward pass that csg-clean reads sees a CIFAR-10
perturbation of 2/255-4/255 (docs/detectors.md, the logit and feature-moment probes), while
feature squeezing, which runs the model again on squeezed copies of the input, does see the
small ones and misses the large ones that csg-clean catches. A union keeps both.

Each part's score is turned into its clean *surprise* ``-log P_clean(S >= s)``, read off a
table of clean quantiles (the same piecewise-linear table csg-clean puts its components on:
:func:`csgguard.scores.tail_table` / :func:`csgguard.scores.surprise`, extended linearly
past the last quantile so the order of far-off inputs is kept), and the surprises are summed
(``combine="sum"``: Fisher's method, the combiner csg-clean itself uses) or the largest is
taken (``"max"``).

The tables must come from clean images no part was fitted on (a part's scores on its own fit
images run tight: csg-clean's distances most of all). So ``calibrate`` splits its held-out
clean images in two halves, stratified by predicted class: the parts' tables from one half,
the union's threshold from the other, chosen by :meth:`Detector.calibrate` as everywhere else.

Cost: the sum of the parts' (csg-clean + feature-squeezing: three extra forward passes plus
the median filters, 3-6x one forward pass; ``benchmarks/detector_cost.py``). It is an option
for natural images where that is affordable, not the default. It has no differentiable score, so ``evaluate --adaptive``
does not attack it. Parts must be clean-only detectors that fit without attacking anything
(csg-clean, mahalanobis, feature-squeezing, noise-response; not a union).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.utils._param_validation import StrOptions

from .. import scores as S
from ..errors import CsgguardError
from ..features import Features
from .base import Detector, NotFittedError, calibration_halves

#: how the parts' clean surprises are combined
COMBINES = ("sum", "max")
_PREFIX = "part{}."


class UnionDetector(Detector):
    """The summed (or largest) clean surprise of several clean-only detectors' scores.

    Parameters
    ----------
    parts : str
        Comma-separated detector names, at least two (default ``csg-clean,feature-squeezing``).
    part_params : dict or None
        Parameters of the parts by name, e.g. ``{"feature-squeezing": {"bits": 0, "median": [2]}}``
        (the 2x2 median alone: one extra forward pass instead of three); a part not named keeps
        its defaults.
    combine : {"sum", "max"}
        Sum of the parts' clean surprises (default) or the largest.
    fpr : float
        Target clean false-positive rate of the calibrated threshold.
    """

    name = "union"
    supervised = False
    needs_inputs = True  # handed on to the parts that need them (feature squeezing)
    _parameter_constraints = {
        **Detector._parameter_constraints,
        "parts": [str],
        "part_params": [None, dict],
        "combine": [StrOptions(set(COMBINES))],
    }

    def __init__(self, *, parts: str = "csg-clean,feature-squeezing", part_params: dict | None = None,
                 combine: str = "sum", fpr: float = 0.05) -> None:
        super().__init__(fpr=fpr)
        self.parts = parts
        self.part_params = part_params
        self.combine = combine

    def validate_params(self) -> None:
        super().validate_params()
        for name in self.part_names():
            self._part(name).validate_params()

    def _part(self, name: str) -> Detector:
        """An unfitted part: ``name`` with its ``part_params`` (checked: only the parts' names, dict values)."""
        from . import build_detector

        given = dict(self.part_params or {})
        unknown = sorted(set(given) - set(self.part_names()))
        if unknown:
            raise CsgguardError(f"union: part_params names {', '.join(unknown)}: not among the parts {self.parts!r}")
        own = given.get(name) or {}
        if not isinstance(own, dict) or "fpr" in own:
            raise CsgguardError(f"union: part_params[{name!r}] must be a dict of that detector's parameters (not fpr)")
        try:
            return build_detector(name, fpr=self.fpr, **own)
        except TypeError as exc:
            raise CsgguardError(f"union: part_params[{name!r}]: {exc}") from None

    def part_names(self) -> list[str]:
        """The parts, checked: known names, at least two, no repeats, each clean-only and fittable here."""
        from . import detector_class

        names = [p.strip() for p in str(self.parts).split(",") if p.strip()]
        if len(names) < 2:
            raise CsgguardError(f"union needs at least two parts (comma-separated detector names), got {self.parts!r}")
        if len(set(names)) != len(names):
            raise CsgguardError(f"union: a part is named twice in {self.parts!r}")
        for n in names:
            cls = detector_class(n)
            if cls is UnionDetector or cls.supervised or getattr(cls, "needs_model_to_fit", False):
                raise CsgguardError(f"union: {n!r} cannot be a part (parts are clean-only detectors that fit "
                                    "without adversarial examples or attacks of their own)")
        return names

    def bind_model(self, model) -> UnionDetector:
        super().bind_model(model)
        for part in getattr(self, "parts_", ()):
            part.bind_model(model)
        return self

    # -- fit / calibrate --------------------------------------------------------
    def _fit(self, clean: Features, adversarial=None, *, inputs=None, adversarial_inputs=None) -> None:
        model = getattr(self, "_model", None)
        parts = []
        for n in self.part_names():
            det = self._part(n)
            if model is not None:
                det.bind_model(model)
            det.fit(clean, inputs=inputs if det.needs_inputs else None)
            parts.append(det)
        self.parts_ = parts
        self.tail_q_ = self.tail_s_ = None  # the parts' clean tables come from calibrate

    def calibrate(self, clean_heldout: Features, *, inputs=None) -> UnionDetector:
        """The parts' clean tables from one half of ``clean_heldout`` (stratified by predicted class),
        the threshold from the other half (module docstring)."""
        self._check_fitted()
        table_rows, threshold_rows = calibration_halves(clean_heldout.pred)
        if len(table_rows) < 2:
            raise CsgguardError(f"{len(clean_heldout)} clean calibration images are too few for a union "
                                "(half of them set the parts' clean tables)")
        raw = self._part_scores(clean_heldout.subset(table_rows), _rows(inputs, table_rows))
        self.tail_q_, self.tail_s_ = S.tail_table(raw)
        self.table_images_ = int(len(table_rows))
        return super().calibrate(clean_heldout.subset(threshold_rows), inputs=_rows(inputs, threshold_rows))

    # -- score ------------------------------------------------------------------
    def _part_scores(self, features: Features, inputs) -> np.ndarray:
        """(N, parts) raw scores, each part given the inputs only if it needs them."""
        cols = []
        for part in self.parts_:
            if part.needs_inputs and (inputs is None or getattr(part, "_model", None) is None):
                raise CsgguardError(f"union: part {part.name!r} needs the model (bind_model) and the input images")
            cols.append(part.score_samples(features, inputs=inputs if part.needs_inputs else None))
        return np.stack(cols, 1)

    def part_surprises(self, features: Features, *, inputs=None) -> np.ndarray:
        """(N, parts) each part's clean surprise: what the score combines."""
        self._check_fitted()
        if getattr(self, "tail_q_", None) is None:
            raise NotFittedError("union: not calibrated (its parts' clean tables come from calibrate)")
        raw = torch.from_numpy(self._part_scores(features, inputs))
        tables = {"tail_q_": torch.from_numpy(self.tail_q_), "tail_s_": torch.from_numpy(self.tail_s_)}
        return S.surprise(tables, raw).numpy()

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        s = self.part_surprises(features, inputs=inputs)
        return s.sum(1) if self.combine == "sum" else s.max(1)

    # -- persistence (each part's own arrays under a prefix; no pickle) --------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if getattr(self, "tail_q_", None) is None:
            raise NotFittedError("union: calibrate it before saving (its parts' clean tables come from calibrate)")
        arrays: dict[str, np.ndarray] = {"tail_q_": self.tail_q_, "tail_s_": self.tail_s_}
        parts = []
        for i, part in enumerate(self.parts_):
            a, e = part._state()  # the part's fitted state; a part has no threshold of its own here
            arrays.update({_PREFIX.format(i) + k: v for k, v in a.items()})
            parts.append({"name": part.name, "params": part.get_params(), "state": e})
        return arrays, {"parts_": parts, "table_images_": int(getattr(self, "table_images_", 0))}

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        from . import detector_class

        names = self.part_names()
        saved = extra.get("parts_")
        if not isinstance(saved, list) or [p.get("name") if isinstance(p, dict) else None for p in saved] != names:
            raise CsgguardError(f"union state does not hold the parts {names} its parameters name")
        parts = []
        for i, (name, entry) in enumerate(zip(names, saved, strict=True)):
            prefix = _PREFIX.format(i)
            own = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
            if not isinstance(entry.get("params"), dict):
                raise CsgguardError(f"union state lacks the parameters of part {name!r}")
            parts.append(detector_class(name).from_state(entry["params"], own, dict(entry.get("state") or {})))
        q = np.asarray(arrays.get("tail_q_", np.zeros(0)), dtype=np.float64)
        s = np.asarray(arrays.get("tail_s_", np.zeros(0)), dtype=np.float64)
        if (q.ndim != 2 or q.shape[0] != len(names) or s.shape != (q.shape[1],) or q.shape[1] < 2
                or not (np.all(np.isfinite(q)) and np.all(np.isfinite(s)))
                or np.any(np.diff(q, axis=1) <= 0) or np.any(np.diff(s) <= 0)):
            raise CsgguardError("union state holds no valid clean tables (tail_q_, tail_s_)")
        self.parts_, self.tail_q_, self.tail_s_ = parts, q, s
        self.table_images_ = int(extra.get("table_images_", 0))


def _rows(inputs, rows: np.ndarray):
    return None if inputs is None else inputs[torch.as_tensor(rows)]

"""Detectors (``csgguard.detectors``): gate-pattern detectors and same-harness baselines.

Every detector follows :class:`csgguard.detectors.base.Detector` (scikit-learn
style, on :class:`csgguard.features.Features`). Build one by name with
:func:`build_detector`; names are what ``--detector`` / ``--detectors`` accept.
"""

from __future__ import annotations

import importlib

from ..errors import CsgguardError
from .base import Detector, NotFittedError

# name -> "module:Class", imported on first use so a detector's dependencies load only when used
DETECTORS: dict[str, str] = {
    "csg-clean": "gate:GateCleanDetector",
    "csg-supervised": "gate:GateSupervisedDetector",
    "csg-robust": "robust:GateRobustDetector",
    "mahalanobis": "mahalanobis:MahalanobisDetector",
    "lid": "lid:LIDDetector",
    "kd-bu": "kd_bu:KDBUDetector",
    "feature-squeezing": "squeeze:FeatureSqueezingDetector",
    "noise-response": "noise:NoiseResponseDetector",
    "union": "union:UnionDetector",
}


def detector_class(name: str) -> type[Detector]:
    try:
        target = DETECTORS[name]
    except KeyError:
        raise CsgguardError(f"unknown detector {name!r}; choose from {', '.join(DETECTORS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build_detector(name: str, **params) -> Detector:
    return detector_class(name)(**params)


__all__ = ["DETECTORS", "Detector", "NotFittedError", "build_detector", "detector_class"]

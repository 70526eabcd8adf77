"""Saving and loading fitted detectors: ``detector.safetensors`` (arrays) + ``detector.json``.

Generic over every :class:`~csgguard.detectors.base.Detector`: the arrays come from
``state()``, the detector is rebuilt by registry name with ``from_state()``. The JSON
records the parameters, the threshold and target FPR, what the fit used, the sha256
of the arrays file and the sha256 of the model weights the detector belongs to.
Loading checks both hashes before a byte of the arrays is parsed, so a tampered file
or a detector for another model is refused; nothing is ever unpickled.

The JSON fields that decide what is flagged (name, params, fitted state, threshold,
fpr, model hash) are also kept, canonically spelled, in the arrays file's metadata
(format version 2), which the arrays' sha256 covers: a detector.json edited alone
(``threshold: 1e308``) is refused. Every number is checked to be finite; the
threshold must lie within +-1e12 and the fpr in (0, 1).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import (
    canonical_json,
    check_finite,
    check_format_version,
    library_versions,
    load_tensors,
    read_json,
    save_tensors,
    to_jsonable,
    write_json,
)
from ..errors import ArtifactError, CsgguardError
from .base import Detector

DETECTOR_FORMAT = "csgguard.detector"
FORMAT_VERSION = 2
COVERED = ("name", "params", "fitted", "threshold", "fpr", "model_sha256")
MAX_THRESHOLD = 1e12
ARRAYS_FILE = "detector.safetensors"
MANIFEST_FILE = "detector.json"


def detector_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """``RUN`` -> (RUN/detector.json, RUN/detector.safetensors); ``X.json`` -> (X.json, X.safetensors)."""
    p = Path(path)
    if p.suffix in (".json", ".safetensors"):
        return p.with_suffix(".json"), p.with_suffix(".safetensors")
    if p.exists() and not p.is_dir():  # e.g. an image passed as the detector: say so, not "PATH/detector.json"
        raise ArtifactError(f"{p}: not a detector (give its .json manifest, which sits beside its .safetensors, "
                            "or the folder holding detector.json)")
    return p / MANIFEST_FILE, p / ARRAYS_FILE


def save_detector(det: Detector, path: str | os.PathLike, *, model_sha256: str,
                  extra_meta: dict[str, Any] | None = None) -> Path:
    """Write the arrays, then the manifest (both atomically); return the manifest path."""
    if not model_sha256:
        raise CsgguardError("save_detector needs the sha256 of the model the detector belongs to")
    manifest_path, arrays_path = detector_paths(path)
    arrays, extra = det.state()
    tensors = {k: torch.from_numpy(np.ascontiguousarray(np.asarray(v))) for k, v in arrays.items()}
    covered = to_jsonable({
        "name": det.name,
        "params": det.get_params(),
        "fitted": extra,
        "threshold": float(det.threshold_) if hasattr(det, "threshold_") else None,
        "fpr": float(det.fpr),
        "model_sha256": model_sha256,
    })
    _check_numbers(covered, manifest_path)
    digest = save_tensors(arrays_path, tensors, metadata={"format": DETECTOR_FORMAT,
                                                          "manifest": canonical_json(covered)})
    manifest = {
        "format": DETECTOR_FORMAT,
        "format_version": FORMAT_VERSION,
        **covered,
        "arrays": {"file": arrays_path.name, "sha256": digest},
        "versions": library_versions(),
        **(extra_meta or {}),
    }
    return write_json(manifest_path, to_jsonable(manifest))


def read_detector_manifest(path: str | os.PathLike) -> dict[str, Any]:
    manifest_path, _ = detector_paths(path)
    if not manifest_path.is_file():
        raise ArtifactError(f"{manifest_path}: detector not found (fit one with `csgguard fit`)")
    manifest = read_json(manifest_path, "detector manifest")
    if manifest.get("format") != DETECTOR_FORMAT:
        raise ArtifactError(f"{manifest_path}: not a csgguard detector manifest (format={manifest.get('format')!r})")
    check_format_version(manifest, manifest_path, FORMAT_VERSION)
    for key in ("name", "params", "model_sha256", "arrays"):
        if key not in manifest:
            raise ArtifactError(f"{manifest_path}: detector manifest lacks {key!r}")
    _check_numbers({k: manifest.get(k) for k in COVERED}, manifest_path)
    return manifest


def _check_numbers(fields: dict[str, Any], where: Path) -> None:
    """Threshold finite and within +-1e12, fpr in (0, 1), every number in params / fitted finite."""
    import math

    def walk(v: Any, at: str) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise ArtifactError(f"{where}: {at} is {v!r}; every number must be finite")
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, f"{at}.{k}")
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{at}[{i}]")

    for key in ("params", "fitted"):
        walk(fields.get(key), key)
    t = fields.get("threshold")
    if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)
                          or abs(t) > MAX_THRESHOLD):
        raise ArtifactError(f"{where}: threshold {t!r} is not a finite number within +-{MAX_THRESHOLD:g}")
    fpr = fields.get("fpr")
    if fpr is not None and (isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1):
        raise ArtifactError(f"{where}: fpr {fpr!r} must be a number in (0, 1)")
    fitted = fields.get("fitted")
    if isinstance(fitted, dict) and "threshold_" in fitted and t is not None and fitted["threshold_"] != t:
        raise ArtifactError(f"{where}: threshold {t!r} differs from fitted.threshold_ {fitted['threshold_']!r}")


def load_detector(path: str | os.PathLike, *, model_sha256: str | None) -> Detector:
    """Load a detector, refusing one fitted for another model or whose arrays were altered.

    ``model_sha256=None`` skips the model check (for inspecting a detector file alone).
    """
    from . import detector_class

    manifest_path, _ = detector_paths(path)
    manifest = read_detector_manifest(path)
    if model_sha256 is not None and manifest["model_sha256"] != model_sha256:
        raise ArtifactError(f"{manifest_path}: detector belongs to model {str(manifest['model_sha256'])[:12]}..., "
                            f"not this one ({model_sha256[:12]}...); refit it with `csgguard fit`")
    arrays_info = manifest["arrays"]
    if not isinstance(arrays_info, dict) or not arrays_info.get("sha256"):
        raise ArtifactError(f"{manifest_path}: detector manifest has no arrays sha256; refusing to load")
    if not isinstance(arrays_info["sha256"], str):
        raise ArtifactError(f"{manifest_path}: arrays sha256 {arrays_info['sha256']!r} is not a hex digest; "
                            "refusing to load")
    name = Path(str(arrays_info.get("file", ARRAYS_FILE))).name  # never leave the manifest's folder
    tensors, meta = load_tensors(manifest_path.parent / name, arrays_info["sha256"], with_metadata=True)
    if "manifest" in meta:
        if canonical_json({k: manifest.get(k) for k in COVERED}) != meta["manifest"]:
            raise ArtifactError(f"{manifest_path}: its fields differ from the copy the arrays' hash covers "
                                "(detector.json edited?); refusing to load")
    elif manifest.get("format_version", 1) >= 2:
        raise ArtifactError(f"{manifest_path}: its arrays file lacks the manifest copy format version 2 requires")
    check_finite(tensors, manifest_path.parent / name, allow_inf=True)  # mahalanobis: inf = class never seen
    arrays = {k: v.numpy() for k, v in tensors.items()}
    params, fitted = manifest["params"], manifest.get("fitted") or {}
    if not isinstance(params, dict) or not isinstance(fitted, dict):
        raise ArtifactError(f"{manifest_path}: 'params' and 'fitted' must be JSON objects")
    try:
        cls = detector_class(str(manifest["name"]))
        det = cls.from_state(params, arrays, fitted)
    except CsgguardError as exc:
        raise ArtifactError(f"{manifest_path}: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{manifest_path}: invalid detector state ({exc.__class__.__name__}: {exc})") from None
    det.manifest_ = manifest
    return det

"""Adversarial sets: the arrays an attack produced, and their file format.

A set is saved as two files written atomically:

* ``NAME.npz``      ``np.savez`` arrays, readable with ``numpy.load(path, allow_pickle=False)``:
  ``x`` (clean, float32 NCHW in [0, 1]), ``x_adv``, ``y`` (true labels), ``pred`` (clean
  prediction), ``pred_adv`` (prediction of ``x_adv``), ``success``, ``attacked`` (bool),
  ``index`` (dataset indices) and ``meta`` (the metadata as a JSON string, a 0-d unicode array).
* ``NAME.npz.json`` the sidecar: the same metadata, readable by people and ``jq``, plus the
  npz file's sha256 under ``"npz_sha256"``.

Rows that were not attacked (misclassified clean inputs) or whose attack failed keep
``x_adv == x`` and ``success == False``: a failed attack (e.g. a C&W sample that comes
back from foolbox as an all-zero image) is never stored as if it were adversarial.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import atomic_write_bytes, read_json, sha256_bytes, to_jsonable, write_json
from ..errors import ArtifactError

FORMAT = "csgguard.adversarial_set"
FORMAT_VERSION = 1
ARRAYS = ("x", "x_adv", "y", "pred", "pred_adv", "success", "attacked", "index")
_DTYPES = {"x": np.float32, "x_adv": np.float32, "y": np.int64, "pred": np.int64, "pred_adv": np.int64,
           "success": np.bool_, "attacked": np.bool_, "index": np.int64}


@dataclass
class AdversarialSet:
    """One attack's result on a batch of inputs; every array has one row per input."""

    x: np.ndarray
    x_adv: np.ndarray
    y: np.ndarray
    pred_adv: np.ndarray
    success: np.ndarray
    index: np.ndarray
    pred: np.ndarray | None = None
    attacked: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pred is None:
            self.pred = self.y.copy()
        if self.attacked is None:
            self.attacked = self.pred == self.y
        for name in ARRAYS:
            setattr(self, name, np.asarray(getattr(self, name), dtype=_DTYPES[name]))
        n = len(self.y)
        for name in ARRAYS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"AdversarialSet: {name} has {len(getattr(self, name))} rows, y has {n}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def success_rate(self) -> float | None:
        """Successes over attacked (correctly classified) inputs; None when nothing was attacked."""
        attacked = int(self.attacked.sum())
        return float(self.success.sum()) / attacked if attacked else None

    def subset(self, rows: np.ndarray) -> AdversarialSet:
        rows = np.asarray(rows)
        arrays = {name: getattr(self, name)[rows] for name in ARRAYS}
        return AdversarialSet(**arrays, meta=dict(self.meta))

    def successful(self) -> AdversarialSet:
        """Only the rows whose attack succeeded: what a detector should be tested on."""
        return self.subset(np.flatnonzero(self.success))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in ARRAYS}


def sidecar_path(path: str | os.PathLike) -> Path:
    """``attacks/pgd.npz`` -> ``attacks/pgd.npz.json`` (unambiguous for any file name)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_adversarial_set(path: str | os.PathLike, advset: AdversarialSet) -> Path:
    """Write ``path`` (npz) then its sidecar, both atomically; return ``path``."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path}: is a directory; give a file name such as {path}/pgd.npz")
    meta = dict(to_jsonable(advset.meta))
    meta.setdefault("format", FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    meta_json = json.dumps(meta, sort_keys=True)
    buf = io.BytesIO()
    np.savez(buf, **advset.arrays(), meta=np.array(meta_json))
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    write_json(sidecar_path(path), {**meta, "npz_file": path.name, "npz_sha256": sha256_bytes(data)})
    return path


def _check_arrays(arrays: dict[str, np.ndarray], path: Path) -> None:
    """Images: N x C x H x W floats, finite, ``x_adv`` shaped like ``x``; every other array one value per
    row of its kind (integers, booleans). A hash recomputed over a tampered file passes; these do not."""
    x, x_adv = arrays["x"], arrays["x_adv"]
    if x.ndim != 4 or x_adv.shape != x.shape:
        raise ArtifactError(f"{path}: x and x_adv must be N x C x H x W of one shape, got {x.shape} and {x_adv.shape}")
    for k in ("x", "x_adv"):
        if arrays[k].dtype.kind != "f" or not np.isfinite(arrays[k]).all():
            raise ArtifactError(f"{path}: {k} must hold finite floats, got {arrays[k].dtype} with NaN / inf or "
                                "not floating point")
    for k in ARRAYS[2:]:
        kind = "b" if _DTYPES[k] is np.bool_ else "iu"
        if arrays[k].ndim != 1 or arrays[k].dtype.kind not in kind:
            raise ArtifactError(f"{path}: {k} must be one {'boolean' if kind == 'b' else 'integer'} per row, "
                                f"got {arrays[k].dtype} of shape {arrays[k].shape}")


def load_adversarial_set(path: str | os.PathLike) -> AdversarialSet:
    """Read a set after checking its sha256 against the sidecar; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: adversarial set not found (make one with `csgguard attack`)")
    side = sidecar_path(path)
    if not side.is_file():
        raise ArtifactError(f"{path}: sidecar {side.name} not found; refusing to load an unverified set")
    sidecar = read_json(side, "adversarial-set sidecar")
    if sidecar.get("format") != FORMAT:
        raise ArtifactError(f"{side}: not an adversarial-set sidecar (format={sidecar.get('format')!r})")
    data = path.read_bytes()
    expected, actual = sidecar.get("npz_sha256"), sha256_bytes(data)
    if actual != expected:
        raise ArtifactError(f"{path}: sha256 {actual[:12]}... does not match the sidecar's "
                            f"{str(expected)[:12]}... (file altered or from another attack); refusing to load")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            missing = [k for k in (*ARRAYS, "meta") if k not in npz.files]
            if missing:
                raise ArtifactError(f"{path}: lacks arrays {', '.join(missing)}")
            arrays = {k: npz[k] for k in ARRAYS}
            meta = json.loads(str(npz["meta"]))
    except (ValueError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not a valid adversarial-set npz ({exc.__class__.__name__}: {exc})") from None
    _check_arrays(arrays, path)
    side_meta = {k: v for k, v in sidecar.items() if k not in ("npz_file", "npz_sha256")}
    if json.dumps(side_meta, sort_keys=True) != json.dumps(meta, sort_keys=True):
        raise ArtifactError(f"{side}: metadata differs from the copy inside {path.name} (sidecar edited?)")
    try:
        return AdversarialSet(**arrays, meta=meta)
    except ValueError as exc:
        raise ArtifactError(f"{path}: {exc}") from None

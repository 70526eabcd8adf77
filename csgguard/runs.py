"""Reopening a run's data: the splits a run was trained with, for every command after ``train``.

``csgguard train`` records in ``model.json``'s ``dataset`` section what opened its
data: the dataset spec (``imagefolder:`` with its absolute path), the data root,
the effective validation fraction, the split seed and any ``train_limit``, plus the
size of each split. :func:`load_run_dataset` opens the data the same way, so
``fit`` calibrates on the run's own validation images (never on images it trained
on), and ``attack``, ``evaluate``, ``inspect`` and the demo see the same test
split. If the files under the root changed since training (other split sizes),
it says so instead of silently using other splits.

Runs written before the ``dataset`` section held the recipe fall back to the
``training`` section (``data``, ``data_root``, ``val_fraction``, ``train_limit``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset, load_dataset
from .errors import CsgguardError, DataError


def run_data_recipe(manifest: dict[str, Any], data_root: str | os.PathLike | None = None, *,
                    where: str | os.PathLike = "model.json") -> dict[str, Any]:
    """``spec``, ``data_root``, ``val_fraction``, ``split_seed``, ``train_limit`` of a run's data.

    ``data_root`` overrides the recorded root (the data moved); for an
    ``imagefolder:PATH`` run it replaces ``PATH``. The manifest's ``dataset`` and ``training``
    sections are outside the weights' hash, so each value is checked here (``where`` names the
    file in the one-line error).
    """
    info = _section(manifest, "dataset", where)
    training = _section(manifest, "training", where)
    spec = info.get("spec") or training.get("data") or info.get("name") or "digits"
    root = info.get("data_root", training.get("data_root"))
    vf = info.get("val_fraction", training.get("val_fraction"))
    limit = info.get("train_limit", training.get("train_limit"))
    seed = info.get("split_seed", 0)
    _expect(isinstance(spec, str), where, "dataset spec", spec, "a dataset name")
    _expect(root is None or isinstance(root, str), where, "data_root", root, "a path or null")
    _expect(vf is None or (_number(vf) and 0 < vf < 1), where, "val_fraction", vf, "a number in (0, 1)")
    _expect(limit is None or (_integer(limit) and limit >= 1), where, "train_limit", limit, "an integer >= 1")
    _expect(_integer(seed) and 0 <= seed < 2 ** 32, where, "split_seed", seed, "an integer in [0, 2**32)")
    if data_root is not None:
        if spec.startswith("imagefolder:"):
            spec = f"imagefolder:{os.fspath(data_root)}"
        else:
            root = os.fspath(data_root)
    return {"spec": spec, "data_root": root, "val_fraction": None if vf is None else float(vf),
            "split_seed": int(seed), "train_limit": None if limit is None else int(limit)}


def _section(manifest: dict[str, Any], key: str, where) -> dict[str, Any]:
    value = manifest.get(key) or {}
    if not isinstance(value, dict):
        raise CsgguardError(f"{where}: '{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _expect(ok: bool, where, name: str, value: Any, what: str) -> None:
    if not ok:
        raise CsgguardError(f"{where}: {name} {value!r} must be {what}")


def apply_train_limit(ds: Dataset, train_limit: int | None) -> Dataset:
    """The first ``train_limit`` training images only (what ``TrainConfig.train_limit`` trains on)."""
    if train_limit is not None and train_limit < len(ds.train):
        ds = dataclasses.replace(ds, train=ds.train.subset(np.arange(train_limit)))
    return ds


def load_run_dataset(run: Any, *, data_root: str | os.PathLike | None = None) -> Dataset:
    """The train / val / test splits ``run`` was trained with.

    ``run`` is a run directory or a :class:`~csgguard.models.store.LoadedModel`
    (anything with a ``manifest``); ``data_root`` relocates the data (see
    :func:`run_data_recipe`). Raises :class:`~csgguard.errors.DataError` when the
    data found there no longer splits into the recorded sizes.
    """
    if hasattr(run, "manifest"):
        manifest, where = run.manifest, getattr(run, "run_dir", "run")
    else:
        from .models.store import read_manifest

        manifest, where = read_manifest(run), Path(run)
    model_json = Path(str(where)) / "model.json"
    r = run_data_recipe(manifest, data_root, where=model_json)
    ds = load_dataset(r["spec"], r["data_root"], seed=r["split_seed"], val_fraction=r["val_fraction"])
    ds = apply_train_limit(ds, r["train_limit"])
    recorded = (manifest.get("dataset") or {}).get("sizes") or {}
    if not isinstance(recorded, dict) or not all(_integer(v) and v >= 0 for v in recorded.values()):
        raise CsgguardError(f"{model_json}: dataset sizes {recorded!r} must map splits to counts")
    found = {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test)}
    differ = {k: (int(v), found[k]) for k, v in recorded.items() if k in found and int(v) != found[k]}
    if differ:
        text = ", ".join(f"{k} {got} (trained with {want})" for k, (want, got) in differ.items())
        raise DataError(f"{where}: {r['spec']} no longer splits as it did in training: {text}; "
                        "point --data-root at the data the run was trained on")
    return ds

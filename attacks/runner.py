"""Attacks by name: the registry, :func:`run` on tensors and :func:`attack_run_split` on a run directory."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CsgguardError, DataError
from .advset import AdversarialSet
from .base import AttackSpec
from .specs import BIM, FGSM, PGD, CarliniWagnerL2, DeepFool

ATTACKS: dict[str, type[AttackSpec]] = {
    "fgsm": FGSM,
    "bim": BIM,
    "pgd": PGD,
    "cw": CarliniWagnerL2,
    "deepfool": DeepFool,
}


def make_attack(method: str | AttackSpec, **settings: Any) -> AttackSpec:
    """Build a spec by name; ``None`` settings mean "the default"; unknown settings are an error."""
    if isinstance(method, AttackSpec):
        if any(v is not None for v in settings.values()):
            raise CsgguardError("pass settings either to the spec or to run(), not both")
        return method
    from ..adaptive import adaptive_spec  # adaptive / adaptive-<form>: against a fitted detector

    cls = ATTACKS.get(str(method).lower()) or adaptive_spec(method)
    if cls is None:
        raise CsgguardError(f"unknown attack {method!r}; choose from {', '.join(ATTACKS)}, adaptive[-FORM]")
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    given = {k: v for k, v in settings.items() if v is not None}
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise CsgguardError(f"{cls.name} has no setting {', '.join(map(repr, unknown))} "
                            f"(it takes {', '.join(accepted)})")
    return cls(**given)


def run(model: Any, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, method: str | AttackSpec = "pgd",
        *, eps: float | None = None, norm: str | None = None, steps: int | None = None, batch_size: int = 256,
        seed: int = 0, device: str | torch.device | None = None, progress: bool | None = None,
        index: np.ndarray | None = None, dataset: str | None = None, compile: bool = False,
        **settings: Any) -> AdversarialSet:
    """Attack the inputs ``model`` classifies correctly and return an :class:`AdversarialSet`.

    ``model`` is a CSGNet, any torch classifier on [0, 1] inputs, or a
    :class:`~csgguard.LoadedModel` (whose weights sha256 goes into the metadata).
    ``eps`` defaults per dataset (``dataset`` name, else guessed from the image shape);
    giving it to a minimisation attack (cw, deepfool) is an error. Other keywords
    are the spec's settings, e.g. ``restarts=3`` for pgd or ``preset="thorough"`` for cw.
    Seeded: the same call returns the same arrays (the global RNG is left untouched).
    ``compile=True`` runs the attack's steps through ``torch.compile`` (:mod:`csgguard.compiling`).
    """
    spec = make_attack(method, norm=norm, steps=steps, **settings)
    sha = getattr(model, "sha256", None)
    net = getattr(model, "model", model)
    if not isinstance(net, torch.nn.Module):
        raise CsgguardError(f"model must be a torch.nn.Module or LoadedModel, got {type(model).__name__}")
    return spec.run(net, torch.as_tensor(x), torch.as_tensor(y), eps=eps, batch_size=batch_size, seed=seed,
                    device=device, progress=progress, index=index, dataset=dataset, model_sha256=sha,
                    compile=compile)


def attack_run_split(run_dir_or_loaded_model: Any, split: str = "test", method: str | AttackSpec = "pgd", *,
                     limit: int | None = None, data: str | None = None, data_root: str | os.PathLike | None = None,
                     eps: float | None = None, norm: str | None = None, steps: int | None = None,
                     batch_size: int = 256, seed: int = 0, device: str | torch.device | None = "auto",
                     progress: bool | None = None, compile: bool = False, **settings: Any) -> AdversarialSet:
    """Load a run's model and dataset, take ``split`` (first ``limit`` images) and :func:`run` on it.

    The data are the run's own splits (:func:`csgguard.runs.load_run_dataset`);
    ``data_root`` relocates them, ``data`` names another dataset instead. The
    attack's settings are checked before anything is loaded, so a bad request fails fast.
    """
    from ..data import load_dataset
    from ..devices import select_device
    from ..models.store import LoadedModel, load_model
    from ..runs import load_run_dataset

    spec = make_attack(method, norm=norm, steps=steps, **settings)
    if getattr(spec, "needs_detector", False) and spec.detector is None:
        spec.detector = str(run_dir_or_loaded_model if isinstance(run_dir_or_loaded_model, (str, os.PathLike))
                            else run_dir_or_loaded_model.run_dir)  # the run's own fitted detector
    spec.resolve_eps(eps)  # range and "eps for a minimisation attack" errors, before loading anything
    if batch_size < 1:
        raise CsgguardError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise CsgguardError(f"--limit must be >= 1, got {limit} (nothing to attack)")

    dev = select_device(device)
    if isinstance(run_dir_or_loaded_model, LoadedModel):
        loaded = run_dir_or_loaded_model
        loaded.model.to(dev)
    else:
        loaded = load_model(Path(run_dir_or_loaded_model), dev)
    # the run's own splits (same val_fraction and seed as training) unless --data names other data
    ds = load_dataset(data, data_root) if data else load_run_dataset(loaded, data_root=data_root)
    data = ds.name
    part = ds.split(split)
    if limit is not None:
        part = part.subset(np.arange(min(limit, len(part))))
    if len(part) == 0:
        raise DataError(f"{data}: split {split!r} is empty; nothing to attack")
    expected = (loaded.input_spec.get("channels"), loaded.input_spec.get("height"), loaded.input_spec.get("width"))
    if tuple(part.images.shape[1:]) != expected:
        raise DataError(f"{data}: images are {tuple(part.images.shape[1:])} but the model in {loaded.run_dir} "
                        f"expects {expected}")
    advset = run(loaded, part.x(), part.labels, spec, eps=eps, batch_size=batch_size, seed=seed, device=dev,
                 progress=progress, index=part.indices, dataset=data, compile=compile)
    advset.meta.update({"run_dir": str(loaded.run_dir), "dataset": data, "split": split, "limit": limit})
    return advset


def default_output_path(run_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """``RUN/attacks/<attack>-<norm>-<eps or preset>-<split>.npz``, e.g. ``pgd-linf-0.1-test.npz``."""
    settings = meta.get("settings") or {}
    budget = f"{meta['eps']:.4g}" if meta.get("eps") is not None else settings.get("preset", "min")
    parts = [meta["attack"], meta["norm"], str(budget)]
    if meta.get("split"):
        parts.append(str(meta["split"]))
    return Path(run_dir) / "attacks" / ("-".join(parts) + ".npz")

"""``csgguard fit`` as one Python call: features -> fit -> calibrate -> save.

Split policy (the evaluation protocol of docs/method.md section 4, applied here):

* **train split** -- the clean statistics are fitted on the model's training images
  that it classifies correctly (optionally the first ``limit`` of them). A supervised
  detector's adversarial examples are generated (``csgguard.attacks.run``) from those
  same training images, every attack at every budget of the sweep (:mod:`csgguard.sweep`),
  so nothing it learns comes from held-out data.
* **val split** -- held out, never seen by the fit: the threshold is chosen there by
  :meth:`Detector.calibrate`, on *every* clean val image (misclassified ones included:
  screening cannot know which inputs the model gets wrong), for the target
  false-positive rate -- the same call and population ``csgguard evaluate`` uses.
* **test split** -- never touched by ``fit``: it belongs to ``csgguard evaluate``.

The detector is saved into the run directory (``detector.safetensors`` +
``detector.json``) with the model hash, so it is refused by any other model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Split
from .devices import select_device
from .errors import CsgguardError
from .features import Features, extract_features
from .metrics import check_calibration_size
from .models.store import LoadedModel, load_model
from .runs import load_run_dataset
from .sweep import (
    Cell,
    build_cells,
    check_attack_names,
    check_budgets,
    parse_budget_list,
    resolve_budgets,
)


@dataclass
class FitResult:
    detector: Any
    path: Path
    summary: dict[str, Any] = field(default_factory=dict)


def _clean_features(loaded: LoadedModel, split: Split, batch_size: int, device) -> tuple[Features, np.ndarray]:
    """Features of the correctly classified images of ``split`` and their positions in it."""
    feats = extract_features(loaded.model, split.x(), batch_size=batch_size, device=device)
    feats.require_finite(str(loaded.run_dir))
    keep = np.flatnonzero(feats.pred == split.labels.numpy())
    return feats.subset(keep), keep


def _adversarial_features(loaded: LoadedModel, split: Split, cells: Sequence[Cell], batch_size: int, seed: int,
                          device, progress, dataset: str) -> tuple[Features, dict[str, dict[str, Any]]]:
    """Successful adversarial examples of every cell (attack at a budget) on ``split``, features pooled."""
    from .attacks import run as run_attack

    parts, counts = [], {}
    for i, cell in enumerate(cells):
        kwargs: dict[str, Any] = {"batch_size": batch_size, "seed": seed + i, "device": device,
                                  "progress": progress, "dataset": dataset}
        if cell.eps is not None:  # minimum-norm attacks (cw, deepfool) take no budget
            kwargs.update(eps=cell.eps, norm=cell.norm)
        adv = run_attack(loaded, split.x(), split.labels, cell.method, **kwargs)
        ok = adv.successful()
        x_adv = torch.as_tensor(np.asarray(ok.x_adv, dtype=np.float32))
        counts[cell.id] = {"attack": cell.attack, "norm": adv.meta.get("norm", cell.norm),
                           "eps": adv.meta.get("eps"), "attacked": int(np.sum(adv.attacked)),
                           "successful": int(len(x_adv))}
        if len(x_adv):
            parts.append(extract_features(loaded.model, x_adv, batch_size=batch_size, device=device))
    if not parts:
        raise CsgguardError(f"no successful adversarial examples from {', '.join(c.id for c in cells)}: cannot "
                            "fit a supervised detector (raise --eps)")
    return Features.concat(parts), counts


def fit_detector(run_dir: str | Path = "runs/default", *, detector: str = "csg-clean",
                 attacks: Sequence[str] = ("pgd", "fgsm"), eps: float | str | Sequence[float] | None = None,
                 l2_eps: float | str | Sequence[float] | None = None, fpr: float = 0.05,
                 limit: int | None = None, params: dict[str, Any] | None = None, device: str = "auto",
                 data_root: str | None = None, out: str | Path | None = None, batch_size: int = 256,
                 seed: int = 0, progress: bool | None = None, log: Callable[[str], None] | None = None
                 ) -> FitResult:
    """Fit, calibrate and save a detector for the model in ``run_dir`` (see the module's split policy).

    A supervised detector sees every attack of ``attacks`` at every budget of its norm:
    ``eps`` (Linf, for fgsm / pgd / bim) and ``l2_eps`` (L2, for pgd-l2 / bim-l2), each a
    number, a list or text like ``"0.05,0.1"``; None means the dataset's default sweep.
    """
    from .detectors import detector_class
    from .detectors.store import save_detector

    if not 0.0 < fpr < 1.0:
        raise CsgguardError(f"--fpr must be between 0 and 1, got {fpr}")
    if limit is not None and limit < 1:
        raise CsgguardError(f"--limit must be >= 1, got {limit}")
    cls = detector_class(detector)
    # the whole request is checked before any work (even what only a supervised detector would use)
    linf_req, l2_req = parse_budget_list(eps, "--eps"), parse_budget_list(l2_eps, "--l2-eps")
    if linf_req is not None:
        check_budgets(linf_req, "linf")
    if l2_req is not None:
        check_budgets(l2_req, "l2")
    if cls.supervised or any(str(a).strip() for a in attacks):
        attacks = check_attack_names((a for a in attacks if str(a).strip()), "attack")
        build_cells(attacks, (), ())  # explicit NAME@BUDGET ranges
    if out is None:  # a shipped run's folder is part of the package (csgguard.shipped)
        from .shipped import refuse_shipped_output, resolve_run

        refuse_shipped_output(resolve_run(run_dir), "out= (--out)")
    log = log or (lambda _msg: None)
    start = time.perf_counter()
    dev = select_device(device)
    loaded = load_model(run_dir, dev)
    ds = load_run_dataset(loaded, data_root=data_root)
    data_name = ds.name
    train = ds.train if limit is None else ds.train.subset(np.arange(min(limit, len(ds.train))))
    # what the data decides is checked now too, before the features are extracted (minutes on CIFAR-10)
    check_calibration_size(len(ds.val), fpr, "clean calibration images (the val split)")
    cells = None
    if cls.supervised:
        shape = tuple(train.images.shape[1:])
        cells = build_cells(attacks, resolve_budgets(linf_req, "linf", ds.name, shape),
                            resolve_budgets(l2_req, "l2", ds.name, shape))

    clean, keep = _clean_features(loaded, train, batch_size, dev)
    log(f"fit: {len(clean)} clean {data_name} train images (correctly classified of {len(train)})")
    adversarial, counts = None, {}
    if cells is not None:
        adversarial, counts = _adversarial_features(loaded, train.subset(keep), cells, batch_size, seed,
                                                    dev, progress, data_name)
        log(f"fit: {len(adversarial)} successful adversarial train images ({', '.join(counts)})")
    det = cls(**{**(params or {}), "fpr": fpr})
    fit_kw = {}
    # csg-robust attacks itself while it trains; feature squeezing (and a union holding it) and Mahalanobis
    # with noise > 0 (hence the instance's flag, not the class's) run the model again: all need the model
    # and the [0, 1] images
    with_inputs = det.needs_inputs or getattr(cls, "needs_model_to_fit", False)
    if with_inputs:
        det.bind_model(loaded.model)
        fit_kw["inputs"] = train.subset(keep).x()
    det.fit(clean, adversarial, **fit_kw)

    # every clean val image, misclassified ones included: screening cannot tell them apart (the same
    # population `csgguard evaluate` calibrates on)
    val_x = ds.val.x()
    calib = extract_features(loaded.model, val_x, batch_size=batch_size, device=dev)
    det.calibrate(calib, inputs=val_x if det.needs_inputs else None)
    from .screening import MAX_THRESHOLD

    if not (np.isfinite(det.threshold_) and abs(det.threshold_) <= MAX_THRESHOLD):
        # saving would refuse it anyway; say why it happened instead of blaming the file
        raise CsgguardError(f"{detector}: the calibrated threshold {det.threshold_:.4g} is beyond +-{MAX_THRESHOLD:g}: "
                            f"the scores are degenerate, most likely from too few fit images ({len(clean)} clean"
                            f"{'' if limit is None else f', --limit {limit}'}); fit on more images")
    realised = float(np.mean(det.calibration_scores_ > det.threshold_))
    n_threshold = int(det.calibration_size_)  # fewer than len(calib) where half of val set csg-clean's units
    fitted_on = {"dataset": data_name, "fit_split": "train", "calibration_split": "val",
                 "clean": int(len(clean)), "train_images": int(len(train)), "limit": limit,
                 "adversarial": int(len(adversarial)) if adversarial is not None else 0,
                 "attacks": counts, "calibration": n_threshold,
                 "calibration_population": "every clean val image (misclassified included)"}
    if n_threshold < len(calib):
        fitted_on["units_images"] = int(len(calib) - n_threshold)
        fitted_on["calibration_population"] = ("the threshold half of the clean val images (misclassified "
                                               "included); the other half set the units (a union's: its "
                                               "parts' clean tables)")
    path = save_detector(det, out if out is not None else loaded.run_dir, model_sha256=loaded.sha256,
                         extra_meta={"fitted_on": fitted_on, "realised_fpr_calibration": realised})
    summary = {"detector": detector, "path": str(path), "threshold": float(det.threshold_), "fpr": fpr,
               "realised_fpr_val": realised, "clean_fit": len(clean),
               "adversarial_fit": fitted_on["adversarial"], "calibration": n_threshold,
               "attacks": ",".join(counts) if counts else None, "threshold_1pct": det.threshold_at(0.01),
               "seconds": round(time.perf_counter() - start, 3)}
    return FitResult(det, path, summary)

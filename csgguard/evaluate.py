"""The honest detection benchmark (method.md section 4), one call per report.

Protocol, in the order it runs:

1. The test split (optionally ``limit`` images of it) is divided once, from ``seed``,
   into three disjoint parts: *fit* (detectors learn here; supervised detectors also
   see the ``supervised_on`` attack of these images), *calibration* (clean only: the
   thresholds) and *evaluation* (every reported number). The same images serve every
   detector, attack and model; their dataset indices go into the report.
2. Each attack runs on every image; only images the model classifies correctly are
   attacked, and only successful adversarial examples are counted as positives.
3. Each detector's threshold is chosen once on the clean calibration scores for the
   target ``fpr`` and then used unchanged for every attack. Negatives are *all* clean
   evaluation images (misclassified ones included: a deployed detector sees them too).
4. Reported per model x detector x attack: AUROC, TPR at 5% and 1% FPR (thresholds
   from calibration), realised FPR on the evaluation split, attack success rate,
   counts, ROC points, and whether the attack was seen at fit time.
5. The STD twin (``compare_run``) goes through the very same steps on the same images.
6. Adaptive attack (:mod:`csgguard.adaptive`): PGD on classification loss plus the
   differentiable gate-clean score, same eps, judged at the same fixed threshold.
"""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .detectors import DETECTORS, build_detector, detector_class
from .devices import select_device
from .errors import CsgguardError
from .features import Features, extract_features
from .metrics import accuracy, auroc, roc_points, threshold_at_fpr, tpr_at_threshold
from .models.store import LoadedModel, load_model
from .progress import log, make_progress
from .runs import load_run_dataset

ATTACKS = ("fgsm", "pgd", "bim", "cw", "deepfool")
EPS_ATTACKS = ("fgsm", "pgd", "bim")  # budgeted attacks; cw / deepfool minimise the norm
DEFAULT_ATTACKS = ("fgsm", "pgd", "cw", "deepfool")
DEFAULT_DETECTORS = ("csg-clean", "csg-supervised", "mahalanobis", "lid", "kd-bu", "feature-squeezing")
SPLIT_NAMES = ("fit", "calibration", "evaluation")


def run_attack(model, x, y, method, **kw):
    """Indirection over :func:`csgguard.attacks.run` (tests replace it with a fake that fails on purpose)."""
    from .attacks import run

    return run(model, x, y, method=method, **kw)


# ----------------------------------------------------------------------------- splits

def make_splits(n: int, seed: int = 0, limit: int | None = None,
                fractions: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)) -> dict[str, np.ndarray]:
    """Disjoint sorted positions into the test split: fit / calibration / evaluation."""
    perm = np.random.default_rng(seed).permutation(n)
    if limit is not None:
        perm = perm[:limit]
    m = len(perm)
    n_fit = int(round(m * fractions[0]))
    n_cal = int(round(m * fractions[1]))
    parts = (perm[:n_fit], perm[n_fit:n_fit + n_cal], perm[n_fit + n_cal:])
    return {name: np.sort(p) for name, p in zip(SPLIT_NAMES, parts, strict=True)}


def _check_sizes(splits: dict[str, np.ndarray], fpr: float) -> None:
    need = int(math.ceil(1 / fpr))
    for name in ("calibration", "evaluation"):
        if len(splits[name]) < need:
            raise CsgguardError(f"{len(splits[name])} {name} images are too few for a {fpr:g} false-positive rate "
                                f"(need at least {need}; raise --limit or --fpr)")
    if len(splits["fit"]) < 10:
        raise CsgguardError(f"{len(splits['fit'])} fit images are too few to fit detectors (need at least 10)")


def _check_names(attacks, detectors, supervised_on, fpr) -> None:
    bad = [a for a in attacks if a not in ATTACKS]
    if bad:
        raise CsgguardError(f"unknown attack {bad[0]!r}; choose from {', '.join(ATTACKS)}")
    bad = [d for d in detectors if d not in DETECTORS]
    if bad:
        raise CsgguardError(f"unknown detector {bad[0]!r}; choose from {', '.join(DETECTORS)}")
    if supervised_on not in ATTACKS:
        raise CsgguardError(f"unknown --supervised-on attack {supervised_on!r}; choose from {', '.join(ATTACKS)}")
    if not attacks or not detectors:
        raise CsgguardError("give at least one attack and one detector")
    if not 0 < fpr < 0.5:
        raise CsgguardError(f"--fpr must be in (0, 0.5), got {fpr:g}")


def check_compatible(a: LoadedModel, b: LoadedModel) -> None:
    if a.classes != b.classes:
        raise CsgguardError(f"{b.run_dir}: compare-run has classes {b.classes[:5]}... but {a.run_dir} has "
                            f"{a.classes[:5]}...; both runs must be trained on the same classes")
    shape = lambda m: (m.config.in_channels, m.config.input_size)  # noqa: E731
    if shape(a) != shape(b):
        raise CsgguardError(f"{b.run_dir}: compare-run takes inputs {shape(b)} (channels, size) but "
                            f"{a.run_dir} takes {shape(a)}; both runs must share the input shape")


# ----------------------------------------------------------------------------- per model

class _Harness:
    """Everything one model goes through: features, attacks, detectors, metrics."""

    def __init__(self, label: str, loaded: LoadedModel, data: dict[str, tuple[torch.Tensor, np.ndarray]],
                 settings: dict[str, Any], device: torch.device, progress) -> None:
        self.label, self.loaded, self.model = label, loaded, loaded.model.to(device).eval()
        self.data, self.s, self.device, self.progress = data, settings, device, progress
        self.feats = {k: extract_features(self.model, x, device=device) for k, (x, _) in data.items()}
        self.seconds: dict[str, float] = {}
        self.errors: list[str] = []

    def attack(self, method: str, split: str) -> dict[str, Any]:
        x, y = self.data[split]
        kw = dict(seed=self.s["seed"], device=self.device, batch_size=self.s["batch_size"], progress=False,
                  dataset=self.s["dataset"], **self.s["attack_settings"].get(method, {}))
        if method in EPS_ATTACKS:
            kw["eps"] = self.s["eps"]
        t = time.perf_counter()
        adv = run_attack(self.model, x, torch.as_tensor(y), method, **kw)
        secs = time.perf_counter() - t
        attacked = np.asarray(adv.attacked, bool) if getattr(adv, "attacked", None) is not None else (
            self.feats[split].pred == y)
        success = np.asarray(adv.success, bool) & attacked
        rows = np.flatnonzero(success)
        x_adv = torch.as_tensor(np.asarray(adv.x_adv)[rows]).float()
        feats = extract_features(self.model, x_adv, device=self.device)
        # a success must really fool the model (guards against e.g. zero images from a failed C&W)
        keep = feats.pred != y[rows]
        rows, x_adv, feats = rows[keep], x_adv[torch.as_tensor(keep)], feats.subset(np.flatnonzero(keep))
        return {"x": x_adv, "feats": feats, "positions": rows, "attacked": int(attacked.sum()),
                "succeeded": int(len(rows)), "seconds": secs,
                "success_rate": float(len(rows) / attacked.sum()) if attacked.sum() else None}

    def detector(self, name: str, adv_fit: dict[str, Any] | None):
        det = build_detector(name, fpr=self.s["fpr"], **self.s["detector_params"].get(name, {}))
        if hasattr(det, "bind_model"):
            det.bind_model(self.model)
        t = time.perf_counter()
        kw = {}
        if det.supervised:
            if adv_fit is None or adv_fit["succeeded"] == 0:
                raise CsgguardError(f"{name} needs successful {self.s['supervised_on']} examples on the fit split")
            kw = dict(adversarial=adv_fit["feats"], adversarial_inputs=adv_fit["x"])
        det.fit(self.feats["fit"], inputs=self.data["fit"][0], **kw)
        cal = det.score_samples(self.feats["calibration"], inputs=self.data["calibration"][0])
        det.threshold_ = det.offset_ = threshold_at_fpr(cal, self.s["fpr"])
        det.calibration_size_ = len(cal)
        thresholds = {"target": det.threshold_, "0.05": threshold_at_fpr(cal, 0.05),
                      "0.01": threshold_at_fpr(cal, 0.01) if len(cal) >= 100 else None}
        self.seconds[f"fit:{name}"] = time.perf_counter() - t
        return det, thresholds

    def score(self, det, feats: Features, x: torch.Tensor) -> np.ndarray:
        if len(feats) == 0:
            return np.zeros(0)
        return det.score_samples(feats, inputs=x)


def metrics_row(clean: np.ndarray, adv: np.ndarray, thresholds: dict[str, float | None]) -> dict[str, Any]:
    """The numbers of one detector x attack cell, at thresholds fixed on calibration data."""
    def at(key, scores):
        t = thresholds.get(key)
        return None if t is None or len(scores) == 0 else tpr_at_threshold(scores, t)

    return {
        "auroc": auroc(clean, adv) if len(adv) else None,
        "tpr_at_target_fpr": at("target", adv),
        "tpr_at_5pct_fpr": at("0.05", adv),
        "tpr_at_1pct_fpr": at("0.01", adv),
        "realised_fpr": at("target", clean),
        "realised_fpr_1pct": at("0.01", clean),
        "threshold": thresholds["target"],
        "n_clean_eval": int(len(clean)),
        "n_adv_eval": int(len(adv)),
        "roc": roc_points(clean, adv) if len(adv) else None,
    }


def _evaluate_model(h: _Harness, attacks, detectors, adaptive: bool) -> dict[str, Any]:
    s = h.s
    out: dict[str, Any] = {"attacks": {}, "results": [], "thresholds": {}, "adaptive": [], "errors": h.errors}
    with h.progress as prog:
        task = prog.add_task(f"{h.label}: attacks", total=len(attacks) + 1, info="")
        adv_eval = {}
        for a in attacks:
            prog.update(task, info=a)
            adv_eval[a] = h.attack(a, "evaluation")
            prog.advance(task)
        need_fit = any(detector_class(d).supervised for d in detectors)
        adv_fit = h.attack(s["supervised_on"], "fit") if need_fit else None
        prog.advance(task)
    for a, r in adv_eval.items():
        out["attacks"][a] = {k: r[k] for k in ("attacked", "succeeded", "success_rate", "seconds")}
        out["attacks"][a]["eps"] = s["eps"] if a in EPS_ATTACKS else None
    if adv_fit is not None:
        out["attacks_fit"] = {s["supervised_on"]: {k: adv_fit[k] for k in ("attacked", "succeeded", "success_rate")}}

    x_eval = h.data["evaluation"][0]
    fitted = {}
    for name in detectors:
        try:
            det, thr = h.detector(name, adv_fit)
        except CsgguardError as exc:
            h.errors.append(f"{h.label}/{name}: {exc}")
            continue
        out["thresholds"][name] = thr
        t = time.perf_counter()
        clean = h.score(det, h.feats["evaluation"], x_eval)
        for a, r in adv_eval.items():
            row = {"model": h.label, "detector": name, "attack": a, "supervised": det.supervised,
                   "seen": bool(det.supervised and a == s["supervised_on"]),
                   "attack_success_rate": r["success_rate"], "n_attacked": r["attacked"],
                   **metrics_row(clean, h.score(det, r["feats"], r["x"]), thr)}
            out["results"].append(row)
        h.seconds[f"score:{name}"] = time.perf_counter() - t
        fitted[name] = (det, thr, clean)
    if adaptive and "csg-clean" in fitted:
        from .adaptive import adaptive_rows

        out["adaptive"] = adaptive_rows(h, fitted)
    elif adaptive:
        h.errors.append(f"{h.label}: adaptive attack skipped (it targets csg-clean, which was not evaluated)")
    out["seconds"] = h.seconds
    return out


# ----------------------------------------------------------------------------- the call

def machine_info(device: torch.device) -> dict[str, Any]:
    import os

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "python": platform.python_version(), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _model_info(loaded: LoadedModel, feats: Features, labels: np.ndarray) -> dict[str, Any]:
    g = loaded.model.gate
    return {"run": str(loaded.run_dir), "sha256": loaded.sha256, "arch": loaded.config.arch,
            "gated": g is not None, "num_filters": loaded.model.num_filters,
            "gate_density": None if g is None else float(g.density()),
            "accuracy_evaluation_split": accuracy(feats.logits, labels)}


def evaluate(run_dir: str | Path, *, compare_run: str | Path | None = None,
             attacks: tuple[str, ...] = DEFAULT_ATTACKS, detectors: tuple[str, ...] = DEFAULT_DETECTORS,
             fpr: float = 0.05, limit: int | None = None, seed: int = 0, device: str = "auto",
             supervised_on: str = "fgsm", adaptive: bool = True, out: str | Path | None = None,
             eps: float | None = None, data_root: str | None = None, batch_size: int = 256,
             detector_params: dict[str, dict[str, Any]] | None = None, adaptive_steps: int = 40,
             adaptive_weights: tuple[float, ...] = (0.5, 2.0, 8.0), progress: bool | None = None,
             attack_settings: dict[str, dict[str, Any]] | None = None, write: bool = True) -> dict[str, Any]:
    """Run the protocol on ``run_dir`` (and ``compare_run``); write and return the report."""
    t0 = time.perf_counter()
    attacks, detectors = tuple(attacks), tuple(detectors)
    _check_names(attacks, detectors, supervised_on, fpr)
    if limit is not None and limit < 1:
        raise CsgguardError(f"--limit must be >= 1, got {limit}")
    dev = select_device(device)
    models = {"csg": load_model(run_dir, dev)}
    if compare_run is not None:
        models["std"] = load_model(compare_run, dev)
        check_compatible(models["csg"], models["std"])
    ds = load_run_dataset(models["csg"], data_root=data_root)
    test = ds.test
    splits = make_splits(len(test), seed, limit)
    _check_sizes(splits, fpr)
    if eps is None:
        from .attacks.defaults import default_eps

        eps = default_eps("linf", ds.name, tuple(test.images.shape[1:]))
    settings = {"attacks": list(attacks), "detectors": list(detectors), "fpr": fpr, "limit": limit, "seed": seed,
                "supervised_on": supervised_on, "adaptive": adaptive, "eps": float(eps), "norm": "linf",
                "batch_size": batch_size, "detector_params": detector_params or {}, "dataset": ds.name,
                "attack_settings": attack_settings or {},
                "adaptive_steps": adaptive_steps, "adaptive_weights": list(adaptive_weights),
                "negatives": "all clean evaluation images", "device": str(dev)}
    data = {k: (test.x()[torch.as_tensor(p)], test.labels.numpy()[p]) for k, p in splits.items()}
    report: dict[str, Any] = {
        "format": "csgguard.evaluation", "format_version": 1, "settings": settings,
        "data": {"dataset": ds.name, "source": ds.source, "test_images": len(test), "classes": ds.classes},
        "splits": {k: [int(i) for i in test.indices[p]] for k, p in splits.items()},
        "split_sizes": {k: int(len(p)) for k, p in splits.items()},
        "models": {}, "attacks": {}, "attacks_fit": {}, "thresholds": {}, "results": [], "adaptive": [],
        "errors": [], "seconds": {},
    }
    for label, loaded in models.items():
        log(f"evaluate: {label} model {loaded.run_dir}")
        h = _Harness(label, loaded, data, settings, dev, make_progress(progress))
        report["models"][label] = _model_info(loaded, h.feats["evaluation"], data["evaluation"][1])
        res = _evaluate_model(h, attacks, detectors, adaptive)
        report["attacks"][label] = res["attacks"]
        report["attacks_fit"][label] = res.get("attacks_fit", {})
        report["thresholds"][label] = res["thresholds"]
        report["results"] += res["results"]
        report["adaptive"] += res["adaptive"]
        report["errors"] += res["errors"]
        report["seconds"][label] = res["seconds"]
    report["seen_unseen"] = seen_unseen(report["results"])
    report["machine"] = machine_info(dev)
    report["seconds"]["total"] = time.perf_counter() - t0
    if write:
        from .report import write_report

        report["out"] = str(write_report(report, Path(out) if out else Path(run_dir) / "evaluation"))
    return report


def seen_unseen(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> supervised detector -> attack -> {auroc, tpr_at_target_fpr, seen}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        if r["supervised"]:
            out.setdefault(r["model"], {}).setdefault(r["detector"], {})[r["attack"]] = {
                "auroc": r["auroc"], "tpr_at_target_fpr": r["tpr_at_target_fpr"], "seen": r["seen"]}
    return out

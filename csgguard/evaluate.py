"""The honest detection benchmark (docs/method.md section 4), one call per report, swept over budgets.

Protocol, in the order it runs:

1. The test split (optionally ``limit`` images of it) is divided once, from ``seed``,
   into three disjoint parts: *fit* (detectors learn here; supervised detectors also
   see the ``supervised_on`` attacks of these images), *calibration* (clean only: the
   thresholds) and *evaluation* (every reported number). The same images serve every
   detector, attack, budget and model; their dataset indices go into the report.
2. The attacks run as a sweep (:mod:`csgguard.sweep`): every budgeted attack at every
   budget of its norm (``eps`` for Linf fgsm / pgd / bim, ``l2_eps`` for pgd-l2 /
   bim-l2; per-dataset defaults in ``csgguard.attacks.defaults.DEFAULT_SWEEP``), the
   minimum-norm attacks (cw, deepfool) once. Only images the model classifies correctly
   are attacked, and only successful adversarial examples that the model really
   mispredicts are counted as positives.
3. Each detector is calibrated once, by :meth:`Detector.calibrate` (the very call
   ``csgguard fit`` makes), on *every* clean calibration image (misclassified ones
   included: screening cannot know which those are), for the target ``fpr``; the 5% and
   1% operating points come from the same calibration scores (``threshold_at``). The
   thresholds are then used unchanged for every attack and budget. Negatives are *all*
   clean evaluation images.
4. Reported per model x detector x attack x budget: AUROC, TPR at the target, 5% and
   1% FPR thresholds, realised FPR on the evaluation split, attack success rate,
   counts, ROC points, and whether the cell was seen at fit time.
5. Supervised detectors are fitted on all ``supervised_on`` cells together (default
   fgsm + pgd at every Linf budget); the ``cross_fit`` detectors are also fitted on one
   fit cell at a time and tested on every cell (the fit-on-each / test-on-each matrix).
6. The STD twin (``compare_run``) goes through the very same steps on the same images.
7. Adaptive attack (:func:`csgguard.adaptive.adaptive_attack`) at every Linf budget,
   against the fitted ``csg-clean`` at its fixed threshold; its examples are scored by
   every detector like any other attack.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .detectors import DETECTORS, build_detector, detector_class
from .devices import select_device
from .errors import CsgguardError
from .features import Features, extract_features
from .metrics import accuracy, check_calibration_size, metrics_row, monotonicity_violations
from .models.store import LoadedModel, load_model
from .progress import log, make_progress
from .runs import load_run_dataset
from .sweep import (
    SWEEP_ATTACKS,
    Cell,
    build_cells,
    check_attack_names,
    check_budgets,
    format_eps,
    parse_budget_list,
    resolve_budgets,
)

ATTACKS = tuple(SWEEP_ATTACKS)
EPS_ATTACKS = tuple(a for a, (_, norm) in SWEEP_ATTACKS.items() if norm is not None)
DEFAULT_ATTACKS = ("fgsm", "pgd", "bim", "pgd-l2", "cw", "deepfool")
DEFAULT_DETECTORS = ("csg-clean", "csg-supervised", "mahalanobis", "lid", "kd-bu", "feature-squeezing", "noise-response")
DEFAULT_SUPERVISED_ON = ("fgsm", "pgd")
ADAPTIVE = "adaptive-pgd"
ADAPTIVE_TARGET = "csg-clean"
SPLIT_NAMES = ("fit", "calibration", "evaluation")
#: the detector label that measures each run's own detector file, the one ``csgguard fit`` saved and
#: ``csgguard screen`` flags with: loaded (hash-checked), never refitted, its threshold (chosen by
#: ``fit`` on the run's validation split) kept as the operating point. The fit split goes unused by
#: it; the 5% / 1% points are read off the harness's calibration split like every other detector's.
SAVED = "saved"
MONOTONE_TOLERANCE = 0.03


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
    for name in ("calibration", "evaluation"):
        check_calibration_size(len(splits[name]), fpr, f"{name} images", "raise --limit or --fpr")
    if len(splits["fit"]) < 10:
        raise CsgguardError(f"{len(splits['fit'])} fit images are too few to fit detectors (need at least 10)")


def detector_bases(detectors: Sequence[str], params: dict[str, dict[str, Any]]) -> dict[str, str]:
    """label -> registered detector name. A label that is not a registered name is a *variant*:
    its ``detector_params`` entry names the detector, e.g. ``{"csg-first": {"detector": "csg-clean", ...}}``.
    ``saved`` is each run's own detector file (:data:`SAVED`)."""
    out = {}
    for d in detectors:
        if d == SAVED:
            out[d] = SAVED
            continue
        base = params.get(d, {}).get("detector", d)
        if base not in DETECTORS:
            hint = "" if d == base else f" (variant {d!r})"
            # variants come from detector_params (the sweep's --detector-params; `csgguard evaluate` has none)
            variants = (" or give a variant's base in --detector-params as {\"NAME\": {\"detector\": "
                        "\"csg-clean\"}}") if params else ""
            raise CsgguardError(f"unknown detector {base!r}{hint}; choose from {', '.join(DETECTORS)}{variants}")
        out[d] = base
    return out


def _check_request(attacks, detectors, supervised_on, fpr, params) -> dict[str, str]:
    if not attacks or not detectors:
        raise CsgguardError("give at least one attack and one detector")
    build_cells(check_attack_names(attacks), (), ())  # names and explicit NAME@BUDGET ranges, before any work
    bases = detector_bases(detectors, params)
    build_cells(check_attack_names(supervised_on, "--supervised-on attack"), (), ())
    if not 0 < fpr < 0.5:
        raise CsgguardError(f"--fpr must be in (0, 0.5), got {fpr:g}")
    return bases


def check_compatible(a: LoadedModel, b: LoadedModel) -> None:
    if a.classes != b.classes:
        raise CsgguardError(f"{b.run_dir}: compare-run has classes {b.classes[:5]}... but {a.run_dir} has "
                            f"{a.classes[:5]}...; both runs must be trained on the same classes")
    shape = lambda m: (m.config.in_channels, m.config.input_size)  # noqa: E731
    if shape(a) != shape(b):
        raise CsgguardError(f"{b.run_dir}: compare-run takes inputs {shape(b)} (channels, size) but "
                            f"{a.run_dir} takes {shape(a)}; both runs must share the input shape")


def model_role_notes(models: dict[str, LoadedModel]) -> list[str]:
    """What the report must say when a model is not what its label (CSG / STD) claims.

    The harness labels ``--run`` CSG and ``--compare-run`` STD; nothing stops a user passing
    two gated runs or an STD run first, and a CSG-vs-STD reading of such a report would be wrong.
    """
    notes = []
    csg, std = models["csg"], models.get("std")
    if not csg.model.has_gate:
        notes.append(f"the run labelled CSG ({csg.run_dir}) has no gate: an STD network; 'CSG' below is only its slot")
    if std is not None and std.model.has_gate:
        notes.append(f"the compare-run labelled STD ({std.run_dir}) has a gate: it is not an STD twin, so CSG vs "
                     "STD below compares two gated networks")
    return notes


def _names(value: str | Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    if value is None:
        return tuple(default)
    items = value.split(",") if isinstance(value, str) else value
    return tuple(str(v).strip() for v in items if str(v).strip())


# ----------------------------------------------------------------------------- per model

def _counts(r: dict[str, Any], cell: Cell | None = None) -> dict[str, Any]:
    out = {k: r[k] for k in ("attacked", "succeeded", "success_rate", "seconds")}
    if cell is not None:
        out.update(attack=cell.attack, norm=cell.norm, eps=cell.eps)
    return out


class _Harness:
    """Everything one model goes through: features, attacks, detectors, metrics."""

    def __init__(self, label: str, loaded: LoadedModel, data: dict[str, tuple[torch.Tensor, np.ndarray]],
                 settings: dict[str, Any], device: torch.device, progress) -> None:
        self.label, self.loaded, self.model = label, loaded, loaded.model.to(device).eval()
        self.data, self.s, self.device, self.progress = data, settings, device, progress
        self.feats = {k: extract_features(self.model, x, device=device) for k, (x, _) in data.items()}
        self.seconds: dict[str, float] = {}
        self.errors: list[str] = []

    def attack(self, cell: Cell, split: str) -> dict[str, Any]:
        x, y = self.data[split]
        settings = {**self.s["attack_settings"].get(cell.method, {}), **self.s["attack_settings"].get(cell.attack, {})}
        kw = dict(seed=self.s["seed"], device=self.device, batch_size=self.s["batch_size"], progress=False,
                  dataset=self.s["dataset"], compile=self.s.get("compile", False), **settings)
        if cell.eps is not None:
            kw.update(eps=cell.eps, norm=cell.norm)
        t = time.perf_counter()
        adv = run_attack(self.model, x, torch.as_tensor(y), cell.method, **kw)
        return self.positives(adv, split, time.perf_counter() - t)

    def positives(self, adv, split: str, seconds: float) -> dict[str, Any]:
        """The successful rows of an AdversarialSet that really fool the model, with their features."""
        y = self.data[split][1]
        attacked = np.asarray(adv.attacked, bool) if getattr(adv, "attacked", None) is not None else (
            self.feats[split].pred == y)
        rows = np.flatnonzero(np.asarray(adv.success, bool) & attacked)
        x_adv = torch.as_tensor(np.asarray(adv.x_adv)[rows]).float()
        feats = extract_features(self.model, x_adv, device=self.device)
        # a success must really fool the model (guards against e.g. zero images from a failed C&W)
        keep = feats.pred != y[rows]
        rows, x_adv, feats = rows[keep], x_adv[torch.as_tensor(keep)], feats.subset(np.flatnonzero(keep))
        n_att = int(attacked.sum())
        return {"x": x_adv, "feats": feats, "positions": rows, "attacked": n_att, "succeeded": int(len(rows)),
                "seconds": seconds, "success_rate": float(len(rows) / n_att) if n_att else None}

    def adaptive(self, det, eps: float) -> dict[str, Any]:
        """The adaptive attack on the evaluation images against ``det`` at its fixed threshold."""
        from .adaptive import adaptive_attack

        x, y = self.data["evaluation"]
        scale = float(np.std(det.calibration_scores_)) or 1.0
        t = time.perf_counter()
        adv = adaptive_attack(self.model, x, torch.as_tensor(y), det, eps=eps, threshold=float(det.threshold_),
                              scale=scale, steps=self.s["adaptive_steps"], weights=tuple(self.s["adaptive_weights"]),
                              seed=self.s["seed"], batch_size=self.s["batch_size"])
        return self.positives(adv, "evaluation", time.perf_counter() - t)

    def detector(self, label: str, adv_fit: dict[str, Any] | None):
        """Fit ``label`` on the fit split, then calibrate it (all clean calibration images) as ``fit`` does."""
        base = self.s["detector_bases"][label]
        if base == SAVED:
            return self.saved_detector()
        params = {k: v for k, v in self.s["detector_params"].get(label, {}).items() if k not in ("detector", "fpr")}
        det = build_detector(base, fpr=self.s["fpr"], **params)
        if hasattr(det, "bind_model"):
            det.bind_model(self.model)
        t = time.perf_counter()
        kw = {}
        if det.supervised:
            if adv_fit is None or adv_fit["succeeded"] == 0:
                raise CsgguardError(f"{label} needs successful adversarial examples on the fit split "
                                    f"({', '.join(self.s['supervised_on'])})")
            kw = dict(adversarial=adv_fit["feats"], adversarial_inputs=adv_fit["x"])
        det.fit(self.feats["fit"], inputs=self.data["fit"][0], **kw)
        det.calibrate(self.feats["calibration"], inputs=self.data["calibration"][0])
        n_cal = len(det.calibration_scores_)
        thresholds = {"target": float(det.threshold_), "0.05": det.threshold_at(0.05),
                      "0.01": det.threshold_at(0.01) if n_cal >= 100 else None, "calibration_images": n_cal}
        self.seconds[f"fit:{label}"] = self.seconds.get(f"fit:{label}", 0.0) + time.perf_counter() - t
        return det, thresholds

    def saved_detector(self):
        """The run's own detector file as ``csgguard screen`` would load it (see :data:`SAVED`)."""
        from .detectors.store import load_detector, read_detector_manifest

        t = time.perf_counter()
        det = load_detector(self.loaded.run_dir, model_sha256=self.loaded.sha256)
        fitted_on = read_detector_manifest(self.loaded.run_dir).get("fitted_on") or {}
        if not hasattr(det, "threshold_"):
            raise CsgguardError(f"{self.loaded.run_dir}: the saved detector has no calibrated threshold; "
                                "refit it with `csgguard fit`")
        if hasattr(det, "bind_model"):
            det.bind_model(self.model)
        cal = self.score(det, self.feats["calibration"], self.data["calibration"][0])
        det.calibration_scores_ = cal  # other operating points (and the adaptive step scale) read off these
        thresholds = {"target": float(det.threshold_), "0.05": det.threshold_at(0.05),
                      "0.01": det.threshold_at(0.01) if len(cal) >= 100 else None,
                      "calibration_images": int(getattr(det, "calibration_size_", 0)) or None,
                      "saved": {"detector": det.name, "fpr": float(det.fpr),
                                "threshold_from": "csgguard fit, on the run's validation split",
                                "seen": sorted(fitted_on.get("attacks") or {})}}
        self.seconds["fit:saved"] = time.perf_counter() - t
        return det, thresholds

    def score(self, det, feats: Features, x: torch.Tensor) -> np.ndarray:
        if len(feats) == 0:
            return np.zeros(0)
        return det.score_samples(feats, inputs=x)


def _combine(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [p for p in parts if p["succeeded"]]
    if not ok:
        return None
    return {"feats": Features.concat([p["feats"] for p in ok]), "x": torch.cat([p["x"] for p in ok]),
            "succeeded": sum(p["succeeded"] for p in ok)}


def _cell_row(h: _Harness, label: str, det, cell_id: str, cell: Cell | None, r: dict[str, Any],
              clean: np.ndarray, thr: dict[str, Any], seen: bool) -> dict[str, Any]:
    return {"model": h.label, "detector": label, "attack": cell.attack if cell else ADAPTIVE,
            "norm": cell.norm if cell else "linf", "eps": cell.eps if cell else None, "cell": cell_id,
            "supervised": det.supervised, "seen": seen, "attack_success_rate": r["success_rate"],
            "n_attacked": r["attacked"], **metrics_row(clean, h.score(det, r["feats"], r["x"]), thr)}


def _cross_fit(h: _Harness, label: str, fit_adv: dict[str, dict[str, Any]],
               eval_adv: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Fit ``label`` on one fit cell at a time; test each fit on every evaluated cell."""
    rows = []
    x_eval = h.data["evaluation"][0]
    for fit_id, part in fit_adv.items():
        if part["succeeded"] == 0:
            h.errors.append(f"{h.label}/{label}: no successful {fit_id} examples on the fit split; "
                            "its fit-on-each row is empty")
            continue
        det, thr = h.detector(label, part)
        clean = h.score(det, h.feats["evaluation"], x_eval)
        for test_id, r in eval_adv.items():
            m = metrics_row(clean, h.score(det, r["feats"], r["x"]), thr)
            rows.append({"model": h.label, "detector": label, "fit_on": fit_id, "test_on": test_id,
                         "seen": fit_id == test_id, "n_fit_adv": part["succeeded"], "threshold": thr["target"],
                         **{k: m[k] for k in ("auroc", "tpr_at_target_fpr", "realised_fpr", "n_adv_eval")}})
    return rows


def _evaluate_model(h: _Harness, cells: list[Cell], fit_cells: list[Cell], detectors: Sequence[str],
                    adaptive_budgets: Sequence[float], adaptive: bool, cross_fit: Sequence[str]) -> dict[str, Any]:
    s = h.s
    out: dict[str, Any] = {"attacks": {}, "attacks_fit": {}, "results": [], "thresholds": {}, "adaptive": [],
                           "cross_fit": [], "errors": h.errors}
    need_fit = any(s["detector_bases"][d] != SAVED and detector_class(s["detector_bases"][d]).supervised
                   for d in detectors)
    fit_cells = fit_cells if need_fit else []
    with h.progress as prog:
        task = prog.add_task(f"{h.label}: attacks", total=len(cells) + len(fit_cells), info="")
        adv_eval = {}
        for c in cells:
            prog.update(task, info=c.id)
            adv_eval[c.id] = h.attack(c, "evaluation")
            prog.advance(task)
        adv_fit = {}
        for c in fit_cells:
            prog.update(task, info=f"{c.id} (fit split)")
            adv_fit[c.id] = h.attack(c, "fit")
            prog.advance(task)
    by_id = {c.id: c for c in cells}
    out["attacks"] = {cid: _counts(r, by_id[cid]) for cid, r in adv_eval.items()}
    out["attacks_fit"] = {c.id: _counts(adv_fit[c.id], c) for c in fit_cells}
    combined_fit = _combine(list(adv_fit.values()))
    seen_ids = {cid for cid, r in adv_fit.items() if r["succeeded"]}

    x_eval = h.data["evaluation"][0]
    fitted = {}
    for label in detectors:
        try:
            det, thr = h.detector(label, combined_fit)
        except CsgguardError as exc:
            h.errors.append(f"{h.label}/{label}: {exc}")
            continue
        out["thresholds"][label] = thr
        t = time.perf_counter()
        clean = h.score(det, h.feats["evaluation"], x_eval)
        out["thresholds"][label]["realised_fpr_evaluation"] = float((clean > thr["target"]).mean())
        seen = set(thr["saved"]["seen"]) if "saved" in thr else seen_ids  # a saved detector saw its own fit's
        for cid, r in adv_eval.items():
            out["results"].append(_cell_row(h, label, det, cid, by_id[cid], r, clean, thr,
                                            seen=bool(det.supervised and cid in seen)))
        h.seconds[f"score:{label}"] = time.perf_counter() - t
        fitted[label] = (det, thr, clean)
    for label in cross_fit:
        if label in fitted and fitted[label][0].supervised:
            out["cross_fit"] += _cross_fit(h, label, adv_fit, adv_eval)
        elif label in fitted:
            h.errors.append(f"{h.label}/{label}: not supervised; no fit-on-each matrix")
    targets = _adaptive_targets(s["adaptive_targets"], fitted) if adaptive else []
    if adaptive and not targets:
        h.errors.append(f"{h.label}: adaptive attack skipped (none of its targets "
                        f"{', '.join(s['adaptive_targets'])} was fitted with a differentiable score)")
    for eps in adaptive_budgets if targets else ():
        cid = f"{ADAPTIVE}@{format_eps(eps)}"
        runs: dict[str, dict[str, Any]] = {}
        for t in targets:  # one attack per target, against that detector's own score
            try:
                runs[t] = h.adaptive(fitted[t][0], eps)
            except CsgguardError as exc:
                h.errors.append(f"{h.label}: adaptive attack on {t} at eps {eps:g} failed: {exc}")
                continue
            h.seconds[f"attack:{cid}:{t}"] = runs[t]["seconds"]
        if not runs:
            continue
        primary = next(iter(runs))
        out["attacks"][cid] = {**_counts(runs[primary]), "attack": ADAPTIVE, "norm": "linf", "eps": eps,
                               "target": primary, "per_target": {t: _counts(r) for t, r in runs.items()}}
        for label, (det, thr, clean) in fitted.items():
            # a detector is scored on the attack against itself; one without its own (no differentiable
            # score, or not a target) on the attack against the first target: a transfer row, so labelled
            src = label if label in runs else primary
            r = runs[src]
            row = _cell_row(h, label, det, cid, None, r, clean, thr, seen=False)
            adv = h.score(det, r["feats"], r["x"])
            evaded = int((adv <= thr["target"]).sum()) if len(adv) else 0
            row.update(eps=eps, target=src, transfer=src != label, steps=s["adaptive_steps"],
                       weights=list(s["adaptive_weights"]), seconds=r["seconds"],
                       evasion_rate=evaded / r["attacked"] if r["attacked"] else None)
            out["adaptive"].append(row)
    out["seconds"] = h.seconds
    return out


def _adaptive_targets(requested: Sequence[str], fitted: dict[str, Any]) -> list[str]:
    """The fitted detectors the adaptive attack targets, in request order (``all``: every one with a
    differentiable score, csg-clean first)."""
    if list(requested) == ["all"]:
        names = sorted(fitted, key=lambda n: n != ADAPTIVE_TARGET)
        return [n for n in names if hasattr(fitted[n][0], "torch_score")]
    return [n for n in requested if n in fitted]


# ----------------------------------------------------------------------------- summaries

def sweep_curves(rows: list[dict[str, Any]], tol: float = MONOTONE_TOLERANCE) -> list[dict[str, Any]]:
    """model x detector x budgeted attack -> budgets, AUROC and detection rate per budget, worst AUROC and
    the budget pairs where the detection rate at the fixed threshold falls by more than ``tol``."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("eps") is not None:
            groups.setdefault((r["model"], r["detector"], r["attack"]), []).append(r)
    out = []
    for (m, d, a), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["eps"])
        aurocs = [r["auroc"] for r in rs]
        rates = [r["tpr_at_target_fpr"] for r in rs]
        known = [v for v in aurocs if v is not None]
        out.append({"model": m, "detector": d, "attack": a, "norm": rs[0]["norm"], "eps": [r["eps"] for r in rs],
                    "auroc": aurocs, "detection_rate": rates, "n_adv_eval": [r["n_adv_eval"] for r in rs],
                    "worst_auroc": min(known) if known else None,
                    "violations": monotonicity_violations(list(zip([r["eps"] for r in rs], rates, strict=True)),
                                                          tol)})
    return out


def worst_case(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> detector -> the lowest AUROC and detection rate over every (non-adaptive) cell."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        w = out.setdefault(r["model"], {}).setdefault(r["detector"], {"auroc": None, "auroc_cell": None,
                                                                      "detection_rate": None, "rate_cell": None})
        if r["auroc"] is not None and (w["auroc"] is None or r["auroc"] < w["auroc"]):
            w["auroc"], w["auroc_cell"] = r["auroc"], r["cell"]
        t = r["tpr_at_target_fpr"]
        if t is not None and (w["detection_rate"] is None or t < w["detection_rate"]):
            w["detection_rate"], w["rate_cell"] = t, r["cell"]
    return out


def seen_unseen(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> supervised detector -> cell -> {auroc, tpr_at_target_fpr, seen}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for r in results:
        if r["supervised"]:
            out.setdefault(r["model"], {}).setdefault(r["detector"], {})[r["cell"]] = {
                "auroc": r["auroc"], "tpr_at_target_fpr": r["tpr_at_target_fpr"], "seen": r["seen"]}
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
             attacks: Sequence[str] = DEFAULT_ATTACKS, detectors: Sequence[str] = DEFAULT_DETECTORS,
             fpr: float = 0.05, limit: int | None = None, seed: int = 0, device: str = "auto",
             supervised_on: str | Sequence[str] | None = None, adaptive: bool = True, out: str | Path | None = None,
             eps: float | str | Sequence[float] | None = None, l2_eps: float | str | Sequence[float] | None = None,
             data_root: str | None = None, batch_size: int = 256,
             detector_params: dict[str, dict[str, Any]] | None = None, adaptive_steps: int = 40,
             adaptive_weights: tuple[float, ...] = (0.5, 2.0, 8.0), progress: bool | None = None,
             attack_settings: dict[str, dict[str, Any]] | None = None, cross_fit: Sequence[str] | None = None,
             adaptive_targets: str | Sequence[str] | None = None,
             adaptive_eps: float | str | Sequence[float] | None = None, write: bool = True,
             compile: bool = False) -> dict[str, Any]:
    """Run the protocol on ``run_dir`` (and ``compare_run``) over a budget sweep; write and return the report.

    ``eps`` / ``l2_eps``: the Linf / L2 budgets (a number, a list, or text like
    ``"0.05,0.1"`` or ``"2/255,8/255"``); None means the dataset's default sweep.
    ``supervised_on``: the sweep names (``"fgsm,pgd"``: every Linf budget) or cells
    (``"pgd@0.1"``) supervised detectors are fitted on, on the fit split; default fgsm
    and pgd. ``cross_fit``: supervised detectors that also get the fit-on-each /
    test-on-each matrix (default: the csg-supervised ones among ``detectors``).
    ``adaptive_targets``: the detectors the adaptive attack is run against, each with its own
    attack on its own differentiable score (default csg-clean; ``"all"``: every detector that
    has one); every other detector is scored on the attack against the first target (a
    transfer row, ``transfer: true``).
    ``adaptive_eps``: the Linf budgets of the adaptive attack (same forms as ``eps``; default:
    the Linf budgets of the sweep). The adaptive attack is the slow part of a sweep on natural
    images, so it can be run where it decides something and nowhere else.
    ``detector_params``: label -> parameters; a label that is no registered name is a
    variant whose ``"detector"`` entry names the base detector.
    ``compile``: the foolbox attacks' steps run through ``torch.compile`` (:mod:`csgguard.compiling`;
    the adaptive attack and the detectors stay eager).
    """
    if write and out is None:  # a shipped run's folder is part of the package (csgguard.shipped)
        from .shipped import refuse_shipped_output, resolve_run

        refuse_shipped_output(resolve_run(run_dir), "out= (--out)")
    t0 = time.perf_counter()
    attacks, detectors = _names(attacks, DEFAULT_ATTACKS), _names(detectors, DEFAULT_DETECTORS)
    supervised = _names(supervised_on, DEFAULT_SUPERVISED_ON)
    detector_params = dict(detector_params or {})
    bases = _check_request(attacks, detectors, supervised, fpr, detector_params)
    linf_req = parse_budget_list(eps, "--eps")
    l2_req = parse_budget_list(l2_eps, "--l2-eps")
    if linf_req is not None:
        check_budgets(linf_req, "linf")
    if l2_req is not None:
        check_budgets(l2_req, "l2")
    adaptive_req = parse_budget_list(adaptive_eps, "--adaptive-eps")
    if adaptive_req is not None:
        check_budgets(adaptive_req, "linf", "--adaptive-eps")
    cross = tuple(d for d in detectors if bases[d] == "csg-supervised") if cross_fit is None else tuple(cross_fit)
    unknown = [d for d in cross if d not in detectors]
    if unknown:
        raise CsgguardError(f"cross-fit detector {unknown[0]!r} is not among the evaluated detectors")
    if limit is not None and limit < 1:
        raise CsgguardError(f"--limit must be >= 1, got {limit}")
    targets = _names(adaptive_targets, (ADAPTIVE_TARGET,))
    if adaptive_targets is not None and targets != ("all",):
        bad = [t for t in targets if t not in detectors]
        if bad:
            raise CsgguardError(f"adaptive target {bad[0]!r} is not among the evaluated detectors "
                                f"({', '.join(detectors)}); or use 'all'")
    dev = select_device(device)
    models = {"csg": load_model(run_dir, dev)}
    if compare_run is not None:
        models["std"] = load_model(compare_run, dev)
        check_compatible(models["csg"], models["std"])
    notes = model_role_notes(models)
    for note in notes:
        log(f"warning: {note}")
    ds = load_run_dataset(models["csg"], data_root=data_root)
    test = ds.test
    shape = tuple(test.images.shape[1:])
    linf = resolve_budgets(linf_req, "linf", ds.name, shape)
    l2 = resolve_budgets(l2_req, "l2", ds.name, shape)
    adaptive_budgets = linf if adaptive_req is None else resolve_budgets(adaptive_req, "linf", ds.name, shape)
    cells = build_cells(attacks, linf, l2)
    fit_cells = build_cells(supervised, linf, l2)
    splits = make_splits(len(test), seed, limit)
    _check_sizes(splits, fpr)
    settings = {"attacks": list(attacks), "detectors": list(detectors), "detector_bases": bases, "fpr": fpr,
                "limit": limit, "seed": seed, "eps": list(linf), "l2_eps": list(l2), "cells": [c.id for c in cells],
                "supervised_on": [c.id for c in fit_cells], "cross_fit": list(cross), "adaptive": adaptive,
                "adaptive_eps": list(adaptive_budgets) if adaptive else [], "adaptive_targets": list(targets),
                "batch_size": batch_size, "compile": bool(compile), "detector_params": detector_params,
                "dataset": ds.name, "attack_settings": attack_settings or {}, "adaptive_steps": adaptive_steps,
                "adaptive_weights": list(adaptive_weights), "negatives": "all clean evaluation images",
                "calibration": "Detector.calibrate on every clean calibration image (misclassified included), "
                               "the same call `csgguard fit` makes; 5% / 1% from the same scores (threshold_at)",
                "monotone_tolerance": MONOTONE_TOLERANCE, "device": str(dev)}
    data = {k: (test.x()[torch.as_tensor(p)], test.labels.numpy()[p]) for k, p in splits.items()}
    report: dict[str, Any] = {
        "format": "csgguard.evaluation", "format_version": 2, "settings": settings,
        "data": {"dataset": ds.name, "source": ds.source, "test_images": len(test), "classes": ds.classes},
        "splits": {k: [int(i) for i in test.indices[p]] for k, p in splits.items()},
        "split_sizes": {k: int(len(p)) for k, p in splits.items()},
        "models": {}, "attacks": {}, "attacks_fit": {}, "thresholds": {}, "results": [], "adaptive": [],
        "cross_fit": [], "errors": [], "seconds": {}, "notes": notes,
    }
    for label, loaded in models.items():
        log(f"evaluate: {label} model {loaded.run_dir} ({len(cells)} attack cells)")
        h = _Harness(label, loaded, data, settings, dev, make_progress(progress))
        report["models"][label] = _model_info(loaded, h.feats["evaluation"], data["evaluation"][1])
        res = _evaluate_model(h, cells, fit_cells, detectors, adaptive_budgets, adaptive, cross)
        for key in ("attacks", "attacks_fit", "thresholds", "seconds"):
            report[key][label] = res[key]
        for key in ("results", "adaptive", "cross_fit", "errors"):
            report[key] += res[key]
    report["seen_unseen"] = seen_unseen(report["results"])
    report["sweep"] = sweep_curves(report["results"] + report["adaptive"])
    report["worst_case"] = worst_case(report["results"])
    report["machine"] = machine_info(dev)
    report["seconds"]["total"] = time.perf_counter() - t0
    if write:
        from .report import write_report

        report["out"] = str(write_report(report, Path(out) if out else Path(run_dir) / "evaluation"))
    return report

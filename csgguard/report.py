"""Writing an evaluation report: report.json, report.md, robustness curves, ROC PNGs and the gate heatmap.

Every file is written atomically, so an interrupted run never leaves a half report.
report.json holds everything (settings, split indices, every metric, ROC points, the
sweep curves, the fit-on-each matrix); report.md holds the tables a person reads; the
terminal gets :func:`summary_rows`. Figures are drawn on :class:`matplotlib.figure.Figure`
(no pyplot state, no backend switching).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import atomic_write_bytes, atomic_write_text, write_json
from .errors import ArtifactError
from .safetext import visible
from .sweep import format_eps

SUMMARY_COLUMNS = ["model", "detector", "cell", "seen", "auroc", "tpr_at_target_fpr", "tpr_at_5pct_fpr",
                   "tpr_at_1pct_fpr", "realised_fpr", "attack_success_rate", "n_adv_eval", "n_clean_eval"]
ADAPTIVE = "adaptive-pgd"


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [{k: r.get(k) for k in SUMMARY_COLUMNS} for r in report["results"]]
    rows += [{**{k: r.get(k) for k in SUMMARY_COLUMNS}, "seen": "adaptive"} for r in report["adaptive"]]
    return rows


def _rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return report["results"] + report["adaptive"]


def _find(report: dict[str, Any], model: str, detector: str, cell: str) -> dict[str, Any] | None:
    for r in _rows(report):
        if r["model"] == model and r["detector"] == detector and r["cell"] == cell:
            return r
    return None


def _pair(r: dict[str, Any] | None) -> str:
    return "-" if r is None else f"{_f(r['auroc'])} / {_f(r['tpr_at_target_fpr'], 2)}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _budgeted_attacks(report: dict[str, Any]) -> list[tuple[str, str, list[float]]]:
    """(attack, norm, budgets) of every swept attack, in the order requested, the adaptive one last."""
    seen: dict[str, tuple[str, list[float]]] = {}
    for r in _rows(report):
        if r.get("eps") is not None:
            norm, eps = seen.setdefault(r["attack"], (r["norm"], []))
            if r["eps"] not in eps:
                eps.append(r["eps"])
    order = [a for a in report["settings"]["attacks"] if a in seen] + [a for a in seen
                                                                        if a not in report["settings"]["attacks"]]
    return [(a, seen[a][0], sorted(seen[a][1])) for a in order]


def _header(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    # paths and dataset specs are the user's bytes (maybe not UTF-8, maybe ESC): escaped as everywhere else
    lines = [f"# Detection report: {visible(report['data']['dataset'])}", ""]
    for label, m in report["models"].items():
        dens = "" if m["gate_density"] is None else f", gate density {m['gate_density']:.3f}"
        lines.append(f"- **{label.upper()}** `{visible(m['run'])}` ({m['arch']}, K={m['num_filters']}{dens}): "
                     f"accuracy on the evaluation split {_f(m['accuracy_evaluation_split'])}")
    lines += [f"- **Note:** {visible(n)}" for n in report.get("notes", [])]
    sz = report["split_sizes"]
    lines += [f"- Test images split once (seed {s['seed']}): fit {sz['fit']}, calibration {sz['calibration']}, "
              f"evaluation {sz['evaluation']} (indices in report.json).",
              f"- Thresholds: {s['calibration']}, at target FPR {s['fpr']:g}; each used unchanged for every "
              "attack and budget (table *Thresholds*).",
              f"- Budgets: Linf {', '.join(map(format_eps, s['eps']))}; L2 {', '.join(map(format_eps, s['l2_eps']))}"
              "; cw and deepfool are minimum-norm (one cell each).",
              f"- Supervised detectors fitted on the fit split's successful examples of "
              f"{', '.join(f'`{c}`' for c in s['supervised_on'])} together; those cells are marked *seen*.",
              f"- Negatives: {s['negatives']}; positives: successful adversarial examples of correctly "
              "classified evaluation images. Cells read `AUROC / detection rate at the fixed threshold`.", ""]
    return lines


def _thresholds(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    rows = []
    for m, dets in report["thresholds"].items():
        for d, t in dets.items():
            r = next((x for x in report["results"] if x["model"] == m and x["detector"] == d), None)
            rows.append([m, d, f"{t['target']:.4g}", _f(t.get("calibration_images")),
                         _f(t.get("realised_fpr_evaluation")), _f(None if r is None else r["realised_fpr_1pct"])])
    return ["## Thresholds", "", f"Calibrated by `Detector.calibrate` on clean calibration images (target FPR "
            f"{s['fpr']:g}); realised FPR measured on the {report['split_sizes']['evaluation']} clean evaluation "
            "images.", ""] + _table(["model", "detector", "threshold", "calibration images",
                                     f"realised FPR (target {s['fpr']:g})", "realised FPR (1% point)"], rows) + [""] \
        + _saved_note(report)


def _saved_note(report: dict[str, Any]) -> list[str]:
    saved = {m: t["saved"] for m, dets in report["thresholds"].items() for t in dets.values() if "saved" in t}
    if not saved:
        return []
    parts = [f"{m}: {v['detector']} (target FPR {v['fpr']:g})" for m, v in saved.items()]
    return ["`saved` is each run's own detector file, the one `csgguard screen` flags with: not refitted here, "
            "its threshold the one `csgguard fit` chose on the run's validation split (calibration images above "
            f"are that split's); {'; '.join(parts)}.", ""]


def _attacks(report: dict[str, Any]) -> list[str]:
    models = list(report["models"])
    cells: list[str] = []
    for label in models:
        cells += [c for c in report["attacks"][label] if c not in cells]
    rows = []
    for c in cells:
        vals = []
        for label in models:
            r = report["attacks"][label].get(c)
            vals.append("-" if r is None else f"{r['succeeded']}/{r['attacked']} ({_f(r['success_rate'], 2)})")
        rows.append([c] + vals)
    fit_cells: list[str] = []
    for label in models:
        fit_cells += [c for c in report.get("attacks_fit", {}).get(label, {}) if c not in fit_cells]
    for c in fit_cells:
        vals = []
        for label in models:
            r = report["attacks_fit"][label].get(c)
            vals.append("-" if r is None else f"{r['succeeded']}/{r['attacked']} ({_f(r['success_rate'], 2)})")
        rows.append([f"{c} (fit split)"] + vals)
    return ["## Attacks (succeeded / attacked, success rate)", ""] + _table(["cell"] + [m.upper() for m in models],
                                                                             rows) + [""]


def _sweep(report: dict[str, Any]) -> list[str]:
    s, models = report["settings"], list(report["models"])
    detectors = s["detectors"]
    lines = ["## Budget sweep", "",
             "Each cell: AUROC / detection rate at the fixed threshold. *worst* is the lowest AUROC over the "
             f"budgets; *drops* counts budget pairs where the detection rate at the larger budget is lower by more "
             f"than {s['monotone_tolerance']:g}.", ""]
    curves = {(c["model"], c["detector"], c["attack"]): c for c in report.get("sweep", [])}
    for a, norm, budgets in _budgeted_attacks(report):
        lines += [f"### {a} ({'Linf' if norm == 'linf' else 'L2'})", ""]
        rows = []
        for d in detectors:
            for m in models:
                c = curves.get((m, d, a))
                if c is None:
                    continue
                cells = [_pair(_find(report, m, d, f"{a}@{format_eps(e)}")) for e in budgets]
                rows.append([d, m] + cells + [_f(c["worst_auroc"]), str(len(c["violations"]))])
        lines += _table(["detector", "model"] + [format_eps(e) for e in budgets] + ["worst", "drops"], rows) + [""]
    minimum = [a for a in s["attacks"] if a in ("cw", "deepfool")]
    if minimum:
        lines += ["### minimum-norm attacks", ""]
        rows = [[d, m] + [_pair(_find(report, m, d, a)) for a in minimum] for d in detectors for m in models
                if any(_find(report, m, d, a) for a in minimum)]
        lines += _table(["detector", "model"] + minimum, rows) + [""]
    worst = report.get("worst_case", {})
    if worst:
        lines += ["### Worst case per detector (every non-adaptive cell)", ""]
        rows = []
        for d in detectors:
            for m in models:
                w = worst.get(m, {}).get(d)
                if w:
                    drops = sum(len(c["violations"]) for c in report.get("sweep", [])
                                if c["model"] == m and c["detector"] == d and c["attack"] != ADAPTIVE)
                    rows.append([d, m, f"{_f(w['auroc'])} ({w['auroc_cell']})",
                                 f"{_f(w['detection_rate'], 2)} ({w['rate_cell']})", str(drops)])
        lines += _table(["detector", "model", "worst AUROC", "worst detection rate", "drops"], rows) + [""]
    return lines


def _seen_unseen(report: dict[str, Any]) -> list[str]:
    sup = report.get("seen_unseen", {})
    if not sup:
        return []
    cells = report["settings"]["cells"]
    lines = [f"## Seen vs unseen (supervised detectors fitted on {', '.join(report['settings']['supervised_on'])}; "
             "AUROC / detection rate, * = seen)", ""]
    rows = []
    for m, dets in sup.items():
        for d, vals in dets.items():
            rows.append([m, d] + [("-" if c not in vals else
                                   f"{_f(vals[c]['auroc'])} / {_f(vals[c]['tpr_at_target_fpr'], 2)}"
                                   f"{'*' if vals[c]['seen'] else ''}") for c in cells])
    return lines + _table(["model", "detector"] + cells, rows) + [""]


def _cross_fit(report: dict[str, Any]) -> list[str]:
    rows_in = report.get("cross_fit", [])
    if not rows_in:
        return []
    tests = report["settings"]["cells"]
    lines = ["## Fit on each, test on each (AUROC)", "",
             "The supervised detector fitted on one attack@budget of the fit split at a time (rows), tested on every "
             "cell (columns); the *all* row is the default fit on every fit cell together. Detection rates at each "
             "fit's own calibrated threshold are in report.json (`cross_fit`).", ""]
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in rows_in:
        groups.setdefault((r["model"], r["detector"]), {}).setdefault(r["fit_on"], {})[r["test_on"]] = r
    for (m, d), fits in groups.items():
        lines += [f"### {d} ({m.upper()})", ""]
        rows = [[f, *[(_f(v[t]["auroc"]) + ("*" if v[t]["seen"] else "")) if t in v else "-" for t in tests]]
                for f, v in fits.items()]
        rows.append(["all", *[_f((_find(report, m, d, t) or {}).get("auroc")) for t in tests]])
        lines += _table(["fit on \\ test on", *tests], rows) + [""]
    return lines


def _adaptive(report: dict[str, Any]) -> list[str]:
    if not report["adaptive"]:
        return []
    lines = ["## Adaptive attack (PGD on classifier + detector score together, Linf budgets of the sweep)", ""]
    rows = []
    for r in sorted(report["adaptive"], key=lambda r: (r["model"], r["detector"], r["eps"])):
        ref = _find(report, r["model"], r["detector"], f"pgd@{format_eps(r['eps'])}")
        target = r.get("target", "csg-clean")
        rows.append([r["model"], r["detector"], "itself" if target == r["detector"] else f"{target} (transfer)",
                     format_eps(r["eps"]), _f(r["attack_success_rate"]), _f(r["auroc"]),
                     _f(r["tpr_at_target_fpr"]), _f(None if ref is None else ref["tpr_at_target_fpr"]),
                     _f(r["evasion_rate"])])
    lines += _table(["model", "detector", "attack aimed at", "eps", "success rate", "AUROC", "detection rate",
                     "plain PGD rate", "evasion rate"], rows)
    lines += ["", "Evasion rate: share of attacked images that are misclassified *and* not flagged by that "
              "detector at its fixed threshold. Each target detector (`--adaptive-targets`) is attacked through "
              "its own differentiable score; a row marked transfer scores a detector on the attack aimed at "
              "another one, which is no adaptive evaluation of it. A drop from the plain-PGD column is what an "
              "informed attacker buys: read the non-adaptive tables as upper bounds.", ""]
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = _header(report) + _thresholds(report) + _attacks(report) + _sweep(report) + _seen_unseen(report)
    lines += _cross_fit(report) + _adaptive(report)
    if report["errors"]:
        lines += ["## Not evaluated", ""] + [f"- {e}" for e in report["errors"]] + [""]
    mach = report["machine"]
    lines += [f"Machine: {mach['platform']}, {mach['cpu_count']} CPUs, device {mach['device']}"
              f"{', ' + mach['gpu'] if mach.get('gpu') else ''}; torch {mach['torch']}; "
              f"{report['seconds']['total']:.1f} s in total.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures

def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def _figure(figsize: tuple[float, float], dpi: int = 100):
    """A matplotlib Figure that is not registered with pyplot: no backend switch, nothing to close."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def _style(report: dict[str, Any], model: str, detector: str) -> dict[str, Any]:
    dets = report["settings"]["detectors"]
    i = dets.index(detector) if detector in dets else 0
    return {"color": f"C{i % 10}", "linestyle": "-" if model == "csg" else "--"}


def reference_budget(budgets: list[float], default: float | None) -> float:
    """The budget a single-budget figure (ROC) shows: the dataset's default if swept, else the middle one."""
    if default is not None:
        for b in budgets:
            if abs(b - default) < 1e-9:
                return b
    return budgets[(len(budgets) - 1) // 2]


def curve_figure(report: dict[str, Any], attack: str):
    """The robustness curve of one swept attack: detection rate at each detector's fixed threshold vs
    budget, one line per detector and model (CSG solid, STD dashed). A :class:`~matplotlib.figure.Figure`."""
    norm, budgets = next((n, b) for a, n, b in _budgeted_attacks(report) if a == attack)
    fig = _figure((6, 4.5))
    ax = fig.subplots()
    for c in report.get("sweep", []):
        if c["attack"] != attack:
            continue
        pts = [(e, r) for e, r in zip(c["eps"], c["detection_rate"], strict=True) if r is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", **_style(report, c["model"], c["detector"]),
                    label=f"{c['model'].upper()} {c['detector']}")
    ax.set_xticks(budgets, [format_eps(b) for b in budgets])
    ax.set_ylim(-0.02, 1.02)
    ax.set(xlabel=f"{'Linf' if norm == 'linf' else 'L2'} budget", ylabel="detection rate at fixed threshold",
           title=f"Robustness curve: {attack} (target FPR {report['settings']['fpr']:g})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def write_curve_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """curve_<attack>.png for every swept attack (the adaptive one included)."""
    return [atomic_write_bytes(out / f"curve_{a}.png", _png(curve_figure(report, a)))
            for a, _, _ in _budgeted_attacks(report)]


def write_roc_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """roc_<attack>.png, budgeted attacks at one reference budget (named in the title)."""
    from .attacks.defaults import DEFAULT_EPS

    default = DEFAULT_EPS.get(report["data"]["dataset"], {})
    budgeted = {a: (norm, budgets) for a, norm, budgets in _budgeted_attacks(report)}
    attacks = list(report["settings"]["attacks"]) + ([ADAPTIVE] if report["adaptive"] else [])
    paths = []
    for a in attacks:
        if a in budgeted:
            norm, budgets = budgeted[a]
            ref = reference_budget(budgets, default.get(norm))
            cell, title = f"{a}@{format_eps(ref)}", f"ROC: {a} at {'Linf' if norm == 'linf' else 'L2'} {format_eps(ref)}"
        else:
            cell, title = a, f"ROC: {a}"
        fig = _figure((5.5, 5))
        ax = fig.subplots()
        for r in (x for x in _rows(report) if x["cell"] == cell and x.get("roc")):
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], **_style(report, r["model"], r["detector"]),
                    label=f"{r['model']} {r['detector']} ({_f(r['auroc'])})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.axvline(report["settings"]["fpr"], color="grey", lw=0.5)
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        paths.append(atomic_write_bytes(out / f"roc_{a}.png", _png(fig)))
    return paths


def write_heatmap(gate: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """The classes x filters gate matrix as a PNG, filters grouped by their main class."""
    order = np.lexsort((-gate.max(1), gate.argmax(1)))
    fig = _figure((min(16, 2 + gate.shape[0] / 10), 0.4 * len(classes) + 1.5), dpi=110)
    ax = fig.subplots()
    im = ax.imshow(gate[order].T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("filter (sorted by main class)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    return atomic_write_bytes(path, _png(fig))


def read_gate(run_dir: str | Path, sha256: str | None = None) -> np.ndarray | None:
    """The gate matrix (K x C) of a run, read alone from its weights file; None for a STD model.

    For drawing only: the network is not rebuilt and the file is not hashed again
    (the caller loaded and verified it); ``sha256`` must match what model.json records.
    """
    from safetensors import safe_open

    from .models.store import read_manifest

    manifest = read_manifest(run_dir)
    if not manifest["model"].get("gate"):
        return None
    weights = manifest["weights"]
    if sha256 is not None and weights.get("sha256") != sha256:
        raise ArtifactError(f"{run_dir}: model.json now names other weights than the ones evaluated")
    with safe_open(str(Path(run_dir) / weights.get("file", "model.safetensors")), framework="np") as f:
        return np.asarray(f.get_tensor("gate.weight"))


def write_report(report: dict[str, Any], out: Path, *, gate: np.ndarray | None = None) -> Path:
    """Write report.json, report.md, curve_<attack>.png, roc_<attack>.png and gate_heatmap.png into ``out``.

    ``gate`` is the evaluated CSG model's gate matrix; when not given it is read
    alone from the run's weights (:func:`read_gate`), never by reloading the model.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = [p.name for p in write_curve_plots(report, out)]
    report["files"] += [p.name for p in write_roc_plots(report, out)]
    if gate is None:
        csg = report["models"]["csg"]
        gate = read_gate(csg["run"], csg.get("sha256")) if csg.get("gated", True) else None
    if gate is not None:
        write_heatmap(gate, report["data"]["classes"], out / "gate_heatmap.png", "CSG gate (evaluated model)")
        report["files"].append("gate_heatmap.png")
    report["files"] += ["report.md", "report.json"]
    atomic_write_text(out / "report.md", markdown(report))
    write_json(out / "report.json", report)
    return out

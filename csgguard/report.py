"""Writing an evaluation report: report.json, report.md, ROC PNGs and the gate heatmap.

Every file is written atomically, so an interrupted run never leaves a half report.
report.json holds everything (settings, split indices, every metric, ROC points);
report.md holds the tables a person reads; the terminal gets :func:`summary_rows`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import atomic_write_bytes, atomic_write_text, write_json
from .errors import ArtifactError

SUMMARY_COLUMNS = ["model", "detector", "attack", "seen", "auroc", "tpr_at_5pct_fpr", "tpr_at_1pct_fpr",
                   "realised_fpr", "attack_success_rate", "n_adv_eval", "n_clean_eval"]


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


def _cell(report: dict[str, Any], model: str, detector: str, attack: str, key: str = "auroc") -> Any:
    src = report["adaptive"] if attack == "adaptive-pgd" else report["results"]
    for r in src:
        if r["model"] == model and r["detector"] == detector and r["attack"] == attack:
            return r.get(key)
    return None


def markdown(report: dict[str, Any]) -> str:
    s, models = report["settings"], list(report["models"])
    attacks, detectors = s["attacks"], s["detectors"]
    lines = [f"# Detection report: {report['data']['dataset']}", ""]
    for label, m in report["models"].items():
        dens = "" if m["gate_density"] is None else f", gate density {m['gate_density']:.3f}"
        lines.append(f"- **{label.upper()}** `{m['run']}` ({m['arch']}, K={m['num_filters']}{dens}): "
                     f"accuracy on the evaluation split {_f(m['accuracy_evaluation_split'])}")
    sz = report["split_sizes"]
    lines += [f"- Test images split once (seed {s['seed']}): fit {sz['fit']}, calibration {sz['calibration']}, "
              f"evaluation {sz['evaluation']} (indices in report.json).",
              f"- Threshold per detector fixed on clean calibration data at FPR {s['fpr']:g}, unchanged across "
              f"attacks. Budgeted attacks at Linf eps {s['eps']:.4g}. Supervised detectors fitted on "
              f"`{s['supervised_on']}` (fit split) and marked *seen* there.",
              f"- Negatives: {s['negatives']}; positives: successful adversarial examples of correctly "
              "classified evaluation images.", ""]
    lines += ["## Attacks", "", "| model | attack | attacked | succeeded | success rate |", "|---|---|---|---|---|"]
    for label in models:
        for a, r in report["attacks"][label].items():
            lines.append(f"| {label} | {a} | {r['attacked']} | {r['succeeded']} | {_f(r['success_rate'])} |")
    for key, title in (("auroc", "AUROC"), ("tpr_at_target_fpr", f"TPR at the calibrated {s['fpr']:g} FPR threshold"),
                       ("realised_fpr", "realised FPR on the clean evaluation split")):
        cols = [f"{a} {m.upper()}" for a in attacks for m in models]
        lines += ["", f"## {title}", "", "| detector | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for d in detectors:
            cells = [_f(_cell(report, m, d, a, key)) for a in attacks for m in models]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
    sup = report.get("seen_unseen", {})
    if sup:
        lines += ["", f"## Seen vs unseen (supervised detectors fitted on `{s['supervised_on']}`; AUROC / TPR)", "",
                  "| model | detector | " + " | ".join(attacks) + " |", "|---" * (len(attacks) + 2) + "|"]
        for m, dets in sup.items():
            for d, cells in dets.items():
                vals = []
                for a in attacks:
                    c = cells.get(a, {})
                    tag = " (seen)" if c.get("seen") else ""
                    vals.append(f"{_f(c.get('auroc'))} / {_f(c.get('tpr_at_target_fpr'))}{tag}")
                lines.append(f"| {m} | {d} | " + " | ".join(vals) + " |")
    if report["adaptive"]:
        lines += ["", "## Adaptive attack (PGD on classifier + csg-clean score, same eps)", "",
                  "| model | detector | success rate | AUROC | TPR at threshold | plain PGD TPR | evasion rate |",
                  "|---|---|---|---|---|---|---|"]
        for r in report["adaptive"]:
            ref = _cell(report, r["model"], r["detector"], "pgd", "tpr_at_target_fpr")
            lines.append(f"| {r['model']} | {r['detector']} | {_f(r['attack_success_rate'])} | {_f(r['auroc'])} | "
                         f"{_f(r['tpr_at_target_fpr'])} | {_f(ref)} | {_f(r['evasion_rate'])} |")
        lines += ["", "Evasion rate: share of attacked images that are misclassified *and* not flagged by that "
                  "detector at its fixed threshold. The attacker optimises against csg-clean only; other rows show "
                  "how those examples transfer. A drop from the plain-PGD column is what an informed attacker "
                  "buys: read the non-adaptive tables as upper bounds."]
    if report["errors"]:
        lines += ["", "## Not evaluated", ""] + [f"- {e}" for e in report["errors"]]
    mach = report["machine"]
    lines += ["", f"Machine: {mach['platform']}, {mach['cpu_count']} CPUs, device {mach['device']}"
              f"{', ' + mach['gpu'] if mach.get('gpu') else ''}; torch {mach['torch']}; "
              f"{report['seconds']['total']:.1f} s in total.", ""]
    return "\n".join(lines)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()


def _figure(figsize: tuple[float, float], dpi: int = 100):
    """A matplotlib Figure that is not registered with pyplot: no backend switch, nothing to close."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def write_roc_plots(report: dict[str, Any], out: Path) -> list[Path]:
    paths = []
    attacks = list(report["settings"]["attacks"]) + (["adaptive-pgd"] if report["adaptive"] else [])
    for a in attacks:
        fig = _figure((5.5, 5))
        ax = fig.subplots()
        src = report["adaptive"] if a == "adaptive-pgd" else report["results"]
        for r in (x for x in src if x["attack"] == a and x.get("roc")):
            style = "-" if r["model"] == "csg" else "--"
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], style, color=f"C{report['settings']['detectors'].index(r['detector']) % 10}",
                    label=f"{r['model']} {r['detector']} ({_f(r['auroc'])})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.axvline(report["settings"]["fpr"], color="grey", lw=0.5)
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC: {a}")
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
    """Write report.json, report.md, roc_<attack>.png and gate_heatmap.png into ``out``.

    ``gate`` is the evaluated CSG model's gate matrix; when not given it is read
    alone from the run's weights (:func:`read_gate`), never by reloading the model.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = [str(p.name) for p in write_roc_plots(report, out)]
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

"""Writing an evaluation report: report.json, report.md, ROC PNGs and the gate heatmap.

Every file is written atomically, so an interrupted run never leaves a half report.
report.json holds everything (settings, split indices, every metric, ROC points);
report.md holds the tables a person reads; the terminal gets :func:`summary_rows`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .artifacts import atomic_write_bytes, atomic_write_text, write_json

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
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_roc_plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    attacks = list(report["settings"]["attacks"]) + (["adaptive-pgd"] if report["adaptive"] else [])
    for a in attacks:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        src = report["adaptive"] if a == "adaptive-pgd" else report["results"]
        for r in (x for x in src if x["attack"] == a and x.get("roc")):
            style = "-" if r["model"] == "csg" else "--"
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], style, color=f"C{report['settings']['detectors'].index(r['detector']) % 10}",
                    label=f"{r['model']} {r['detector']} ({_f(r['auroc'])})")
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.axvline(report["settings"]["fpr"], color="grey", lw=0.5)
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"ROC: {a}")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        paths.append(atomic_write_bytes(out / f"roc_{a}.png", _png(fig)))
    return paths


def write_report(report: dict[str, Any], out: Path) -> Path:
    """Write report.json, report.md, roc_<attack>.png and gate_heatmap.png into ``out``."""
    from .models.store import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = [str(p.name) for p in write_roc_plots(report, out)]
    loaded = load_model(report["models"]["csg"]["run"])
    if loaded.model.gate is not None:
        from .inspect import write_heatmap

        gate = loaded.model.gate.weight.detach().cpu().numpy()
        write_heatmap(gate, loaded.classes, out / "gate_heatmap.png", "CSG gate (evaluated model)")
        report["files"].append("gate_heatmap.png")
    report["files"] += ["report.md", "report.json"]
    atomic_write_text(out / "report.md", markdown(report))
    write_json(out / "report.json", report)
    return out

"""Detection over a budget sweep: every detector x attack x budget, CSG vs STD, on trained runs.

Runs :func:`csgguard.evaluate.evaluate` (the very harness of ``csgguard evaluate``) on a
run and, optionally, its STD twin, then prints markdown tables:

* AUROC and detection rate at the fitted threshold per detector x attack x budget;
* CSG - STD AUROC per detector and cell (with ``--compare-run``);
* worst-case AUROC / detection rate per detector over every non-adaptive cell;
* the monotonicity check: the detection rate at a larger budget is never lower than at
  a smaller one by more than 0.03 (every budget pair, per attack);
* realised FPR on the clean evaluation split against the target (within 0.02?);
* the adaptive attack's evasion rate per budget.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detection_sweep.py --run runs/csg --compare-run runs/std
    # a smoke run (seconds on digits):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detection_sweep.py --run runs/csg --limit 300 \\
        --attacks fgsm,pgd --eps 0.1,0.3 --detectors csg-clean,mahalanobis --no-adaptive --steps 10
    # detector variants (a label that is no registered name names its base detector):
    ... --detectors csg-clean,csg-maha --detector-params '{"csg-maha": {"detector": "csg-clean", "components": "pattern"}}'
    ... --json sweep.json        # every row (no ROC points), the curves, thresholds and the matrix

Every number printed says where it came from: the command line, the machine, the data,
the splits and the budgets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import command_line

FPR_TOLERANCE = 0.02


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _index(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["model"], r["detector"], r["cell"]): r for r in rows}


def format_tables(report: dict[str, Any]) -> str:
    """The benchmark's tables, as markdown, from an evaluation report (``csgguard.evaluate.evaluate``)."""
    from csgguard.evaluate import MONOTONE_TOLERANCE
    from csgguard.sweep import format_eps

    s, models = report["settings"], list(report["models"])
    cells = list(s["cells"])
    adaptive_cells = sorted({r["cell"] for r in report["adaptive"]}, key=lambda c: float(
        next(r["eps"] for r in report["adaptive"] if r["cell"] == c)))
    idx = _index(report["results"] + report["adaptive"])
    detectors = s["detectors"]
    out: list[str] = []
    for key, title in (("auroc", "AUROC"), ("tpr_at_target_fpr", f"Detection rate at the fitted threshold "
                                                                  f"(target FPR {s['fpr']:g})")):
        out += [f"## {title}", ""]
        rows = [[d, m.upper()] + [_f(idx.get((m, d, c), {}).get(key)) for c in cells + adaptive_cells]
                for d in detectors for m in models if any((m, d, c) in idx for c in cells)]
        out += _table(["detector", "model"] + cells + adaptive_cells, rows) + [""]
    if "std" in models:
        out += ["## CSG - STD (AUROC; > 0: the gate helps)", ""]
        rows = []
        for d in detectors:
            vals = []
            for c in cells:
                a, b = idx.get(("csg", d, c), {}).get("auroc"), idx.get(("std", d, c), {}).get("auroc")
                vals.append("-" if a is None or b is None else f"{a - b:+.3f}")
            rows.append([d] + vals)
        out += _table(["detector"] + cells, rows) + [""]
    out += ["## Worst case per detector (every non-adaptive cell)", ""]
    rows = []
    for d in detectors:
        for m in models:
            w = report["worst_case"].get(m, {}).get(d)
            if w:
                rows.append([d, m.upper(), _f(w["auroc"]), str(w["auroc_cell"]), _f(w["detection_rate"]),
                             str(w["rate_cell"])])
    out += _table(["detector", "model", "worst AUROC", "at", "worst detection rate", "at"], rows) + [""]
    out += [f"## Monotonicity (detection rate at a larger budget never lower by more than {MONOTONE_TOLERANCE:g})",
            ""]
    rows = []
    for c in report["sweep"]:
        v = c["violations"]
        worst = max(v, key=lambda x: x["drop"]) if v else None
        rows.append([c["detector"], c["model"].upper(), c["attack"], "ok" if not v else "FAILS",
                     "-" if worst is None else f"{worst['rate_smaller']:.2f} at {format_eps(worst['smaller'])} -> "
                                               f"{worst['rate_larger']:.2f} at {format_eps(worst['larger'])}"])
    out += _table(["detector", "model", "attack", "monotone", "largest drop"], rows) + [""]
    out += [f"## Realised FPR on the clean evaluation split (target {s['fpr']:g}, tolerance {FPR_TOLERANCE:g})", ""]
    rows = []
    for m, dets in report["thresholds"].items():
        for d, t in dets.items():
            r = t.get("realised_fpr_evaluation")
            ok = r is not None and abs(r - s["fpr"]) <= FPR_TOLERANCE
            rows.append([d, m.upper(), f"{t['target']:.4g}", str(t.get("calibration_images")), _f(r),
                         "ok" if ok else "OFF"])
    out += _table(["detector", "model", "threshold", "calibration images", "realised FPR", "within"], rows) + [""]
    if report["adaptive"]:
        out += ["## Adaptive attack (evasion rate: misclassified and not flagged / attacked; "
                "aimed at the detector itself unless marked transfer)", ""]

        def aimed(m: str, d: str) -> str:
            r = next((idx[(m, d, c)] for c in adaptive_cells if (m, d, c) in idx), {})
            t = r.get("target", "csg-clean")
            return "itself" if t == d else f"{t} (transfer)"

        rows = [[d, m.upper(), aimed(m, d)] + [_f(idx.get((m, d, c), {}).get("evasion_rate")) for c in adaptive_cells]
                for d in detectors for m in models if any((m, d, c) in idx for c in adaptive_cells)]
        out += _table(["detector", "model", "attack aimed at"] + adaptive_cells, rows) + [""]
    if report["errors"]:
        out += ["Not evaluated:"] + [f"- {e}" for e in report["errors"]] + [""]
    return "\n".join(out)


def json_rows(report: dict[str, Any], command: str) -> dict[str, Any]:
    """What ``--json`` saves: every row without its ROC points, plus what they were measured with."""
    strip = lambda rows: [{k: v for k, v in r.items() if k != "roc"} for r in rows]  # noqa: E731
    return {"command": command, "settings": report["settings"], "data": report["data"],
            "split_sizes": report["split_sizes"], "models": report["models"], "machine": report["machine"],
            "attacks": report["attacks"], "attacks_fit": report["attacks_fit"], "thresholds": report["thresholds"],
            "rows": strip(report["results"]) + strip(report["adaptive"]), "cross_fit": report["cross_fit"],
            "sweep": report["sweep"], "worst_case": report["worst_case"], "errors": report["errors"],
            "seconds": report["seconds"]}


def _detector_params(text: str | None) -> dict[str, dict[str, Any]]:
    if not text:
        return {}
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        sys.exit(f"error: --detector-params is not JSON ({exc})")
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        sys.exit('error: --detector-params must map detector labels to parameter objects, e.g. '
                 '{"csg-clean": {"components": "pattern"}}')
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/default", help="the CSG run directory")
    ap.add_argument("--compare-run", default=None, help="its STD twin (same data and classes)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--attacks", default=None, help="default: csgguard evaluate's (fgsm,pgd,bim,pgd-l2,cw,deepfool)")
    ap.add_argument("--detectors", default=None, help="default: csgguard evaluate's")
    ap.add_argument("--eps", default=None, help="Linf budgets, e.g. 0.05,0.1 or 2/255,8/255 (default per dataset)")
    ap.add_argument("--l2-eps", default=None, help="L2 budgets (default per dataset)")
    ap.add_argument("--supervised-on", default=None, help="default fgsm,pgd (every Linf budget)")
    ap.add_argument("--detector-params", default=None, metavar="JSON",
                    help='label -> parameters, e.g. \'{"csg-clean": {"components": "pattern"}}\'; a label that is '
                         'no registered detector needs "detector": BASE; @FILE reads the JSON from FILE')
    ap.add_argument("--limit", type=int, default=None, help="test images used (split in three); small for smoke runs")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="pgd/bim steps (default: the attacks' own)")
    ap.add_argument("--cw-preset", default=None, help="fast | thorough")
    ap.add_argument("--cw-confidence", type=float, default=None,
                    help="C&W's confidence margin in logits (default 0: stop just past the boundary)")
    ap.add_argument("--no-adaptive", action="store_true")
    ap.add_argument("--adaptive-steps", type=int, default=40)
    ap.add_argument("--adaptive-eps", default=None, help="Linf budgets of the adaptive attack only (default: --eps)")
    ap.add_argument("--adaptive-targets", default=None,
                    help="detectors the adaptive attack is aimed at, each through its own score (default csg-clean; "
                         "'all': every detector with a differentiable score)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--compile", action="store_true",
                    help="run the foolbox attacks' steps through torch.compile (evaluate(compile=True))")
    ap.add_argument("--out", default=None, help="also write the full report (report.md, curves) into this folder")
    ap.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="save the rows as JSON")
    args = ap.parse_args(argv)

    import torch

    from csgguard.errors import CsgguardError
    from csgguard.evaluate import evaluate
    from csgguard.sweep import format_eps

    settings: dict[str, dict[str, Any]] = {}
    if args.steps:
        settings = {"pgd": {"steps": args.steps}, "bim": {"steps": args.steps}}
    if args.cw_preset:
        settings["cw"] = {"preset": args.cw_preset}
    if args.cw_confidence is not None:
        settings.setdefault("cw", {})["confidence"] = args.cw_confidence
    try:
        rep = evaluate(args.run, compare_run=args.compare_run, attacks=args.attacks, detectors=args.detectors,
                       fpr=args.fpr, limit=args.limit, seed=args.seed, device=args.device,
                       supervised_on=args.supervised_on, adaptive=not args.no_adaptive, eps=args.eps,
                       l2_eps=args.l2_eps, data_root=args.data_root, batch_size=args.batch_size,
                       detector_params=_detector_params(args.detector_params), adaptive_steps=args.adaptive_steps,
                       adaptive_targets=args.adaptive_targets, adaptive_eps=args.adaptive_eps,
                       attack_settings=settings, progress=False, out=args.out, write=args.out is not None,
                       compile=args.compile)
    except CsgguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cmd = command_line()
    m, s = rep["machine"], rep["settings"]
    print(f"$ {cmd}\n")
    print(f"machine: {m['platform']}, {m['cpu_count']} CPUs, device {m['device']} {m.get('gpu', '')}, "
          f"torch {m['torch']}, threads {torch.get_num_threads()}")
    print(f"data: {rep['data']['dataset']} ({rep['data']['source']}), test images {rep['data']['test_images']}, "
          f"splits {rep['split_sizes']} (limit {s['limit']}); Linf budgets {', '.join(map(format_eps, s['eps']))}; "
          f"L2 budgets {', '.join(map(format_eps, s['l2_eps']))}; supervised fit on {', '.join(s['supervised_on'])}")
    for label, info in rep["models"].items():
        print(f"model {label}: {info['run']} accuracy {info['accuracy_evaluation_split']:.4f} (evaluation split), "
              f"gate density {info['gate_density']}")
    if s["detector_params"]:
        print(f"detector params: {json.dumps(s['detector_params'], sort_keys=True)}")
    print(f"seconds: {rep['seconds']['total']:.0f}\n")
    print(format_tables(rep))
    if args.json_out:
        from csgguard.artifacts import write_json

        write_json(Path(args.json_out), json_rows(rep, cmd))
        print(f"rows saved to {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

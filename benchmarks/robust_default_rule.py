"""Judge the seventh question of docs/detectors.md: should ``csgguard fit`` default to csg-robust?

Reads sweep JSONs written by ``benchmarks/detection_sweep.py`` and applies the rule as
written there, part by part, printing every figure it used:

(a) minimax regret (AUROC) over every non-adaptive cell of every file and model, between
    csg-clean and csg-robust: csg-robust's largest regret must be smaller;
(b) on each file marked ``--natural``: csg-robust's mean detection rate over the
    non-adaptive cells >= csg-clean's - 0.01, and no cell with >= 100 successful attacks
    more than 0.05 under csg-clean's;
(c) realised clean FPR within 0.02 of the target on every file not marked ``--small``;
(d) adaptive PGD aimed at each detector at ``--adaptive-cell``: csg-robust's detection rate
    >= csg-clean's, on every file that has that cell for both (a veto only).

``--cells`` restricts (a)-(c) to the named non-adaptive cells (the confirmation judges only the
cells no earlier run scored).

    .venv/bin/python benchmarks/robust_default_rule.py \\
        benchmarks/results/units4-digits.json:small benchmarks/results/units4-mnist.json \\
        runs/q7/cifar10-dev-csg.json:natural runs/q7/cifar10-dev-std.json:natural \\
        --robust-label robust-cf=units4 --adaptive-cell adaptive-pgd@0.1

A file is ``PATH[:natural|:small]``; ``--robust-label LABEL=SUBSTRING`` names the label
csg-robust (cross-fitted, the candidate) carries in files whose path contains SUBSTRING
(default label ``csg-robust``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# the regret every detector rule of docs/detectors.md uses (this script's folder is on sys.path)
from detector_variants import minimax_regret

CLEAN = "csg-clean"


def _rows(data: dict, robust_label: str) -> dict[tuple[str, str], dict[str, dict]]:
    """(model slot, cell) -> {"clean": row, "robust": row} for both candidates."""
    out: dict[tuple[str, str], dict[str, dict]] = {}
    for r in data["rows"]:
        who = {CLEAN: "clean", robust_label: "robust"}.get(r["detector"])
        if who is None or r.get("supervised") or r.get("target") not in (None, r["detector"]):
            continue  # an adaptive cell counts only when aimed at the detector that reads it
        out.setdefault((r["model"], r["cell"]), {})[who] = r
    return out


def _model_tag(slot: str, data: dict) -> str:
    return f"[{slot} slot, {'CSG' if data['models'][slot].get('gated') else 'STD'}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--robust-label", action="append", default=[],
                    help="LABEL=SUBSTRING: csg-robust's label in files whose path contains SUBSTRING")
    ap.add_argument("--adaptive-cell", default="adaptive-pgd@0.1")
    ap.add_argument("--fpr-tolerance", type=float, default=0.02)
    ap.add_argument("--cells", default=None,
                    help="judge only these non-adaptive cells (comma-separated, e.g. fgsm@2/255,bim@4/255); the "
                         "confirmation's restriction to cells no earlier run scored")
    args = ap.parse_args(argv)
    labels = [tuple(x.split("=", 1)) for x in args.robust_label]
    only = None if args.cells is None else {c.strip() for c in args.cells.split(",") if c.strip()}

    aurocs: list[dict] = []  # minimax_regret's rows: one per candidate and judged cell
    verdicts: dict[str, bool] = {"a": True, "b": True, "c": True, "d": True}
    lines: list[str] = []
    for spec in args.files:
        path_s, _, tag = spec.partition(":")
        path = Path(path_s)
        data = json.loads(path.read_text())
        label = next((lab for lab, sub in labels if sub in path_s), "csg-robust")
        rows = _rows(data, label)
        target = data["settings"]["fpr"]
        for slot in sorted({m for m, _ in rows}):
            tag_m = _model_tag(slot, data)
            name = f"{path.stem} {tag_m}"
            cells = {c: v for (m, c), v in rows.items() if m == slot and len(v) == 2}
            plain = {c: v for c, v in cells.items() if not c.startswith("adaptive") and (only is None or c in only)}
            aurocs += [{"variant": who, "auroc": v[who]["auroc"], "dataset": path.stem, "model": tag_m,
                        "attack": c} for c, v in plain.items() for who in ("clean", "robust")]
            lines.append(f"\n## {name}: {len(plain)} non-adaptive cells judged")
            lines.append("| cell | n | AUROC csg-clean | AUROC csg-robust | detection csg-clean | detection csg-robust |")
            lines.append("|---|---|---|---|---|---|")
            for c, v in cells.items():  # every cell shown; (a) and (b) read only ``plain``
                lines.append(f"| {c} | {v['clean']['n_adv_eval']} | {v['clean']['auroc']:.3f} | "
                             f"{v['robust']['auroc']:.3f} | {v['clean']['tpr_at_target_fpr']:.3f} | "
                             f"{v['robust']['tpr_at_target_fpr']:.3f} |")
            if tag == "natural" and plain:
                mc = sum(v["clean"]["tpr_at_target_fpr"] for v in plain.values()) / len(plain)
                mr = sum(v["robust"]["tpr_at_target_fpr"] for v in plain.values()) / len(plain)
                drops = [(c, v["clean"]["tpr_at_target_fpr"] - v["robust"]["tpr_at_target_fpr"])
                         for c, v in plain.items() if v["clean"]["n_adv_eval"] >= 100]
                worst = max(drops, key=lambda t: t[1], default=("-", 0.0))
                ok = mr >= mc - 0.01 and worst[1] <= 0.05
                verdicts["b"] &= ok
                lines.append(f"(b) mean detection csg-clean {mc:.3f}, csg-robust {mr:.3f}; largest fall in a "
                             f"cell with >= 100 examples {worst[1]:+.3f} at {worst[0]}: {'holds' if ok else 'FAILS'}")
            th = data["thresholds"][slot]
            fc, fr = th[CLEAN]["realised_fpr_evaluation"], th[label]["realised_fpr_evaluation"]
            if tag != "small":
                ok = abs(fr - target) <= args.fpr_tolerance
                verdicts["c"] &= ok
                lines.append(f"(c) realised FPR csg-robust {fr:.3f} (csg-clean {fc:.3f}): {'holds' if ok else 'FAILS'}")
            else:
                lines.append(f"(c) realised FPR csg-robust {fr:.3f} (csg-clean {fc:.3f}): reported, not judged")
            ad = cells.get(args.adaptive_cell)
            if ad is not None:
                dc, dr = ad["clean"]["tpr_at_target_fpr"], ad["robust"]["tpr_at_target_fpr"]
                ok = dr >= dc
                verdicts["d"] &= ok
                lines.append(f"(d) {args.adaptive_cell} aimed at each: csg-clean {dc:.3f}, csg-robust {dr:.3f}: "
                             f"{'holds' if ok else 'FAILS'}")
    print("\n".join(lines))
    if not aurocs:
        ap.error("no non-adaptive cell scored by both csg-clean and csg-robust (check --cells and --robust-label)")
    ranked = {o["variant"]: o for o in minimax_regret(aurocs, ["clean", "robust"], lambda v: 0, lambda o: 0)}
    wc, wr = ranked["clean"], ranked["robust"]
    verdicts["a"] = wr["max_regret"] < wc["max_regret"]
    print(f"\n(a) largest regret: csg-clean {wc['max_regret']:.3f} at {wc['at']}; csg-robust {wr['max_regret']:.3f} "
          f"at {wr['at']} ({len(aurocs) // 2} cells): {'holds' if verdicts['a'] else 'FAILS'}")
    print("verdict: " + ", ".join(f"({k}) {'holds' if v else 'FAILS'}" for k, v in verdicts.items())
          + (" -> csg-robust passes" if all(verdicts.values())
             else " -> csg-clean stays the default"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

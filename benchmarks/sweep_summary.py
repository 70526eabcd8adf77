"""A compact view of a detection sweep (the rows `detection_sweep.py --json` saved): per cell,
csg-clean on the CSG and STD models beside the best same-harness baseline.

    .venv/bin/python benchmarks/sweep_summary.py runs/sweep-digits/rows.json [--detector csg-clean]

Columns: AUROC / detection rate at the fitted threshold; the best baseline is the one with
the highest AUROC on the CSG model in that cell (csg-* detectors are not baselines);
``n`` is the number of successful adversarial examples the cell rests on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINES = ("mahalanobis", "lid", "kd-bu", "feature-squeezing", "noise-response")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="rows.json files (a CSG and a STD sweep may be given separately)")
    ap.add_argument("--detector", default="csg-clean")
    args = ap.parse_args()
    rows = [r for p in args.rows for r in json.loads(Path(p).read_text())["rows"]]
    by = {(r["model"], r["detector"], r["cell"]): r for r in rows}
    cells = list(dict.fromkeys(r["cell"] for r in rows if not r["cell"].startswith("adaptive")))
    print(f"| cell | {args.detector} CSG | {args.detector} STD | best baseline (CSG) | gap | n (CSG) |")
    print("|---|---|---|---|---|---|")

    def fmt(r):
        return "-" if r is None or r["auroc"] is None else f"{r['auroc']:.3f} / {r['tpr_at_target_fpr']:.2f}"

    for cell in cells:
        ours = by.get(("csg", args.detector, cell))
        std = by.get(("std", args.detector, cell))
        base = [by[("csg", b, cell)] for b in BASELINES if ("csg", b, cell) in by and by[("csg", b, cell)]["auroc"]]
        best = max(base, key=lambda r: r["auroc"]) if base else None
        gap = f"{ours['auroc'] - best['auroc']:+.3f}" if ours and best and ours["auroc"] is not None else "-"
        name = f"{best['detector']} {fmt(best)}" if best else "-"
        print(f"| {cell} | {fmt(ours)} | {fmt(std)} | {name} | {gap} | {ours['n_adv_eval'] if ours else '-'} |")


if __name__ == "__main__":
    main()

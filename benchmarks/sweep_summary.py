"""A compact view of a detection sweep (the rows `detection_sweep.py --json` saved): per cell,
csg-clean on the CSG and STD models beside the best same-harness baseline.

    .venv/bin/python benchmarks/sweep_summary.py runs/sweep-digits/rows.json [--detector csg-clean]
    .venv/bin/python benchmarks/sweep_summary.py csg.json --std std.json --extra union,noise-response

Columns: AUROC / detection rate at the fitted threshold; the best baseline is the one with
the highest AUROC on the CSG model in that cell (csg-* detectors are not baselines);
``n`` is the number of successful adversarial examples the cell rests on. A STD run swept on
its own (`--run STD_RUN`, no `--compare-run`) is labelled "csg" in its file, as the harness
labels the one model it was given: pass such a file with ``--std`` to read it as the STD twin.
``--extra`` adds a column per named detector, CSG model (STD model).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINES = ("mahalanobis", "lid", "kd-bu", "feature-squeezing", "noise-response")


def read_rows(paths: list[str], *, as_std: bool = False) -> list[dict]:
    """The rows of every file; with ``as_std`` the files' lone model is read as the STD twin."""
    rows = [r for p in paths for r in json.loads(Path(p).read_text())["rows"]]
    if as_std:
        rows = [{**r, "model": "std"} for r in rows if r["model"] == "csg"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", help="rows.json files (a CSG and a STD sweep may be given separately)")
    ap.add_argument("--std", nargs="*", default=[], help="files of a STD run swept alone (read as the STD twin)")
    ap.add_argument("--detector", default="csg-clean")
    ap.add_argument("--extra", default="", help="comma-separated detectors shown in extra columns")
    args = ap.parse_args()
    rows = read_rows(args.rows) + read_rows(args.std, as_std=True)
    by = {(r["model"], r["detector"], r["cell"]): r for r in rows}
    cells = list(dict.fromkeys(r["cell"] for r in rows if not r["cell"].startswith("adaptive")))
    extra = [d for d in args.extra.split(",") if d]
    head = ["cell", f"{args.detector} CSG", f"{args.detector} STD", "best baseline (CSG)", "gap", *extra, "n (CSG)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))

    def short(r):
        return "-" if r is None or r["auroc"] is None else f"{r['auroc']:.3f}"

    def fmt(r):
        return short(r) if short(r) == "-" else f"{short(r)} / {r['tpr_at_target_fpr']:.2f}"

    for cell in cells:
        ours = by.get(("csg", args.detector, cell))
        std = by.get(("std", args.detector, cell))
        base = [by[("csg", b, cell)] for b in BASELINES if ("csg", b, cell) in by and by[("csg", b, cell)]["auroc"]]
        best = max(base, key=lambda r: r["auroc"]) if base else None
        gap = f"{ours['auroc'] - best['auroc']:+.3f}" if ours and best and ours["auroc"] is not None else "-"
        name = f"{best['detector']} {fmt(best)}" if best else "-"
        more = [f"{short(by.get(('csg', d, cell)))} ({short(by.get(('std', d, cell)))})" for d in extra]
        n = ours["n_adv_eval"] if ours else "-"
        print("| " + " | ".join([cell, fmt(ours), fmt(std), name, gap, *more, str(n)]) + " |")


if __name__ == "__main__":
    main()

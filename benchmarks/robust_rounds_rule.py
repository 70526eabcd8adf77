"""Judge docs/adaptive.md "More adaptive rounds" on the digits grid, part by part.

Reads the sweep JSONs of ``benchmarks/robust_rounds_digits.sh`` (one per seed, CSG and STD
models in each) and prints, per candidate label, every figure the rule uses:

(a) mean adaptive detection at ``adaptive-pgd@0.1`` (aimed at the detector itself) over the six
    models >= the default's mean + 0.03, and its lowest >= the default's lowest;
(b) mean non-adaptive detection rate over ``pgd@0.1`` and ``cw`` no more than 0.01 under the
    default's;
(c) realised clean FPR within 0.02 of the target on every model where the default's is.

Then the choice: among the candidates that hold, the highest mean adaptive detection; within
0.01 of each other, the fewer rounds.

    .venv/bin/python benchmarks/robust_rounds_rule.py runs/seeds/rounds-s{0,1,2}.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

DEFAULT = "csg-robust"
CANDIDATES = {"robust-r6": 6, "robust-r10": 10}
ADAPTIVE = "adaptive-pgd@0.1"
PLAIN = ("pgd@0.1", "cw")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--fpr", type=float, default=0.05)
    args = ap.parse_args()
    # (file, model) -> detector -> cell -> row
    grid: dict[tuple[str, str], dict[str, dict[str, dict]]] = {}
    for path in args.files:
        for r in json.loads(Path(path).read_text())["rows"]:
            if r["attack"].startswith("adaptive") and r.get("target") != r["detector"]:
                continue  # only the attack aimed at the detector itself counts
            grid.setdefault((path, r["model"]), {}).setdefault(r["detector"], {})[r["cell"]] = r

    def figures(label: str) -> dict:
        adaptive = [d[label][ADAPTIVE]["tpr_at_target_fpr"] for d in grid.values()]
        plain = [mean(d[label][c]["tpr_at_target_fpr"] for c in PLAIN) for d in grid.values()]
        fprs = [d[label][PLAIN[0]]["realised_fpr"] for d in grid.values()]
        return {"adaptive": adaptive, "plain": plain, "fpr": fprs}

    base = figures(DEFAULT)
    models = [f"{p.rsplit('/', 1)[-1]}:{m}" for p, m in grid]
    print("models:", ", ".join(models))
    print(f"{DEFAULT} (default): adaptive {[round(v, 3) for v in base['adaptive']]} mean {mean(base['adaptive']):.3f}; "
          f"plain {[round(v, 3) for v in base['plain']]} mean {mean(base['plain']):.3f}; "
          f"FPR {[round(v, 3) for v in base['fpr']]}")
    holding = {}
    for label, rounds in CANDIDATES.items():
        f = figures(label)
        a = mean(f["adaptive"]) >= mean(base["adaptive"]) + 0.03 and min(f["adaptive"]) >= min(base["adaptive"])
        b = mean(f["plain"]) >= mean(base["plain"]) - 0.01
        c = all(abs(v - args.fpr) <= 0.02 for v, d in zip(f["fpr"], base["fpr"], strict=True) if abs(d - args.fpr) <= 0.02)
        print(f"{label} ({rounds} rounds): adaptive {[round(v, 3) for v in f['adaptive']]} mean "
              f"{mean(f['adaptive']):.3f} min {min(f['adaptive']):.3f} -> (a) {'holds' if a else 'FAILS'}; "
              f"plain mean {mean(f['plain']):.3f} -> (b) {'holds' if b else 'FAILS'}; "
              f"FPR {[round(v, 3) for v in f['fpr']]} -> (c) {'holds' if c else 'FAILS'}")
        if a and b and c:
            holding[label] = mean(f["adaptive"])
    if not holding:
        print("verdict: no candidate holds; rounds stays 3")
        return
    best = max(holding.values())
    chosen = min((lab for lab, v in holding.items() if v >= best - 0.01), key=CANDIDATES.get)
    print(f"verdict: {chosen} ({CANDIDATES[chosen]} rounds) goes to the MNIST confirmation")


if __name__ == "__main__":
    main()

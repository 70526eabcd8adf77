"""How often a realised clean FPR misses the target by more than a tolerance by chance alone.

The sweep's protocol sets each detector's threshold on ``calibration`` clean images at the target
FPR (``csgguard.metrics.threshold_at_fpr``, as ``fit`` and ``evaluate`` do) and reads the realised
FPR on ``evaluation`` other clean images. Even when the two sets are exchangeable (any score, any
detector: only ranks matter), the realised rate scatters around the target; with a few hundred
images the scatter is as wide as the tolerance. This script simulates exactly that protocol with
uniform scores and prints, per split size, the share of draws outside ``target +- tolerance``, so a
realised FPR can be read against what chance gives.

    .venv/bin/python benchmarks/fpr_tolerance.py [--draws 20000] [--sizes 240:239,500:500,500:1000,1000:1000]
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="240:239,500:500,500:1000,1000:1000",
                    help="comma list of calibration:evaluation image counts (the digits, MNIST, CIFAR-10 union and "
                         "CIFAR-10 sweeps)")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--draws", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from csgguard.metrics import threshold_at_fpr

    rng = np.random.default_rng(args.seed)
    print(f"target FPR {args.fpr}, tolerance +-{args.tolerance}, {args.draws} draws per size, seed {args.seed}")
    print(f"{'calibration':>12}{'evaluation':>12}{'mean FPR':>10}{'5%-95% of realised FPR':>26}{'outside tolerance':>19}")
    for pair in args.sizes.split(","):
        n_cal, n_eval = (int(v) for v in pair.split(":"))
        realised = np.array([(rng.random(n_eval) > threshold_at_fpr(rng.random(n_cal), args.fpr)).mean()
                             for _ in range(args.draws)])
        lo, hi = np.quantile(realised, [0.05, 0.95])
        outside = np.mean(np.abs(realised - args.fpr) > args.tolerance + 1e-12)
        print(f"{n_cal:>12}{n_eval:>12}{realised.mean():>10.4f}{f'{lo:.3f} - {hi:.3f}':>26}{outside:>19.3f}")


if __name__ == "__main__":
    main()

"""MIS speed: csgguard's sorted 1-D estimator against scikit-learn's mutual_info_classif, same process.

Every ``csgguard train`` and ``inspect`` computes MIS over every filter and class. Prints
seconds for each and their ratio, and the largest difference between the two (0 expected:
the same estimator, the same tie-breaking noise), for a digits-sized and a CIFAR-sized
feature matrix (K = 64 filters, 10 classes; synthetic ReLU-like activations, seed 0).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mis_speed.py
"""

from __future__ import annotations

import platform
import time

import numpy as np
from sklearn.feature_selection import mutual_info_classif

from csgguard.metrics import mutual_information_score


def sklearn_mis(x: np.ndarray, labels: np.ndarray, classes: int) -> float:
    return float(np.stack([mutual_info_classif(x, (labels == c).astype(int), random_state=0)
                           for c in range(classes)], 1).max(1).mean())


def main() -> None:
    print(f"machine: {platform.platform()}, numpy {np.__version__}")
    rng = np.random.default_rng(0)
    print("| samples | filters | scikit-learn s | csgguard s | ratio | difference |")
    print("|---|---|---|---|---|---|")
    for n in (719, 2000):
        labels = rng.integers(0, 10, n)
        x = np.maximum(rng.standard_normal((n, 64)) + 0.5 * labels[:, None] % 3, 0)
        t = time.perf_counter()
        want = sklearn_mis(x, labels, 10)
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        got = mutual_information_score(x, labels, 10)
        t_new = time.perf_counter() - t
        print(f"| {n} | 64 | {t_ref:.2f} | {t_new:.2f} | {t_ref / t_new:.1f}x | {abs(got - want):.1e} |")


if __name__ == "__main__":
    main()

"""Helpers shared by the benchmark scripts (importable because a script's folder is on sys.path)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def command_line() -> str:
    """The command that produced this output, as it can be pasted back into a shell."""
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + shlex.join([str(exe), *sys.argv])


def best_of(fn, repeats: int) -> float:
    """Fastest of ``repeats`` wall-clock timings of ``fn()`` (least disturbed by other load)."""
    import time

    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def print_table(title: str, columns, rows: dict[str, list[float]]) -> None:
    """A markdown table of one number per (row, column), three decimals, under a ``# title``."""
    print(f"# {title}\n")
    print("| statistic | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


def probe_parser(doc: str):
    """The arguments every CIFAR-10 probe of the development pair takes (model, data, runs, cache)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("model", choices=("CSG", "STD"))
    ap.add_argument("data_root", nargs="?", default="../shared/data/cifar10-jpeg")
    ap.add_argument("--runs", default="benchmarks/gpu-runs", help="folder of cifar10-resnet20-{csg,std}")
    ap.add_argument("--cache", default="runs/study/variants/cifar10-tail",
                    help="the development grid's cached adversarial sets (benchmarks/detector_variants.py)")
    return ap


def correct_training_images(model, ds, limit: int):
    """The first ``limit`` training images that ``model`` classifies correctly, and their features:
    the clean population a probe's units come from (as every csgguard detector's fit)."""
    import numpy as np
    import torch

    from csgguard.features import extract_features

    train = ds.train.subset(np.arange(min(limit, len(ds.train))))
    x = train.x()
    feats = extract_features(model, x)
    ok = np.flatnonzero(feats.pred == train.labels.numpy())
    return x[torch.as_tensor(ok)], feats.subset(ok)

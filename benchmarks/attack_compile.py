"""An attack with ``--compile`` against the same attack eager: same model, images, seed, process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack_compile.py --run csgguard/pretrained/cifar10-resnet20-csg \
        --data-root ../shared/data/cifar10-jpeg [--images 512] [--method pgd] [--eps 8/255]

``compile=True`` (:mod:`csgguard.compiling`) runs foolbox's steps through ``torch.compile`` at
one fixed batch size (shorter batches padded). Prints the eager wall time, the compiled run's
first wall time (compiling included) and a second one (graphs compiled, as every later attack
of a sweep in the same process), the ratios, and whether both give the same result: the
success masks and the largest difference between the adversarial images (float rounding
may differ, and a PGD example can land on another iterate where the margin is a tie).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from _common import command_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory or pretrained name")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--images", type=int, default=512, help="first N test images")
    ap.add_argument("--method", default="pgd")
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()

    from csgguard.attacks import attack_run_split
    from csgguard.sweep import parse_fraction

    eps = parse_fraction(args.eps, "--eps") if args.eps else None
    kw = dict(limit=args.images, data_root=args.data_root, eps=eps, batch_size=args.batch_size, seed=0,
              device="cpu", progress=False)
    print(f"command: {command_line()}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, capability {torch.backends.cpu.get_cpu_capability()}")
    times, sets = {}, {}
    for name, compiled in (("eager", False), ("compiled, first", True), ("compiled, second", True)):
        t0 = time.perf_counter()
        sets[name] = attack_run_split(args.run, "test", args.method, compile=compiled, **kw)
        times[name] = time.perf_counter() - t0
    base = sets["eager"]
    print(f"{args.method} eps {args.eps}, {args.images} test images ({int(base.attacked.sum())} attacked), "
          f"batch {args.batch_size}")
    print(f"{'run':<18}{'seconds':>9}{'eager / this':>14}{'successes':>11}{'same mask':>11}{'max |dx_adv|':>14}")
    for name, s in sets.items():
        same = bool(np.array_equal(s.success, base.success))
        diff = float(np.abs(s.x_adv - base.x_adv).max())
        print(f"{name:<18}{times[name]:>9.1f}{times['eager'] / times[name]:>14.2f}{int(s.success.sum()):>11}"
              f"{str(same):>11}{diff:>14.2e}")


if __name__ == "__main__":
    main()

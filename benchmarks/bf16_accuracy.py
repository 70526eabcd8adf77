"""Does bf16 autocast cost accuracy? The same short CIFAR-10 run in bf16 and in fp32.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bf16_accuracy.py --data-root ../shared/data/cifar10-jpeg \\
        [--epochs 4] [--train-limit 10000] [--seeds 0]

Trains ResNet-20 CSG with the CIFAR-10 default recipe (``csgguard.train.train``), once with
``amp=True`` (bf16 autocast + channels-last, on a CPU with native bf16) and once with
``amp=False`` (fp32), same seed, same images; prints test accuracy (all 10,000 test images),
validation accuracy, wall time and training img/s of each, and the differences. A short
schedule on a subset: it checks that bf16 does not lose accuracy against fp32 trained the
same way, not what the full recipe reaches. On a CPU without native bf16, ``amp`` is a no-op
and both runs are fp32 (the script says so).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import torch
from _common import command_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default="../shared/data/cifar10-jpeg")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; each trains one bf16 and one fp32 run")
    args = ap.parse_args()

    from csgguard.devices import bf16_native
    from csgguard.train import TrainConfig, train

    print(f"command: {command_line()}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, native bf16 on CPU: {bf16_native(torch.device('cpu'))}")
    print("| seed | precision | test accuracy | val accuracy | seconds | train img/s |")
    print("|---|---|---|---|---|---|")
    diffs = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        acc = {}
        for amp in (True, False):
            cfg = TrainConfig(data="cifar10", data_root=args.data_root, epochs=args.epochs, seed=seed, amp=amp,
                              train_limit=args.train_limit, device="cpu")
            with tempfile.TemporaryDirectory() as out:
                res = train(cfg, out, progress=False)
            summary = res.summary
            imgs = args.epochs * min(args.train_limit, 45000) / summary["seconds"]
            acc[amp] = summary["test_accuracy"]
            print(f"| {seed} | {'bf16 + channels-last' if amp else 'fp32'} | {summary['test_accuracy']:.4f} | "
                  f"{summary['val_accuracy']:.4f} | {summary['seconds']:.0f} | {imgs:.0f} |", flush=True)
        diffs.append(acc[True] - acc[False])
    print(f"test accuracy, bf16 - fp32, per seed: {', '.join(f'{d:+.4f}' for d in diffs)}")


if __name__ == "__main__":
    main()

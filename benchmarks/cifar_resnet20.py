"""The CIFAR-10 ResNet-20 recipe end to end: a CSG model and its STD twin, same settings.

    # the full run (a GPU: ~30 epochs each, bf16, channels-last, batch 256)
    python benchmarks/cifar_resnet20.py --device cuda --data-root DIR --epochs 30
    # a CPU smoke run: 2,000 training images, one STD and one CSG epoch
    python benchmarks/cifar_resnet20.py --device cpu --data-root DIR --epochs 2 --train-limit 2000 \\
        --warmup 0 --period 2 --csg-from 1

``DIR`` holds CIFAR-10 in any layout ``csgguard.load_dataset("cifar10", DIR)`` reads;
with the shared JPEG copy (train.tar.gz / test.tar.gz) the figures are for
"CIFAR-10 (JPEG q75 copy)", not the original PNG-quality images. Prints test accuracy,
gate density, MIS, wall time, seconds per epoch by path and peak memory for each model.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from csgguard import TrainConfig, load_dataset, train
from csgguard.devices import select_device
from csgguard.progress import log


def run_one(gate: bool, args, device: torch.device) -> dict[str, Any]:
    cfg = TrainConfig(data="cifar10", data_root=args.data_root, arch="resnet20", gate=gate, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, csg_lr=args.lr, warmup=args.warmup,
                      period=args.period, csg_from=args.csg_from, device=str(device), seed=args.seed,
                      train_limit=args.train_limit)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = train(cfg, Path(args.out) / ("csg" if gate else "std"), progress=False, log=log)
    wall = time.perf_counter() - t0
    s = result.summary
    by_path: dict[str, list[float]] = {}
    for h in result.history:
        by_path.setdefault(h["path"], []).append(h["seconds"])
    row = {"model": "CSG" if gate else "STD", "test_accuracy": s["test_accuracy"], "gate_density": s["gate_density"],
           "mis": s["mis"], "activation_mis": s["activation_mis"], "best_epoch": s["best_epoch"],
           "epochs": s["epochs"], "wall_s": wall, "train_s": s["seconds"],
           **{f"{p}_epoch_s": float(np.mean(v)) for p, v in by_path.items()}}
    if device.type == "cuda":
        row["peak_gpu_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=os.environ.get("CSGGUARD_DATA_ROOT"),
                   help="CIFAR-10 root (e.g. ../shared/data/cifar10-jpeg); env CSGGUARD_DATA_ROOT")
    p.add_argument("--device", default="auto")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--period", type=int, default=None)
    p.add_argument("--csg-from", type=int, default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default="csg,std", help="csg, std or both (csg,std)")
    p.add_argument("--out", default="runs/cifar_resnet20")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = select_device(args.device)
    t0 = time.perf_counter()
    ds = load_dataset("cifar10", args.data_root)  # decodes once, then reads the cache
    load_s = time.perf_counter() - t0
    jpeg = "jpeg" in str(ds.source).lower()
    label = "CIFAR-10 (JPEG q75 copy)" if jpeg else "CIFAR-10"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device} ({torch.get_num_threads()} threads)"
    print(f"{label}, ResNet-20, {args.epochs} epochs, batch {args.batch_size}, on {name}; "
          f"dataset load {load_s:.1f} s", flush=True)
    rows = [run_one(m.strip() == "csg", args, device) for m in args.models.split(",") if m.strip()]
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    if len(rows) == 2 and "std_epoch_s" in rows[1] and "csg_epoch_s" in rows[0]:
        print(f"csg-path epoch / std epoch: {rows[0]['csg_epoch_s'] / rows[1]['std_epoch_s']:.3f}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"peak host RSS {rss:.0f} MiB")
    if args.json:
        from csgguard.artifacts import write_json

        write_json(args.json, {"dataset": label, "device": name, "dataset_load_s": load_s, "epochs": args.epochs,
                               "batch_size": args.batch_size, "lr": args.lr, "train_limit": args.train_limit,
                               "models": rows, "peak_host_rss_mib": rss})
    return rows


if __name__ == "__main__":
    os.environ.setdefault("CSGGUARD_NO_PROGRESS", "1")
    main()

"""Reproduce the README detection tables from scratch: train CSG + STD, then `evaluate`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detection.py digits              # CPU, ~3 min
    .venv/bin/python benchmarks/detection.py mnist --data-root DIR [--reduced]     # CPU: --reduced
    .venv/bin/python benchmarks/detection.py cifar10 --data-root DIR [--reduced]   # GPU when present

Every number printed says where it came from: the machine, the data, the training
settings and the equivalent CLI commands. --reduced trains fewer epochs and
evaluates a limited number of test images (for CPU-only machines); say so when
quoting its numbers.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

# dataset -> (full settings, reduced settings): epochs, --limit, attacks
PLANS = {
    "digits": ({"epochs": 30, "limit": None}, {"epochs": 20, "limit": None}),
    "mnist": ({"epochs": 6, "limit": 3000}, {"epochs": 3, "limit": 900}),
    "cifar10": ({"epochs": 30, "limit": 3000}, {"epochs": 3, "limit": 600}),
}


def _same_training(run: Path, cfg) -> bool:
    """True when ``run`` holds a finished model trained with ``cfg``'s data, gate, epochs and seed."""
    import json

    manifest = run / "model.json"
    if not manifest.is_file():
        return False
    done = json.loads(manifest.read_text()).get("training", {})
    want = cfg.resolved().to_dict()
    keys = ("data", "gate", "epochs", "seed", "arch", "batch_size", "lr", "train_limit")
    return all(done.get(k) == want.get(k) for k in keys)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", choices=sorted(PLANS))
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default="runs/benchmark")
    ap.add_argument("--reduced", action="store_true", help="fewer epochs, fewer test images (CPU)")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--attacks", default="fgsm,pgd,cw,deepfool")
    ap.add_argument("--eps", type=float, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-limit", type=int, default=None,
                    help="train on the first N (mixed-class) training images only (reduced CPU runs)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse OUT/<data>/{csg,std} when their model.json records the same training settings")
    ap.add_argument("--cw-preset", default="fast", help="C&W preset passed to the attack (fast | thorough)")
    args = ap.parse_args()

    import torch

    from csgguard import TrainConfig, train
    from csgguard.devices import select_device
    from csgguard.evaluate import evaluate

    dev = select_device(args.device)
    plan = dict(PLANS[args.data][1 if args.reduced or (args.data != "digits" and dev.type == "cpu") else 0])
    if args.epochs:
        plan["epochs"] = args.epochs
    if args.limit:
        plan["limit"] = args.limit
    out = Path(args.out) / args.data
    t0 = time.perf_counter()
    runs = {}
    for label, gate in (("csg", True), ("std", False)):
        runs[label] = out / label
        cfg = TrainConfig(data=args.data, data_root=args.data_root, gate=gate, epochs=plan["epochs"], seed=0,
                          device=str(dev), train_limit=args.train_limit)
        if args.reuse and _same_training(runs[label], cfg):
            print(f"reusing {runs[label]} (same data, gate, epochs and seed in its model.json)")
        else:
            train(cfg, runs[label], progress=False)
        gate_flag = "" if gate else " --no-gate"
        root = f" --data-root {shlex.quote(args.data_root)}" if args.data_root else ""
        limit = f" (train_limit={args.train_limit}, Python API)" if args.train_limit else ""
        print(f"$ csgguard train --data {args.data}{root} --epochs {plan['epochs']}{gate_flag} --out {runs[label]}"
              f"{limit}")
    t_train = time.perf_counter() - t0
    attacks = tuple(a.strip() for a in args.attacks.split(","))
    settings = {"cw": {"preset": args.cw_preset}} if "cw" in attacks else {}
    rep = evaluate(runs["csg"], compare_run=runs["std"], attacks=attacks, limit=plan["limit"], eps=args.eps,
                   device=str(dev), data_root=args.data_root, out=out / "evaluation", attack_settings=settings,
                   progress=False)
    lim = f" --limit {plan['limit']}" if plan["limit"] else ""
    print(f"$ csgguard evaluate --run {runs['csg']} --compare-run {runs['std']} --attacks {args.attacks}{lim} "
          f"--out {out / 'evaluation'}   (C&W preset {args.cw_preset})")
    m = rep["machine"]
    print(f"\nmachine: {m['platform']}, {m['cpu_count']} CPUs, device {m['device']} {m.get('gpu', '')}, "
          f"torch {m['torch']}, threads {torch.get_num_threads()}")
    print(f"data: {rep['data']['dataset']} ({rep['data']['source']}), test images {rep['data']['test_images']}, "
          f"splits {rep['split_sizes']}; Linf eps {', '.join(f'{e:.4g}' for e in rep['settings']['eps'])}; "
          f"{'REDUCED run' if plan != PLANS[args.data][0] else 'full run'} ({plan['epochs']} epochs)")
    for label, info in rep["models"].items():
        print(f"model {label}: accuracy {info['accuracy_evaluation_split']:.4f}, gate density {info['gate_density']}")
    print(f"seconds: train {t_train:.0f}, evaluate {rep['seconds']['total']:.0f}\n")
    print((out / "evaluation" / "report.md").read_text())


if __name__ == "__main__":
    main()

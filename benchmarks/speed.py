"""Speed figures, each with a baseline measured in the same process on the same machine.

    python benchmarks/speed.py                              # digits, CPU or the best device
    python benchmarks/speed.py --device cuda --data cifar10 --data-root DIR
    python benchmarks/speed.py --quick --data mnist --data-root DIR --json out.json

Prints, in one run:
  * training seconds per epoch, CSG-path epoch vs STD epoch (ratio; target <= 1.15)
  * screening images/s: end to end (image files -> rows, ``csgguard.screening``) and the
    model + detector on decoded tensors, each vs a bare forward pass (detector overhead
    ratio; target <= 1.10)
  * PGD through ``csgguard.attacks.run`` vs foolbox's LinfPGD called directly (ratio;
    target <= 1.05)
  * detector fit time (csg-clean: fit on features, and ``fit_detector`` end to end)
  * peak host RSS and, on CUDA, peak GPU memory.
Figures are printed, never asserted: a slow shared machine is not a failing build.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from csgguard import TrainConfig, load_dataset
from csgguard.devices import select_device
from csgguard.models.store import save_model
from csgguard.train import Trainer, epoch_path

PGD_EPS = {"digits": 0.1, "mnist": 0.1, "cifar10": 8 / 255}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 1) -> tuple[float, Any]:
    """Median wall seconds of ``repeat`` calls (device work included) and the last result."""
    times, out = [], None
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ----------------------------------------------------------------------------- sections

def bench_training(ds, device: torch.device, args) -> tuple[dict[str, Any], Trainer]:
    """One CSG-path epoch vs one STD epoch of the same network on the same data, interleaved."""
    cfg = dict(data=ds.name if ds.name in ("digits", "mnist", "cifar10") else "digits", device=str(device),
               seed=0, batch_size=args.batch_size)
    csg = TrainConfig(gate=True, **cfg).resolved()
    std = TrainConfig(gate=False, **cfg).resolved()
    csg_epoch = next(e for e in range(csg.epochs) if epoch_path(csg, e) == "csg")
    t_csg, t_std = Trainer(csg, ds, device), Trainer(std, ds, device)
    t_csg.run_epoch(csg_epoch)  # warm-up (allocator, cuDNN autotuning)
    t_std.run_epoch(0)
    csg_s, std_s = [], []
    for _ in range(args.epochs):  # interleaved, so machine-load drift hits both alike
        csg_s.append(timed(lambda: t_csg.run_epoch(csg_epoch), device)[0])
        std_s.append(timed(lambda: t_std.run_epoch(0), device)[0])
    c, s = float(np.median(csg_s)), float(np.median(std_s))
    n_csg = sum(epoch_path(csg, e) == "csg" for e in range(csg.epochs))
    schedule = (n_csg * c + (csg.epochs - n_csg) * s) / (csg.epochs * s)
    return {"train_images": len(ds.train), "batch_size": csg.batch_size, "amp_bf16": device.type == "cuda",
            "csg_epoch_s": c, "std_epoch_s": s, "csg_vs_std": c / s,
            "csg_schedule_vs_std": schedule}, t_csg


def bench_attack(model, x, y, device: torch.device, data: str, args) -> dict[str, Any]:
    try:
        import foolbox as fb

        from csgguard.attacks import run as attack_run
    except ImportError as exc:
        return {"pgd": f"not available ({exc})"}
    model.eval()
    eps, steps = PGD_EPS.get(data, 8 / 255), args.pgd_steps
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        ok = model(x).argmax(1) == y  # both sides attack the same correctly classified inputs
    x, y = x[ok], y[ok]
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=device)
    attack = fb.attacks.LinfPGD(steps=steps, random_start=True)

    def direct():
        for i in range(0, len(x), args.attack_batch):
            attack(fmodel, x[i:i + args.attack_batch], y[i:i + args.attack_batch], epsilons=eps)

    def ours():
        return attack_run(model, x, y, "pgd", eps=eps, steps=steps, batch_size=args.attack_batch,
                          device=device, progress=False, dataset=data)

    direct()  # warm-up, both sides
    ours()
    d, _ = timed(direct, device, args.repeat)
    o, _ = timed(ours, device, args.repeat)
    return {"pgd_images": int(len(x)), "pgd_steps": steps, "pgd_foolbox_s": d, "pgd_csgguard_s": o,
            "pgd_csgguard_vs_foolbox": o / d}


def bench_detector(run_dir: Path, ds, model, device: torch.device, args) -> dict[str, Any]:
    try:
        from csgguard.detectors import build_detector
        from csgguard.fitting import fit_detector
    except ImportError as exc:
        return {"detector": f"not available ({exc})"}
    from csgguard.features import extract_features

    feats = extract_features(model, ds.train.x(), batch_size=1024, device=device)
    keep = feats.pred == ds.train.labels.numpy()
    clean = feats.subset(np.flatnonzero(keep))
    fit_s, _ = timed(lambda: build_detector("csg-clean").fit(clean), torch.device("cpu"), args.repeat)
    e2e_s, _ = timed(lambda: fit_detector(run_dir, detector="csg-clean", device=str(device), progress=False,
                                          data_root=args.data_root), device)
    return {"detector_fit_images": int(keep.sum()), "detector_fit_s": fit_s, "fit_detector_end_to_end_s": e2e_s}


def _write_images(x: torch.Tensor, folder: Path) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    paths = []
    for i, a in enumerate(arr):
        p = folder / f"{i:06d}.png"
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(p)
        paths.append(p)
    return paths


def bench_screening(run_dir: Path, x: torch.Tensor, device: torch.device, tmp: Path, args) -> dict[str, Any]:
    try:
        from csgguard.screening import Screener, screen
    except ImportError as exc:
        return {"screening": f"not available ({exc})"}
    model = Screener(run_dir, device=str(device))
    net = model.loaded.model.eval()
    bs, n = args.screen_batch, len(x)
    xd = x.to(device)

    @torch.no_grad()
    def bare(batch: int = bs):
        for i in range(0, n, batch):
            net(xd[i:i + batch])

    @torch.no_grad()
    def bare_to_host():
        # what any screener must do at least: the forward pass and its predictions back on the host
        for i in range(0, n, bs):
            torch.softmax(net(xd[i:i + bs]).float(), 1).max(1).values.cpu()

    def scored(batch: int = bs):
        for i in range(0, n, batch):
            model.score_batch(xd[i:i + batch])

    folder = tmp / "images"
    _write_images(x, folder)

    def end_to_end():
        _, rows = screen([folder], run_dir, device=str(device), batch_size=bs, workers=args.workers,
                         progress=False)
        return sum(1 for _ in rows)

    bare()
    b, _ = timed(bare, device, args.repeat)
    bh, _ = timed(bare_to_host, device, args.repeat)
    s, _ = timed(scored, device, args.repeat)
    e, count = timed(end_to_end, device, args.repeat)
    res = {"screen_images": n, "screen_batch": bs, "bare_forward_img_s": n / b, "model_plus_detector_img_s": n / s,
           "detector_overhead": s / b,
           "bare_to_host_img_s": n / bh, "detector_overhead_vs_bare_to_host": s / bh,
           "end_to_end_img_s": count / e, "end_to_end_vs_bare": e / b, "screen_workers": args.workers}
    # the same overhead at larger batches: on a GPU a ResNet-20 batch of 256 is launch-bound, so a fixed
    # per-batch cost (kernel launches, one device -> host copy) weighs less as the batch grows
    for batch in args.more_screen_batches:
        bare(batch)
        b, _ = timed(partial(bare, batch), device, args.repeat)
        s, _ = timed(partial(scored, batch), device, args.repeat)
        res[f"detector_overhead_batch{batch}"] = s / b
    return res


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--data", default="digits", help="digits | mnist | cifar10")
    p.add_argument("--data-root", default=None)
    p.add_argument("--quick", action="store_true", help="subsets and fewer repeats (CPU smoke figures)")
    p.add_argument("--train-limit", type=int, default=None, help="train images used for the epoch timings")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default per dataset)")
    p.add_argument("--epochs", type=int, default=None, help="timed epochs per path (median)")
    p.add_argument("--eval-limit", type=int, default=None, help="images for screening / attack timings")
    p.add_argument("--pgd-steps", type=int, default=None)
    p.add_argument("--attack-batch", type=int, default=256)
    p.add_argument("--screen-batch", type=int, default=256)
    p.add_argument("--more-screen-batches", default="1024",
                   help="comma list of further batch sizes for the detector overhead alone ('' for none)")
    p.add_argument("--workers", type=int, default=0, help="image decode workers for end-to-end screening")
    p.add_argument("--repeat", type=int, default=None, help="repeats per timed call (median)")
    p.add_argument("--skip", default="", help="comma list of sections to skip: attack,detector,screening")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    quick = args.quick
    args.epochs = args.epochs or (2 if quick else 3)
    args.repeat = args.repeat or (1 if quick else 3)
    args.pgd_steps = args.pgd_steps or (10 if quick else 40)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.more_screen_batches = [int(b) for b in args.more_screen_batches.split(",") if b.strip()]

    device = select_device(args.device)
    t0 = time.perf_counter()
    ds = load_dataset(args.data, args.data_root)
    load_s = time.perf_counter() - t0
    limit = args.train_limit or (4096 if quick and args.data != "digits" else None)
    if limit is not None and limit < len(ds.train):
        ds = dataclasses.replace(ds, train=ds.train.subset(np.arange(limit)))
    n_eval = min(len(ds.test), args.eval_limit or (512 if quick else 2000))
    x, y = ds.test.x()[:n_eval], ds.test.labels[:n_eval]

    res: dict[str, Any] = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
        "data": args.data, "source": ds.source, "dataset_load_s": load_s, "quick": quick,
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_res, trainer = bench_training(ds, device, args)
    res.update(train_res)
    model = trainer.model.eval()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run_dir = tmp / "run"
        cfg = trainer.cfg
        save_model(model, run_dir, classes=ds.classes,
                   dataset={"name": ds.name, "source": ds.source, "split_seed": 0},
                   training={**cfg.to_dict(), "data_root": args.data_root})
        if "attack" not in skip:
            res.update(bench_attack(model, x, y, device, args.data, args))
        if "detector" not in skip:
            res.update(bench_detector(run_dir, ds, model, device, args))
        if "screening" not in skip:
            if "detector" in skip:
                # screening needs a fitted detector; fit it untimed when its section is skipped
                from csgguard.fitting import fit_detector

                fit_detector(run_dir, detector="csg-clean", device=str(device), progress=False,
                             data_root=args.data_root)
            res.update(bench_screening(run_dir, x, device, tmp, args))
    res["peak_host_rss_mib"] = peak_rss_mib()
    if device.type == "cuda":
        res["peak_gpu_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    _print(res)
    if args.json:
        from csgguard.artifacts import write_json

        write_json(args.json, res)
    return res


TARGETS = {"csg_vs_std": 1.15, "detector_overhead": 1.10, "pgd_csgguard_vs_foolbox": 1.05}


def _print(res: dict[str, Any]) -> None:
    width = max(len(k) for k in res)
    for k, v in res.items():
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        if k in TARGETS and isinstance(v, float):
            text += f"   (target <= {TARGETS[k]}: {'ok' if v <= TARGETS[k] else 'MISSED'})"
        print(f"{k:<{width}}  {text}")
    sys.stdout.flush()


if __name__ == "__main__":
    os.environ.setdefault("CSGGUARD_NO_PROGRESS", "1")
    main()

"""CPU training speed: csgguard's training step against a bare PyTorch loop, fp32 and bf16.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_speed.py --data-root ../shared/data/cifar10-jpeg
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_speed.py --data-root ../shared/data/cifar10-jpeg

Same process, same network (ResNet-20 STD path, CIFAR-10 JPEG copy), same batch size,
same uint8 images and on-tensor augmentation cost for both:

* **bare loop**: a plain ``for`` over shuffled index batches -> float -> random crop +
  flip -> SGD step (nesterov, weight decay), with or without bf16 autocast +
  channels-last;
* **csgguard**: :class:`csgguard.train.Trainer` (its batches, augmentation, per-step
  cosine LR, loss/accuracy bookkeeping), the STD path and the CSG path.

Prints images/s for each and the ratio csgguard / bare (target <= 1.05) per precision,
and whether this CPU runs bf16 natively (``csgguard.devices.bf16_native``).

``--compile`` adds csgguard's trainer with ``train --compile`` (``torch.compile`` of the
step, fixed shapes): its images/s after compilation, the speed-up over the eager trainer
in the same process, and the seconds the first three (compiling) steps took, to set against
the time saved per epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import torch
import torch.nn.functional as F
from _common import command_line


def bare_loop(model, images, labels, steps, batch, amp, channels_last, gen) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    n, seen = len(labels), 0
    t0 = None
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            t0, seen = time.perf_counter(), 0
        idx = torch.randint(0, n, (batch,), generator=gen)
        x = images[idx].float().div_(255.0)
        flip = torch.rand(batch, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        dx, dy = (int(v) for v in torch.randint(0, 9, (2,), generator=gen))
        x = F.pad(x, (4, 4, 4, 4))[:, :, dy:dy + 32, dx:dx + 32]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x).float(), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += batch
    return seen / (time.perf_counter() - t0)


def csgguard_steps(trainer, path, steps) -> float:
    seen, t0 = 0, None
    for i, (x, y, *_) in enumerate(trainer._batches()):
        if i == 2:
            t0, seen = time.perf_counter(), 0
        trainer._set_lr(0.5 + i / 1000)
        if trainer.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, logits = trainer.step(path, x, y)
        float(loss), int((logits.argmax(1) == y).sum())  # the bookkeeping run_epoch does
        seen += len(y)
        if i == steps + 1:
            break
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", required=True, help="CIFAR-10 root, e.g. ../shared/data/cifar10-jpeg")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="also time the compiled trainer (train --compile)")
    ap.add_argument("--precision", choices=["both", "fp32", "bf16"], default="both")
    args = ap.parse_args()

    from csgguard.data import load_dataset
    from csgguard.devices import bf16_native
    from csgguard.models import CSGNet
    from csgguard.train import TrainConfig, Trainer, default_model_config

    ds = load_dataset("cifar10", args.data_root)
    cpu = torch.device("cpu")
    print(f"command: {command_line()}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, native bf16: {bf16_native(cpu)}; CIFAR-10 (JPEG q75 copy), "
          f"ResNet-20, batch {args.batch_size}, {args.steps} timed steps")
    print(f"{'precision':<10}{'bare img/s':>12}{'csgguard STD':>14}{'csgguard CSG':>14}{'STD / bare':>12}{'CSG / bare':>12}")
    amps = {"both": (False, True), "fp32": (False,), "bf16": (True,)}[args.precision]
    compiled_rows = []
    for amp in amps:
        cfg = TrainConfig(data="cifar10", gate=True, amp=amp, batch_size=args.batch_size).resolved()
        torch.manual_seed(0)
        bare = CSGNet(default_model_config(cfg, ds))
        if amp:
            bare = bare.to(memory_format=torch.channels_last)
        bare_ips = bare_loop(bare, ds.train.images, ds.train.labels, args.steps, args.batch_size, amp, amp,
                             torch.Generator().manual_seed(0))
        tr = Trainer(cfg, ds, cpu)
        std_ips = csgguard_steps(tr, "std", args.steps)
        csg_ips = csgguard_steps(tr, "csg", args.steps)
        # ratio of time per image: csgguard / bare (<= 1.05 is the target)
        print(f"{'bf16' if amp else 'fp32':<10}{bare_ips:>12.0f}{std_ips:>14.0f}{csg_ips:>14.0f}"
              f"{bare_ips / std_ips:>12.3f}{bare_ips / csg_ips:>12.3f}")
        if args.compile:
            torch.manual_seed(0)
            tc = Trainer(dataclasses.replace(cfg, compile=True), ds, cpu)
            row = [amp]
            for path, eager_ips in (("std", std_ips), ("csg", csg_ips)):
                t0 = time.perf_counter()
                csgguard_steps(tc, path, 1)  # the first three steps: compilation happens in the first
                warm = time.perf_counter() - t0
                ips = csgguard_steps(tc, path, args.steps)
                row += [ips, ips / eager_ips, warm]
            compiled_rows.append(row)
    if compiled_rows:
        print("\ncompiled trainer (train --compile): images/s after compilation, speed-up over the eager "
              "trainer above, seconds of the first three steps (compiling)")
        print(f"{'precision':<10}{'STD img/s':>11}{'STD x':>8}{'STD warm s':>12}{'CSG img/s':>11}{'CSG x':>8}"
              f"{'CSG warm s':>12}")
        for amp, s_ips, s_x, s_w, c_ips, c_x, c_w in compiled_rows:
            print(f"{'bf16' if amp else 'fp32':<10}{s_ips:>11.0f}{s_x:>8.2f}{s_w:>12.0f}{c_ips:>11.0f}{c_x:>8.2f}"
                  f"{c_w:>12.0f}")


if __name__ == "__main__":
    main()

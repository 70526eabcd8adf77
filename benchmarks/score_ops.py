"""How many tensor operations a screening score launches beside the forward pass, and what they cost
one image at a time.

On a GPU every operation is a kernel launch of a few microseconds whatever its size, so a score of
many small operations costs about as much as a small network's forward pass (docs/scaling.md:
1.34-1.86x on an H200 for the eager screening pass); on a CPU the same shows one image at a time.
This script counts them without a GPU: the top-level ``aten::`` operations that compute (views,
no-op casts and other metadata operations excluded: they launch nothing) of one
``forward_signals`` call and of one ``score_signals`` call of the run's fitted detector, on a
batch of the run's own test images (real images, so that the batch holds every class, as a
screened folder does), and times both eagerly at batch 1 and at ``--batch``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/score_ops.py --run csgguard/pretrained/cifar10-resnet20-csg \
        --data-root ../shared/data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import collections
import platform

import torch
from _common import best_of, command_line

#: operations that only make views, read metadata or return their input unchanged (no kernel)
NO_KERNEL = {"aten::to", "aten::_to_copy_noop", "aten::unsqueeze", "aten::squeeze", "aten::select",
             "aten::slice", "aten::t", "aten::transpose", "aten::diagonal", "aten::detach", "aten::detach_",
             "aten::lift_fresh", "aten::view", "aten::reshape", "aten::expand", "aten::as_strided",
             "aten::alias", "aten::permute", "aten::_unsafe_view", "aten::empty", "aten::resolve_conj",
             "aten::resolve_neg", "aten::contiguous", "aten::item", "aten::_local_scalar_dense"}


def launched(fn) -> collections.Counter:
    """Top-level aten operations of one call of ``fn`` that compute, by name."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ops = collections.Counter()
    for e in prof.events():
        if e.name.startswith("aten::") and e.cpu_parent is None and e.name not in NO_KERNEL:
            ops[e.name] += 1
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="csgguard/pretrained/cifar10-resnet20-csg")
    ap.add_argument("--data-root", default=None, help="the run's data (default: the root its training used)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    from csgguard import load_model
    from csgguard.detectors.store import load_detector
    from csgguard.runs import load_run_dataset

    loaded = load_model(args.run)
    model = loaded.model.eval()
    detector = load_detector(loaded.run_dir, model_sha256=loaded.sha256)
    x = load_run_dataset(loaded, data_root=args.data_root).test.x()[: args.batch]
    print(f"# {command_line()}")
    print(f"# machine: {platform.platform()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"# run {args.run} ({loaded.config.arch}, K={model.num_filters}, {model.num_classes} classes), "
          f"detector {detector.name}")
    with torch.no_grad():
        for b in (1, len(x)):
            xb = x[:b]
            out = model.forward_signals(xb)

            def forward(xb=xb):
                return model.forward_signals(xb)

            def score(out=out):
                return detector.score_signals(out.logits, out.pooled, out.taps)

            forward(), score()  # lazily built arrays, first-call allocations
            f_ops, s_ops = launched(forward), launched(score)
            classes = len(set(out.logits.argmax(1).tolist()))
            t_f = best_of(lambda: [forward() for _ in range(args.repeats)], 3) / args.repeats
            t_s = best_of(lambda: [score() for _ in range(args.repeats)], 3) / args.repeats
            print(f"\nbatch {b} ({classes} predicted classes)")
            print(f"  forward_signals   {sum(f_ops.values()):4d} operations  {t_f * 1e3:8.3f} ms")
            print(f"  score_signals     {sum(s_ops.values()):4d} operations  {t_s * 1e3:8.3f} ms")
            print(f"  score / forward:  operations {sum(s_ops.values()) / sum(f_ops.values()):.2f}, "
                  f"time {t_s / t_f:.3f} (forward + score = {1 + t_s / t_f:.3f}x the forward)")
            print("  score's operations: " + ", ".join(f"{k[6:]} {n}" for k, n in s_ops.most_common()))


if __name__ == "__main__":
    main()

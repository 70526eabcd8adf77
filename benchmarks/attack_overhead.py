"""csgguard's PGD vs calling foolbox's LinfPGD directly: same model, inputs, settings, process.

csgguard adds a clean prediction (to attack only correct inputs), a re-prediction of
the returned images (to confirm each success), the masks and the statistics. This
prints the wall times of both over several interleaved repetitions and the ratio
(target <= 1.05) three ways: the median of the per-repetition ratios, best over best
(least disturbed by other processes on a shared machine) and median over median. Inputs are the correctly classified digits test images, so
both sides attack exactly the same images.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack_overhead.py [--run DIR] [--reps 5]
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/attack_overhead.py --cw      # also the C&W presets

With ``--cw`` it also times the C&W ``fast`` and ``thorough`` presets on 256 images.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=None, help="digits run directory (default: train one, ~15 s)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=512, help="images to attack")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cw", action="store_true", help="also time the C&W presets on 256 images")
    args = ap.parse_args()

    import foolbox as fb

    from csgguard import TrainConfig, load_dataset, load_model, train
    from csgguard.attacks import run

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.run
        if run_dir is None:
            run_dir = Path(tmp) / "run"
            train(TrainConfig(data="digits", epochs=20, seed=0, device=args.device), run_dir, progress=False)
        loaded = load_model(run_dir, args.device)
        model = loaded.model
        dev = torch.device(args.device)
        test = load_dataset("digits").test
        x, y = test.x(), test.labels
        with torch.no_grad():
            correct = model(x.to(dev)).argmax(1).cpu() == y
        x, y = x[correct][: args.n], y[correct][: args.n]
        rel = 2.5 / args.steps
        print(f"device {dev}, model {loaded.config.arch}, {len(x)} correctly classified digits test images, "
              f"Linf PGD eps {args.eps} steps {args.steps} rel_stepsize {rel:.4f}, batch {args.batch_size}")

        fmodel = fb.PyTorchModel(model.eval(), bounds=(0, 1), device=dev)
        attack = fb.attacks.LinfPGD(rel_stepsize=rel, steps=args.steps, random_start=True)

        def direct() -> int:
            torch.manual_seed(0)
            ok = 0
            for s in range(0, len(x), args.batch_size):
                xb, yb = x[s:s + args.batch_size].to(dev), y[s:s + args.batch_size].to(dev)
                _, adv, success = attack(fmodel, xb, yb, epsilons=args.eps)
                ok += int(success.sum())
            return ok

        def ours() -> int:
            a = run(model, x, y, "pgd", eps=args.eps, steps=args.steps, rel_stepsize=rel,
                    batch_size=args.batch_size, seed=0, device=dev, progress=False)
            return a.meta["succeeded"]

        direct(), ours()  # warm-up
        t_fb, t_us = [], []
        for _ in range(args.reps):
            for fn, times in ((direct, t_fb), (ours, t_us)):
                t = time.perf_counter()
                n_ok = fn()
                times.append(time.perf_counter() - t)
        m_fb, m_us = statistics.median(t_fb), statistics.median(t_us)
        print(f"foolbox LinfPGD direct : median {m_fb:.3f} s over {args.reps} reps "
              f"({', '.join(f'{t:.3f}' for t in t_fb)}); successes {direct()}")
        print(f"csgguard attacks.run   : median {m_us:.3f} s over {args.reps} reps "
              f"({', '.join(f'{t:.3f}' for t in t_us)}); successes {n_ok}")
        pairs = statistics.median(u / f for u, f in zip(t_us, t_fb, strict=True))
        print(f"overhead ratio (csgguard / foolbox): median-of-pairs {pairs:.3f}, best-of-reps "
              f"{min(t_us) / min(t_fb):.3f}, median {m_us / m_fb:.3f}  (target <= 1.05)")

        if args.cw:
            x256, y256 = test.x()[:256], test.labels[:256]
            for preset in ("fast", "thorough"):
                a = run(loaded, x256, y256, "cw", preset=preset, device=dev, progress=False)
                m = a.meta
                p = m["perturbation"]
                print(f"C&W {preset:8s}: {m['total']} images, {m['attacked']} attacked, {m['succeeded']} succeeded, "
                      f"success {m['success_rate']:.3f}, median L2 {p['median']:.3f}, max L2 {p['max']:.3f}, "
                      f"{m['seconds']:.1f} s ({m['images_per_second']:.1f} images/s)")


if __name__ == "__main__":
    main()

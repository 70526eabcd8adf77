"""Screening speed: images/second end to end vs a bare forward pass of the same model.

Prints, for one model and one folder of PNGs written by this script:

* decode          -- DataLoader decode only (files -> [0, 1] tensors)
* bare forward    -- ``model(x)`` on the already-decoded tensors
* forward + score -- one ``forward_features`` pass + the detector's score (what screen adds)
* end to end      -- ``csgguard.screening.Screener.rows`` over the files (decode + forward + score)

and the ratio (forward + score) / (bare forward): the detector's overhead, target <= 1.10.
With ``--compile`` also the same two passes through torch.compile (``csgguard screen --compile``:
the bare forward compiled alone, the forward with the score as one graph), at one batch size,
timed in the same process after compiling: compiled scored / compiled bare is the detector's
overhead when both sides are compiled, compiled scored / eager bare what a user gains over the
eager classifier.

    OMP_NUM_THREADS=1 python benchmarks/screen_speed.py                      # trains a digits model
    python benchmarks/screen_speed.py --run runs/mnist --n 5000 --workers 2 --device cuda
    OMP_NUM_THREADS=1 python benchmarks/screen_speed.py --run csgguard/pretrained/cifar10-resnet20-csg \
        --data-root ../shared/data/cifar10-jpeg --compile --skip-end-to-end
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help="run directory with a fitted detector (default: train digits)")
    ap.add_argument("--n", type=int, default=2000, help="images to screen")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data-root", default=None, help="the run's data (default: the root its training used)")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile'd passes")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode for both compiled passes (reduce-overhead: CUDA graphs on a GPU)")
    ap.add_argument("--skip-end-to-end", action="store_true", help="time decoded tensors only (no PNG decoding)")
    args = ap.parse_args()

    from PIL import Image

    from csgguard import TrainConfig, load_dataset, train
    from csgguard.fitting import fit_detector
    from csgguard.images import image_loader
    from csgguard.listing import list_inputs
    from csgguard.screening import Screener

    tmp = Path(tempfile.mkdtemp(prefix="csgguard-speed-"))
    run = args.run
    if run is None:
        run = tmp / "run"
        train(TrainConfig(data="digits", epochs=20), run, progress=False)
    if not (Path(run) / "detector.json").is_file():
        fit_detector(run, device=args.device)
    screener = Screener(run, device=args.device)
    spec, model, dev = screener.spec, screener.loaded.model, screener.device

    data = screener.loaded.manifest.get("dataset", {}).get("name", "digits")
    ds = load_dataset(data, args.data_root or screener.loaded.manifest.get("training", {}).get("data_root"))
    src = ds.test.x()
    folder = tmp / "images"
    folder.mkdir()
    for i in range(args.n):
        arr = (src[i % len(src)].numpy() * 255 + 0.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)).save(folder / f"{i:06d}.png")
    files = list_inputs([folder]).files

    def decode():
        return torch.cat([x for _, x, _, _ in image_loader(files, spec, batch_size=args.batch_size,
                                                          workers=args.workers)])
    x = decode()
    batches = [x[s:s + args.batch_size].to(dev) for s in range(0, len(x), args.batch_size)]

    def over_batches(step):
        """A timed pass: ``step`` on every decoded batch, then wait for the device."""
        @torch.no_grad()
        def run():
            for b in batches:
                step(b)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return run

    bare, scored = over_batches(model), over_batches(screener.score_batch)

    def end_to_end():
        for _ in screener.rows(files, batch_size=args.batch_size, workers=args.workers, progress=False):
            pass

    bare(), scored()  # warm-up
    timings = {"decode": decode, "bare forward": bare, "forward + score": scored}
    if not args.skip_end_to_end:
        timings["end to end"] = end_to_end
    if args.compile:
        from csgguard.compiling import FixedBatch, compile_module

        fast = Screener(run, device=args.device, compile=args.compile_mode)
        fast_net = FixedBatch(compile_module(model, dev, mode=None if args.compile_mode == "default"
                                             else args.compile_mode), args.batch_size)
        bare_compiled, scored_compiled = over_batches(fast_net), over_batches(fast.score_batch)
        t0 = time.perf_counter()
        bare_compiled()
        t1 = time.perf_counter()
        scored_compiled()
        t2 = time.perf_counter()
        print(f"compiling ({args.compile_mode}): bare forward {t1 - t0:.0f} s, forward + score {t2 - t1:.0f} s",
              flush=True)
        timings.update({"bare forward, compiled": bare_compiled, "forward + score, compiled": scored_compiled})
    t = {label: best_of(f, args.repeat) for label, f in timings.items()}
    n = len(x)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"screen speed: {n} images {spec.height}x{spec.width}x{spec.channels}, detector "
          f"{screener.detector.name}, batch {args.batch_size}, workers {args.workers}, device {name} "
          f"({torch.backends.cpu.get_cpu_capability() if dev.type == 'cpu' else 'cuda'}), best of {args.repeat}")
    for label, seconds in t.items():
        print(f"  {label:26s} {n / seconds:12.0f} images/s   ({seconds * 1e3:8.1f} ms)")
    print(f"  detector overhead ratio (forward + score) / bare forward = "
          f"{t['forward + score'] / t['bare forward']:.3f}  (target <= 1.10)")
    if args.compile:
        print(f"  compiled: (forward + score) / bare forward, both compiled = "
              f"{t['forward + score, compiled'] / t['bare forward, compiled']:.3f}  (target <= 1.10)")
        print(f"  compiled (forward + score) / eager bare forward = "
              f"{t['forward + score, compiled'] / t['bare forward']:.3f}; "
              f"eager / compiled (forward + score) = {t['forward + score'] / t['forward + score, compiled']:.2f}x")
    if "end to end" in t:
        print(f"  end to end / bare forward = {t['end to end'] / t['bare forward']:.2f}x the time (decode dominates: "
              f"{t['decode'] / t['end to end']:.0%} of end to end)")
    os.environ.get("KEEP") or __import__("shutil").rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

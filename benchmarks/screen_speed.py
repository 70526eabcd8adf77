"""Screening speed: images/second end to end vs a bare forward pass of the same model.

Prints, for one model and one folder of PNGs written by this script:

* decode          -- DataLoader decode only (files -> [0, 1] tensors)
* bare forward    -- ``model(x)`` on the already-decoded tensors
* forward + score -- one ``forward_features`` pass + the detector's score (what screen adds)
* end to end      -- ``csgguard.screening.Screener.rows`` over the files (decode + forward + score)

and the ratio (forward + score) / (bare forward): the detector's overhead, target <= 1.10.

    OMP_NUM_THREADS=1 python benchmarks/screen_speed.py                      # trains a digits model
    python benchmarks/screen_speed.py --run runs/mnist --n 5000 --workers 2 --device cuda
"""

from __future__ import annotations

import argparse
import os
import tempfile
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
    ds = load_dataset(data, screener.loaded.manifest.get("training", {}).get("data_root"))
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

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def bare():
        for b in batches:
            model(b)
        sync()

    def scored():
        for b in batches:
            screener.score_batch(b)
        sync()

    def end_to_end():
        for _ in screener.rows(files, batch_size=args.batch_size, workers=args.workers, progress=False):
            pass

    bare(), scored()  # warm-up
    t_dec, t_bare, t_score, t_e2e = (best_of(f, args.repeat) for f in (decode, bare, scored, end_to_end))
    n = len(files)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"screen speed: {n} images {spec.height}x{spec.width}x{spec.channels}, detector "
          f"{screener.detector.name}, batch {args.batch_size}, workers {args.workers}, device {name}")
    for label, t in (("decode", t_dec), ("bare forward", t_bare), ("forward + score", t_score),
                     ("end to end", t_e2e)):
        print(f"  {label:16s} {n / t:12.0f} images/s   ({t * 1e3:8.1f} ms)")
    print(f"  detector overhead ratio (forward + score) / bare forward = {t_score / t_bare:.3f}  (target <= 1.10)")
    print(f"  end to end / bare forward = {t_e2e / t_bare:.2f}x the time (decode dominates: "
          f"{t_dec / t_e2e:.0%} of end to end)")
    os.environ.get("KEEP") or __import__("shutil").rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

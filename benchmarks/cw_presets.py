"""How small a perturbation does each C&W setting find? The measurements behind ``CW_PRESETS``.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/cw_presets.py --run csgguard/pretrained/cifar10-resnet20-csg \\
        --data cifar10 --data-root ../shared/data/cifar10-jpeg -n 200 cw cw:preset=thorough deepfool
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cw_presets.py --run runs/mnist-csg --data mnist \\
        --data-root ../shared/data/mnist -n 400 cw cw:initial_const=0.1,stepsize=0.05

Each positional argument is one candidate, ``METHOD[:key=value,...]`` (``cw`` alone is the
preset in force for the data). The images are the *last* N of the seed-0 test order, disjoint
from the ``csgguard evaluate`` harness's. Per candidate: wall time, successes / attacked, the
median L2 of the successful examples (what C&W minimises, and what chose the presets:
docs/attacks.md "C&W presets"), the median top-1 minus top-2 logit margin, and, for
information only, the run's own fitted detector's AUROC against the clean images (the run
needs ``csgguard fit`` first). Results: benchmarks/results/cw-presets.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import command_line


def parse_candidate(text: str) -> tuple[str, dict]:
    method, _, rest = text.partition(":")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value  # a bare word: preset=thorough
    return method, settings


def main() -> None:
    from csgguard import extract_features, load_dataset, load_model
    from csgguard.attacks import run
    from csgguard.detectors.store import load_detector
    from csgguard.metrics import auroc

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("-n", type=int, default=200, help="images: the last N of the seed-0 test order")
    ap.add_argument("candidates", nargs="+")
    args = ap.parse_args()
    print(f"$ {command_line()}\n")
    loaded = load_model(args.run)
    ds = load_dataset(args.data, args.data_root)
    rows = np.sort(np.random.default_rng(0).permutation(len(ds.test))[-args.n:])
    x, y = ds.test.x()[torch.as_tensor(rows)], ds.test.labels[torch.as_tensor(rows)]
    det = load_detector(args.run, model_sha256=loaded.sha256)
    s_clean = det.score_samples(extract_features(loaded.model, x))
    print("| candidate | seconds | success | median L2 | median margin | detector AUROC (information) |")
    print("|---|---|---|---|---|---|")
    for text in args.candidates:
        method, settings = parse_candidate(text)
        t = time.perf_counter()
        adv = run(loaded, x, y, method, seed=0, progress=False, dataset=ds.name, **settings)
        seconds = time.perf_counter() - t
        ok = adv.successful()
        f = extract_features(loaded.model, torch.as_tensor(ok.x_adv))
        keep = f.pred != ok.y
        f = f.subset(np.flatnonzero(keep))
        d = (torch.as_tensor(ok.x_adv) - torch.as_tensor(ok.x)).flatten(1).norm(dim=1).numpy()[keep]
        top = np.sort(f.logits, 1)
        s = det.score_samples(f)
        used = {k: v for k, v in adv.meta["settings"].items() if k in ("binary_search_steps", "steps", "stepsize",
                                                                      "initial_const", "preset")}
        print(f"| {text} {used or ''} | {seconds:.0f} | {int(keep.sum())}/{int(adv.attacked.sum())} | "
              f"{np.median(d):.3f} | {np.median(top[:, -1] - top[:, -2]):.3f} | {auroc(s_clean, s):.3f} |",
              flush=True)


if __name__ == "__main__":
    main()

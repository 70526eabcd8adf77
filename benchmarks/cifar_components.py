"""Why the default fails on CIFAR-10: each component, and tied-covariance Mahalanobis, fitted on the training split.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cifar_components.py [--run DIR] [--data-root DIR]

The H100 CIFAR-10 CSG run (shipped when this ran; now benchmarks/gpu-runs/) and the first
csg-clean default (taps,pattern,margin, sum, one covariance per class); PGD at 2/255 and
8/255 on 500 test images (seed 1); AUROC of that score, of each of its components alone,
of other component sets and of the Mahalanobis baseline, all fitted on 20,000 training
images. Analysis of the first confirmation: it explains the failure, it chose nothing.
(benchmarks/results/cifar10-components.json was measured with the detector then shipped,
fitted on all 45,000 training images: the first row's figures differ slightly.)
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _common import command_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default="benchmarks/gpu-runs/cifar10-resnet20-csg")
    ap.add_argument("--data-root", default="../shared/data/cifar10-jpeg")
    ap.add_argument("--images", type=int, default=500)
    args = ap.parse_args()

    from csgguard import extract_features, load_model
    from csgguard.attacks import run
    from csgguard.detectors import build_detector
    from csgguard.detectors.gate import GateCleanDetector
    from csgguard.metrics import auroc
    from csgguard.runs import load_run_dataset

    print(f"command: {command_line()}")
    m = load_model(args.run)
    ds = load_run_dataset(m, data_root=args.data_root)
    rows = torch.as_tensor(np.random.default_rng(1).permutation(len(ds.test))[: args.images])
    x, y = ds.test.x()[rows], ds.test.labels[rows]
    clean = extract_features(m.model, x)
    n_fit = min(20000, len(ds.train))
    fit = extract_features(m.model, ds.train.x()[:n_fit])
    fit = fit.subset(np.flatnonzero(fit.pred == ds.train.labels.numpy()[:n_fit]))
    val = extract_features(m.model, ds.val.x())
    det = GateCleanDetector(components="taps,pattern,margin", combine="sum", covariance="class").fit(fit)
    det.calibrate(val)
    out = {}
    for eps in (2 / 255, 8 / 255):
        t = time.time()
        adv = run(m, x, y, "pgd", eps=eps, progress=False).successful()
        fa = extract_features(m.model, torch.as_tensor(adv.x_adv))
        fa = fa.subset(np.flatnonzero(fa.pred != adv.y))
        res = {"n": len(fa), "first default csg-clean (train fit)": auroc(det.score_samples(clean), det.score_samples(fa))}
        z_c, z_a = det.statistics(clean), det.statistics(fa)
        for k in z_c:
            res[f"component {k}"] = auroc(z_c[k], z_a[k])
        for comps, comb in (("pattern", "sum"), ("pattern,margin", "sum"), ("taps,pattern,margin", "max")):
            d = GateCleanDetector(components=comps, combine=comb).fit(fit).calibrate(val)
            res[f"{comps} {comb} (train fit)"] = auroc(d.score_samples(clean), d.score_samples(fa))
        maha = build_detector("mahalanobis").fit(fit).calibrate(val)
        res["mahalanobis (train fit)"] = auroc(maha.score_samples(clean), maha.score_samples(fa))
        res["seconds"] = time.time() - t
        out[f"pgd@{round(eps * 255)}/255"] = res
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

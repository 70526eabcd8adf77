"""Per-image cost of each detector relative to one forward pass of the same model.

The gate detectors and the array baselines (Mahalanobis without pre-processing, LID,
KD+BU) read the features of the forward pass that classifies the input, so their
cost is the scoring arithmetic only. Feature squeezing needs one extra forward pass
per squeezer, noise-response one per noisy copy (8); Mahalanobis with input
pre-processing a forward + backward + forward.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detector_cost.py [--images 512] [--repeats 3]

Trains a small digits CSG model (a few seconds) unless --run is given. The gate detectors
score in float32 (csgguard.scores.SCREEN_DTYPE); each is also timed with float64 arithmetic,
in the same process, as the baseline that change is measured against.
"""

from __future__ import annotations

import argparse
import platform
import tempfile

import torch
from _common import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a trained run directory (default: train a digits CSG model)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from csgguard import TrainConfig, extract_features, load_dataset, load_model, train
    from csgguard import scores as S
    from csgguard.attacks import run as attack
    from csgguard.detectors import build_detector

    run = args.run
    if run is None:
        run = tempfile.mkdtemp(prefix="csg_cost_")
        train(TrainConfig(data="digits", epochs=20, seed=0), run, progress=False)
    loaded = load_model(run)
    model = loaded.model.eval()
    ds = load_dataset(loaded.manifest["training"].get("data", "digits"), loaded.manifest["training"].get("data_root"))
    x = ds.test.x()[: args.images]
    n = len(x)
    fit_x, cal_x = ds.val.x(), ds.train.x()[:300]
    fit = extract_features(model, fit_x)
    adv_set = attack(model, fit_x, ds.val.labels, method="fgsm", progress=False)
    adv = extract_features(model, torch.as_tensor(adv_set.x_adv[adv_set.success]))
    cal = extract_features(model, cal_x)

    forward = best_of(lambda: extract_features(model, x), args.repeats)
    feats = extract_features(model, x)
    print(f"machine: {platform.platform()}, torch threads {torch.get_num_threads()}, model {loaded.config.arch} "
          f"K={model.num_filters}, {n} images, best of {args.repeats}")
    print(f"forward pass: {forward / n * 1e6:9.1f} us/image (ratio 1.00 by definition)\n")
    print(f"{'detector':<28}{'extra passes':>13}{'us/image':>11}{'ratio vs forward':>18}{'total ratio':>13}")
    specs = [("csg-clean", {}), ("csg-supervised", {}), ("mahalanobis", {}), ("mahalanobis", {"noise": 0.01}),
             ("lid", {}), ("kd-bu", {}), ("feature-squeezing", {}),
             # the screening cost does not depend on how many attacked images trained the heads
             ("csg-robust", {"limit": 200, "rounds": 1}), ("union", {}),
             ("union", {"part_params": {"feature-squeezing": {"bits": 0, "median": [2]}}}),
             ("noise-response", {}), ("union", {"parts": "csg-clean,noise-response"}),
             ("union", {"parts": "csg-clean,noise-response,feature-squeezing"})]
    copies = build_detector("noise-response").copies  # the default bank's extra forward passes
    for name, params in specs:
        det = build_detector(name, **params)
        if hasattr(det, "bind_model"):
            det.bind_model(model)
        det.fit(fit, adv if det.supervised else None, inputs=fit_x)
        det.calibrate(cal, inputs=cal_x)
        inputs = x if det.needs_inputs else None
        light = "part_params" in params  # the union with the 2x2 median alone as its squeezing part
        noisy_union = "noise-response" in params.get("parts", "")
        with_squeezing = "feature-squeezing" in params.get("parts", "")
        extra = {"feature-squeezing": "3 fwd", "noise-response": f"{copies} fwd",
                 "union": f"{copies + 3 * with_squeezing} fwd" if noisy_union else "1 fwd" if light else "3 fwd",
                 "mahalanobis": "fwd+bwd+fwd" if params else "0"}.get(name, "0")
        label = (name + (f" noise={params['noise']}" if "noise" in params else "") + (" (median 2x2)" if light else "")
                 + (" (+noise" + (", +squeezing)" if with_squeezing else ")") if noisy_union else ""))
        arithmetic = [("", S.SCREEN_DTYPE)] + ([(" (float64)", torch.float64)] if name.startswith("csg-") else [])
        for suffix, dtype in arithmetic:
            shipped, S.SCREEN_DTYPE = S.SCREEN_DTYPE, dtype
            try:
                t = best_of(lambda det=det, inputs=inputs: det.score_samples(feats, inputs=inputs), args.repeats)
            finally:
                S.SCREEN_DTYPE = shipped
            print(f"{label + suffix:<28}{extra:>13}{t / n * 1e6:>11.1f}{t / forward:>18.2f}"
                  f"{(t + forward) / forward:>13.2f}")


if __name__ == "__main__":
    main()

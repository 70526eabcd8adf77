"""Detection under the strongest adaptive attack: csg-clean vs csg-robust (vs baselines), CSG and STD models.

Per run (a trained model; its dataset is read from the manifest), with disjoint splits:

* detectors are fitted on the first ``--fit`` correctly classified *train* images (csg-robust
  also attacks them, against itself), calibrated on every clean *val* image (at most
  ``--cal``) for a 5% false-positive rate, and measured on the first ``--images`` *test* images;
* clean FPR on the test images at that threshold; clean accuracy of the model;
* non-adaptive detection: plain PGD (foolbox, 40 steps) at every budget of ``--eps``,
  detection rate = share of the successful adversarial examples flagged;
* adaptive: :func:`csgguard.adaptive.adaptive_attack` with its default (strongest) setting
  against *each* detector's own differentiable score at its threshold, at every budget of
  ``--adaptive-eps``; detection rate among the successful examples and evasion rate
  (successful and not flagged / attacked); the smallest swept budget at which the evasion
  rate reaches 50% ("budget@50%"; "> max" when none does);
* csg-robust's training time and every detector's screening cost: (forward + score) / forward,
  best of 7, on the first ``--cost-images`` test images.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adaptive.py --runs runs/digits-csg runs/digits-std \\
        --json /tmp/adaptive-digits.json
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/adaptive.py --runs runs/mnist-csg runs/mnist-std \\
        --data-root /work/shared/data/mnist --images 100 --fit 2000 --adaptive-eps 0.1 \\
        --robust-params '{"limit": 1000}' --json /tmp/adaptive-mnist.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from _common import best_of, command_line

DEFAULT_DETECTORS = "csg-clean,csg-robust,mahalanobis"


def _rate(flags: np.ndarray) -> float | None:
    return float(np.mean(flags)) if len(flags) else None


def bench_run(run: str, args) -> dict:
    from csgguard import extract_features, load_dataset, load_model
    from csgguard.adaptive import adaptive_attack
    from csgguard.attacks import run as run_attack
    from csgguard.attacks.defaults import default_sweep
    from csgguard.detectors import build_detector

    loaded = load_model(run, "cpu")
    model = loaded.model.eval()
    training = loaded.manifest.get("training") or {}
    data = training.get("data") or (loaded.manifest.get("dataset") or {}).get("name") or "digits"
    ds = load_dataset(data, args.data_root or training.get("data_root"),
                      seed=int((loaded.manifest.get("dataset") or {}).get("split_seed", 0)))
    train = ds.train.subset(np.arange(min(args.fit, len(ds.train))))
    f_train = extract_features(model, train.x())
    keep = np.flatnonzero(f_train.pred == train.labels.numpy())
    fit, x_fit = f_train.subset(keep), train.x()[keep]
    val = ds.val.subset(np.arange(min(args.cal, len(ds.val))))
    cal = extract_features(model, val.x())
    test = ds.test.subset(np.arange(min(args.images, len(ds.test))))
    x, y = test.x(), test.labels
    f_test = extract_features(model, x)
    shape = tuple(x.shape[1:])
    from csgguard.sweep import parse_budget_list  # fractions such as 8/255 accepted

    eps_list = list(parse_budget_list(args.eps, "--eps")) if args.eps else list(default_sweep("linf", data, shape))
    adaptive_eps = list(parse_budget_list(args.adaptive_eps, "--adaptive-eps")) if args.adaptive_eps else eps_list
    out = {"run": run, "dataset": data, "gated": model.gate is not None, "fit": len(fit), "calibration": len(cal),
           "test": len(x), "accuracy": float(np.mean(f_test.pred == y.numpy())), "detectors": {}}
    print(f"\n## {run} ({data}, {'CSG' if model.gate is not None else 'STD'}): fit {len(fit)}, "
          f"calibration {len(cal)}, test {len(x)}, clean accuracy {out['accuracy']:.4f}", flush=True)

    pgd = {}
    for e in eps_list:
        adv = run_attack(model, x, y, "pgd", eps=e, progress=False, seed=args.seed)
        ok = np.flatnonzero(adv.success)
        pgd[e] = (extract_features(model, torch.as_tensor(adv.x_adv[ok])), int(adv.attacked.sum()))
    fit_adv = None
    params = json.loads(args.robust_params) if args.robust_params else {}
    x_cost = ds.test.x()[:args.cost_images]  # more images than --images: the fixed per-call overheads amortised
    f_cost = extract_features(model, x_cost)
    forward = best_of(lambda: extract_features(model, x_cost), 7)
    for name in args.detectors.split(","):
        det = build_detector(name, **(params if name == "csg-robust" else {}))
        if hasattr(det, "bind_model"):
            det.bind_model(model)
        t = time.perf_counter()
        if det.supervised:
            if fit_adv is None:  # fgsm + pgd at every budget on the fit images, as `csgguard fit` does
                parts = []
                for i, e in enumerate(eps_list):
                    for m in ("fgsm", "pgd"):
                        a = run_attack(model, x_fit, fit.pred, m, eps=e, progress=False, seed=args.seed + i)
                        parts.append(extract_features(model, torch.as_tensor(a.x_adv[a.success])))
                from csgguard.features import Features

                fit_adv = Features.concat(parts)
            det.fit(fit, fit_adv)
        else:
            det.fit(fit, inputs=x_fit)
        train_s = time.perf_counter() - t
        det.calibrate(cal)
        thr = det.threshold_
        score = best_of(lambda det=det: det.score_samples(f_cost), 7)
        row = {"threshold": float(thr), "train_seconds": round(train_s, 2),
               "clean_fpr_test": float(np.mean(det.score_samples(f_test) > thr)),
               "cost_ratio": round((forward + score) / forward, 3),
               "pgd": {str(e): _rate(det.score_samples(fa) > thr) for e, (fa, _) in pgd.items()},
               "pgd_success": {str(e): len(fa) / max(n, 1) for e, (fa, n) in pgd.items()},
               "adaptive": {}}
        if name == "csg-robust":
            row["history"] = det.history_
        line = (f"{name:<15} fpr {row['clean_fpr_test']:.3f}  train {train_s:7.1f}s  cost x{row['cost_ratio']:.3f}  "
                "pgd " + " ".join(f"{e:g}:{row['pgd'][str(e)]:.3f}" for e in eps_list))
        print(line, flush=True)
        if not hasattr(det, "torch_score"):
            print(f"{'':<15} adaptive: n/a (no differentiable score)", flush=True)
            out["detectors"][name] = row
            continue
        scale = float(np.std(det.calibration_scores_)) or 1.0
        for e in adaptive_eps:
            t = time.perf_counter()
            adv = adaptive_attack(model, x, y, det, eps=e, threshold=thr, scale=scale, seed=args.seed)
            ok = np.flatnonzero(adv.success)
            s = det.score_samples(extract_features(model, torch.as_tensor(adv.x_adv[ok])))
            attacked = int(adv.attacked.sum())
            r = {"success": len(ok) / max(attacked, 1), "detection": _rate(s > thr),
                 "evasion": float(np.sum(s <= thr) / max(attacked, 1)), "best_by_form": adv.meta["best_by_form"],
                 "seconds": round(time.perf_counter() - t, 1)}
            row["adaptive"][str(e)] = r
            print(f"{'':<15} adaptive@{e:g}: success {r['success']:.3f}  detection {r['detection'] or 0:.3f}  "
                  f"evasion {r['evasion']:.3f}  ({r['seconds']}s, best by {r['best_by_form']})", flush=True)
        reached = [e for e in sorted(adaptive_eps) if row["adaptive"][str(e)]["evasion"] >= 0.5]
        row["budget_50"] = reached[0] if reached else None
        print(f"{'':<15} budget for 50% evasion: {reached[0] if reached else f'> {max(adaptive_eps):g}'}", flush=True)
        out["detectors"][name] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=["runs/digits-csg", "runs/digits-std"])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--detectors", default=DEFAULT_DETECTORS)
    ap.add_argument("--images", type=int, default=300, help="test images (the first N of the test split)")
    ap.add_argument("--fit", type=int, default=2000, help="train images the detectors are fitted on (first N)")
    ap.add_argument("--cost-images", type=int, default=1000, help="test images the screening cost is timed on")
    ap.add_argument("--cal", type=int, default=1000, help="val images the threshold is calibrated on (first N)")
    ap.add_argument("--eps", default=None, help="PGD budgets (default: the dataset's Linf sweep)")
    ap.add_argument("--adaptive-eps", default=None, help="adaptive budgets (default: --eps)")
    ap.add_argument("--robust-params", default=None, help="JSON settings of csg-robust, e.g. '{\"rounds\": 3}'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    print(f"# {command_line()}")
    results = [bench_run(r, args) for r in args.runs]
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command_line(), "results": results}, indent=1))


if __name__ == "__main__":
    main()

"""Which clean-only gate score should ``csg-clean`` use? A study on the MNIST benchmark models.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_variants_mnist.py \
        --data-root /work/shared/data/mnist [--csg runs/benchmark/mnist/csg --std runs/benchmark/mnist/std]

Protocol (the one of ``csgguard evaluate``, docs/evaluation.md):

* splits: ``csgguard.evaluate.make_splits`` on the test split, ``--limit 3000``, seed 0:
  fit / calibration / evaluation thirds;
* every variant is fitted on the clean *fit* features only (attack-agnostic), its
  threshold is the 95% quantile of its clean *calibration* scores;
* negatives: all clean *evaluation* images; positives: the successful FGSM / PGD (Linf
  eps 0.1), C&W-L2 (preset fast) and DeepFool-L2 examples of the correctly classified
  evaluation images (``csgguard.attacks.run``, seed 0), kept only when the model really
  mispredicts them;
* the adversarial examples are made once and cached (``--cache``, default
  ``runs/study/gate_variants_mnist``, csgguard adversarial-set files); every variant
  reads the same ones.

Each cell: AUROC / TPR at the calibrated 5%-FPR threshold. The rule for the default,
fixed before looking at the numbers: the best *worst-case* AUROC over the four attacks
on the CSG model (ties within 0.002 broken by the STD model's worst case).
The models are only read (never written).
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

ATTACKS = ("fgsm", "pgd", "cw", "deepfool")
ATTACK_KW = {"fgsm": {"eps": 0.1}, "pgd": {"eps": 0.1}, "cw": {"preset": "fast"}, "deepfool": {}}


def _command() -> str:
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + shlex.join([str(exe), *sys.argv])


def load_study(args, log=print) -> dict[str, dict]:
    """Per model: features of the three splits and of every cached attack's successful examples."""
    from csgguard import extract_features, load_dataset, load_model
    from csgguard.attacks import load_adversarial_set, run, save_adversarial_set
    from csgguard.evaluate import make_splits

    ds = load_dataset("mnist", args.data_root)
    test = ds.test
    splits = make_splits(len(test), args.seed, args.limit)
    x_all, y_all = test.x(), test.labels.numpy()
    out = {}
    for label, run_dir in (("CSG", args.csg), ("STD", args.std)):
        loaded = load_model(run_dir, "cpu")
        model = loaded.model.eval()
        data = {k: (x_all[torch.as_tensor(p)], y_all[p]) for k, p in splits.items()}
        feats = {k: extract_features(model, x) for k, (x, _) in data.items()}
        adv = {}
        for a in ATTACKS:
            path = Path(args.cache) / label.lower() / f"{a}.npz"
            if path.is_file():
                s = load_adversarial_set(path)
                if s.meta.get("model_sha256") not in (None, loaded.sha256):
                    raise SystemExit(f"{path}: cached for another model; delete it")
            else:
                t = time.perf_counter()
                x, y = data["evaluation"]
                s = run(loaded, x, torch.as_tensor(y), a, seed=args.seed, progress=False, dataset="mnist",
                        **ATTACK_KW[a])
                save_adversarial_set(path, s)
                log(f"  {label} {a}: {time.perf_counter() - t:.0f} s -> {path}")
            ok = np.flatnonzero(s.success & s.attacked)
            f = extract_features(model, torch.as_tensor(s.x_adv[ok]))
            keep = np.flatnonzero(f.pred != s.y[ok])
            adv[a] = f.subset(keep)
        out[label] = {"loaded": loaded, "feats": feats, "adv": adv, "labels": {k: v[1] for k, v in data.items()}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--csg", default="runs/benchmark/mnist/csg")
    ap.add_argument("--std", default="runs/benchmark/mnist/std")
    ap.add_argument("--cache", default="runs/study/gate_variants_mnist")
    ap.add_argument("--limit", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--cache-only", action="store_true", help="make the adversarial sets and stop")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    study = load_study(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.cache_only:
        return
    del t0, platform


if __name__ == "__main__":
    main()

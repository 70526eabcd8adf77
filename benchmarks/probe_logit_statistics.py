"""Probe: does any statistic of the logit vector see CIFAR-10 PGD at 2/255-4/255?

Recorded, not shipped. Every component of csg-clean is near chance at 2/255 on CIFAR-10;
this checks the one part of the forward pass that the detector reads only through the
top-2 margin. Clean-only statistics, fitted on the first 20,000 training images of a
development model (the H100-trained pair), scored against the cached adversarial sets
of the development grid (the last 1,000 images of the seed-0 test order, made by
``benchmarks/detector_variants.py cifar10 ... --test-rows tail``). Prints AUROC per cell.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_logit_statistics.py CSG [CIFAR_ROOT]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from _common import print_table, probe_parser

from csgguard import extract_features, load_dataset, load_model
from csgguard.attacks.advset import load_adversarial_set
from csgguard.metrics import auroc
from csgguard.scores import class_means, shrunk_precision

CELLS = ("pgd@0.007843", "pgd@0.01569", "pgd@0.03137", "bim@0.007843", "fgsm@0.007843", "fgsm@0.03137",
         "cw", "deepfool")


def logit_profile(logits: np.ndarray) -> dict[str, np.ndarray]:
    """The raw logit vector, its sorted profile, log-sum-exp, entropy, runner-up class."""
    z = np.asarray(logits, dtype=np.float64)
    t = torch.from_numpy(z)
    return {"logits": z, "sorted": -np.sort(-z, 1), "lse": torch.logsumexp(t, 1).numpy(),
            "entropy": -(torch.softmax(t, 1) * torch.log_softmax(t, 1)).sum(1).numpy(),
            "pred": z.argmax(1), "runner_up": np.argsort(-z, 1)[:, 1]}


class LogitProbe:
    """Clean statistics of the logit profile, per predicted class where it has a class."""

    def __init__(self, fit_logits: np.ndarray, num_classes: int) -> None:
        f = logit_profile(fit_logits)
        p = f["pred"]
        self.mu = class_means(f["logits"], p, num_classes)
        self.prec = shrunk_precision(f["logits"] - self.mu[p])
        self.mu_sorted = class_means(f["sorted"], p, num_classes)
        self.prec_sorted = shrunk_precision(f["sorted"] - self.mu_sorted[p])
        self.med = {k: float(np.median(f[k])) for k in ("lse", "entropy")}
        self.med_top1 = float(np.median(f["sorted"][:, 0]))
        co = np.ones((num_classes, num_classes))
        np.add.at(co, (p, f["runner_up"]), 1.0)
        self.co = co / co.sum(1, keepdims=True)

    def scores(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        f = logit_profile(logits)
        p = f["pred"]
        r = f["logits"] - self.mu[p]
        rs = f["sorted"] - self.mu_sorted[p]
        return {"logit Mahalanobis": np.einsum("ij,jk,ik->i", r, self.prec, r),
                "sorted-logit Mahalanobis": np.einsum("ij,jk,ik->i", rs, self.prec_sorted, rs),
                "log-sum-exp (two-sided)": np.abs(f["lse"] - self.med["lse"]),
                "entropy (two-sided)": np.abs(f["entropy"] - self.med["entropy"]),
                "top-1 logit (two-sided)": np.abs(f["sorted"][:, 0] - self.med_top1),
                "runner-up rarity": -np.log(self.co[p, f["runner_up"]])}


def main() -> None:
    ap = probe_parser(__doc__)
    args = ap.parse_args()

    loaded = load_model(Path(args.runs) / f"cifar10-resnet20-{args.model.lower()}")
    model = loaded.model.eval()
    ds = load_dataset("cifar10", args.data_root)
    train = ds.train.subset(np.arange(min(20000, len(ds.train))))
    f = extract_features(model, train.x())
    probe = LogitProbe(f.logits[f.pred == train.labels.numpy()], ds.num_classes)
    rows = np.sort(np.random.default_rng(0).permutation(len(ds.test))[-1000:])
    clean = probe.scores(extract_features(model, ds.test.x()[torch.as_tensor(rows)]).logits)
    table: dict[str, list[float]] = {k: [] for k in clean}
    for cell in CELLS:
        adv = load_adversarial_set(Path(args.cache) / f"{args.model}-{cell}.npz").successful()
        fa = extract_features(model, torch.as_tensor(adv.x_adv))
        s = probe.scores(fa.logits[fa.pred != adv.y])
        for k in clean:
            table[k].append(auroc(clean[k], s[k]))
    title = f"logit-statistics probe, {args.model} development model, CIFAR-10 (JPEG q75 copy), 1,000 clean images"
    print_table(title, CELLS, table)


if __name__ == "__main__":
    main()

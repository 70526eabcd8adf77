"""Probe: does the CSG gate's own classifier see CIFAR-10 attacks the ungated logits miss?

Recorded, not shipped. A CSG model carries two classifiers on one pooled vector ``a``: the
ungated logits ``z = W a + b`` it predicts with, and for each class ``c`` the logit with only
``c``'s gate column open, ``g_c = sum_k W[c, k] G[k, c] a_k + b_c`` (the path the gate was
trained on). An attack that moves ``z`` from class y to c need not move ``g`` the same way:
it may raise ``z_c`` through filters the gate keeps closed for c. None of csg-clean's
components reads ``g``. This fits clean-only statistics of it per predicted class on
correctly classified training images of the development pair (the H100-trained
``benchmarks/gpu-runs/cifar10-resnet20-{csg,std}``; the STD twin through a pseudo-gate of
its class means, the gate ``mismatch`` uses), attacks the last ``--images`` images of the
seed-0 test order itself (no cache needed), and prints AUROC (clean test images against
successful attacks) per statistic, read upward (an AUROC under 0.5 is the statistic read
downward: 1 - AUROC) and two-sided (|z|), beside csg-clean fitted on the same clean images.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_gated_logits.py CSG [CIFAR_ROOT] --images 400
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from _common import command_line, correct_training_images, print_table, probe_parser

from csgguard import extract_features, load_dataset, load_model
from csgguard.attacks import run as attack
from csgguard.detectors import build_detector
from csgguard.metrics import auroc
from csgguard.scores import class_means, pseudo_gate, shrunk_precision

CELLS = (("fgsm", 2 / 255), ("fgsm", 8 / 255), ("pgd", 2 / 255), ("pgd", 4 / 255), ("pgd", 8 / 255),
         ("deepfool", None))


def gated_logits(feats, gate: np.ndarray) -> np.ndarray:
    """(N, C): each class's logit with only its gate column open."""
    return np.asarray(feats.pooled, np.float64) @ (feats.fc_weight.T.astype(np.float64) * gate) + feats.fc_bias


def raw_statistics(feats, gate: np.ndarray) -> dict[str, np.ndarray]:
    """Per-input statistics of the gated classifier, before standardisation."""
    z = np.asarray(feats.logits, np.float64)
    g = gated_logits(feats, gate)
    pred = z.argmax(1)
    rows = np.arange(len(z))
    others = g.copy()
    others[rows, pred] = -np.inf
    gl = torch.log_softmax(torch.from_numpy(g), 1).numpy()
    zl = torch.log_softmax(torch.from_numpy(z), 1).numpy()
    top2 = -np.sort(-z, 1)[:, :2]
    return {"closed-filter share of the predicted logit": z[rows, pred] - g[rows, pred],
            "gated margin of the predicted class": g[rows, pred] - others.max(1),
            "gated log-probability of the predicted class": gl[rows, pred],
            "gated classifier disagrees": (g.argmax(1) != pred).astype(np.float64),
            # the same two statistics of the ungated logits: what the gate adds is the difference
            "ungated margin (no gate, for comparison)": top2[:, 0] - top2[:, 1],
            "ungated log-probability (no gate, for comparison)": zl[rows, pred]}


class GatedProbe:
    """Per-predicted-class clean means / standard deviations of each statistic, and a tied
    class-conditional Mahalanobis distance of the whole gated-logit vector."""

    def __init__(self, feats, gate: np.ndarray, num_classes: int) -> None:
        self.gate, pred = gate, feats.pred
        raw = raw_statistics(feats, gate)
        self.mean = {k: class_means(v[:, None], pred, num_classes)[:, 0] for k, v in raw.items()}
        self.std = {k: np.maximum(np.array([v[pred == c].std() if np.sum(pred == c) > 1 else v.std()
                                            for c in range(num_classes)]), 1e-6) for k, v in raw.items()}
        g = gated_logits(feats, gate)
        self.mu = class_means(g, pred, num_classes)
        self.prec = shrunk_precision(g - self.mu[pred])

    def scores(self, feats) -> dict[str, np.ndarray]:
        pred = feats.pred
        out = {}
        for k, v in raw_statistics(feats, self.gate).items():
            z = (v - self.mean[k][pred]) / self.std[k][pred]
            out[f"{k} (up)"] = z
            if k != "gated classifier disagrees":  # a 0/1 statistic has no second side
                out[f"{k} (two-sided)"] = np.abs(z)
        r = gated_logits(feats, self.gate) - self.mu[pred]
        out["gated-logit Mahalanobis"] = np.einsum("ij,jk,ik->i", r, self.prec, r)
        return out


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--images", type=int, default=400, help="test images attacked (the last of the seed-0 order)")
    ap.add_argument("--fit", type=int, default=10000, help="training images the clean statistics come from")
    args = ap.parse_args()
    t0 = time.perf_counter()

    loaded = load_model(Path(args.runs) / f"cifar10-resnet20-{args.model.lower()}")
    model = loaded.model.eval()
    ds = load_dataset("cifar10", args.data_root)
    _, fit = correct_training_images(model, ds, args.fit)
    gate = fit.gate if fit.gate is not None else pseudo_gate(fit.pooled, fit.pred, ds.num_classes)
    probe = GatedProbe(fit, gate, ds.num_classes)
    detector = build_detector("csg-clean").fit(fit)

    rows = np.sort(np.random.default_rng(0).permutation(len(ds.test))[-args.images:])
    x, y = ds.test.x()[torch.as_tensor(rows)], ds.test.labels[torch.as_tensor(rows)]
    clean_f = extract_features(model, x)
    clean = {**probe.scores(clean_f), "csg-clean (reference)": detector.score_samples(clean_f)}
    table: dict[str, list[float]] = {k: [] for k in clean}
    columns = []
    for method, eps in CELLS:
        adv = attack(loaded, x, y, method=method, eps=eps, progress=False).successful()
        fa = extract_features(model, torch.as_tensor(adv.x_adv))
        s = {**probe.scores(fa), "csg-clean (reference)": detector.score_samples(fa)}
        columns.append(f"{method}@{eps * 255:.0f}/255 (n={len(adv)})" if eps else f"{method} (n={len(adv)})")
        for k in clean:
            table[k].append(auroc(clean[k], s[k]))
    print(f"<!-- {command_line()} -->")
    print_table(f"gated-logit probe, {args.model} development model, CIFAR-10 (JPEG q75 copy), "
                f"{args.images} test images, statistics from {len(fit)} training images, "
                f"{time.perf_counter() - t0:.0f} s", columns, table)


if __name__ == "__main__":
    main()

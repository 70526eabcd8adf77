"""Probe: does an earlier layer *vote* for another class than the prediction (CIFAR-10)?

Recorded, not shipped. csg-clean reads each earlier layer (its taps: channel means of the
stem and stage outputs) as a distance to the *predicted* class's clean mean. An input pushed
from class y into class c may keep y's evidence in the layers before the decision: the layer
then sits nearer another class's mean than the predicted one's. Candidates, each clean-only
(Ledoit-Wolf tied covariance, fitted on correctly classified training images):

* ``vote gap <layer>``: d(pred) - min_c d(c), squared Mahalanobis distances to the class means
  of one layer (0 when the layer agrees with the prediction);
* ``vote gap joint``: the same over all taps together;
* ``knn disagreement <layer>``: among the k nearest clean fit images (whitened space), the
  share whose label is not the prediction (Deep k-NN, Papernot & McDaniel 2018, simplified);
* ``knn disagreement sum``: summed over the layers;
* reference: ``csg-clean`` (the shipped default, fitted on the same images, threshold-free AUROC).

Attacks are made here (seed 0) on the last ``--limit`` images of the seed-0 test order
(disjoint from the harness's first 3,000), successful ones only.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_layer_votes.py \\
        --run csgguard/pretrained/cifar10-resnet20-csg --data-root ../shared/data/cifar10-jpeg
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import command_line, print_table

from csgguard import extract_features, load_dataset, load_model
from csgguard.attacks import load_adversarial_set, save_adversarial_set
from csgguard.attacks import run as run_attack
from csgguard.detectors import build_detector
from csgguard.metrics import auroc
from csgguard.scores import class_means, layer_vote_logodds, shrunk_precision

CELLS = (("fgsm@2/255", "fgsm", {"eps": 2 / 255}), ("fgsm@8/255", "fgsm", {"eps": 8 / 255}),
         ("pgd@2/255", "pgd", {"eps": 2 / 255}), ("pgd@4/255", "pgd", {"eps": 4 / 255}),
         ("pgd@8/255", "pgd", {"eps": 8 / 255}), ("cw", "cw", {"preset": "fast"}), ("deepfool", "deepfool", {}))


class Layer:
    """One layer's clean class means, tied whitening and k-NN reference set."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, num_classes: int, k: int, ref: int):
        self.mu = class_means(x, labels, num_classes)
        prec = shrunk_precision(x - self.mu[labels])
        self.prec = prec
        w, v = np.linalg.eigh(prec)
        self.white = v * np.sqrt(np.clip(w, 0, None))      # x @ white: whitened coordinates
        rows = np.random.default_rng(0).permutation(len(x))[:ref]
        self.ref = torch.as_tensor(x[rows] @ self.white)
        self.ref_labels = torch.as_tensor(labels[rows])
        self.mu_w = self.mu @ self.white
        self.k = k

    def vote_gap(self, x: np.ndarray, pred: np.ndarray) -> np.ndarray:
        z = x @ self.white
        d = ((z[:, None, :] - self.mu_w[None]) ** 2).sum(-1)   # (N, C)
        return d[np.arange(len(x)), pred] - d.min(1)

    def lda_surprise(self, x: np.ndarray, pred: np.ndarray) -> np.ndarray:
        """-log p(pred | layer) under the layer's tied-covariance Gaussian classes (equal priors): the
        softplus of csg-clean's ``votes`` statistic (csgguard.scores.layer_vote_logodds), not a copy."""
        odds = layer_vote_logodds(torch.as_tensor(x), torch.as_tensor(pred), torch.as_tensor(self.mu),
                                  torch.as_tensor(self.prec))
        return torch.nn.functional.softplus(odds).numpy()

    def knn(self, x: np.ndarray, pred: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        z = torch.as_tensor(x @ self.white)
        d = torch.cdist(z, self.ref)
        idx = d.topk(self.k + int(exclude_self), largest=False).indices[:, int(exclude_self):]
        return (self.ref_labels[idx] != torch.as_tensor(pred)[:, None]).double().mean(1).numpy()


def stats(layers: dict[str, Layer], f, det) -> dict[str, np.ndarray]:
    pred = f.pred
    arrays = {"tap0": f.taps[0], "tap1": f.taps[1], "tap2": f.taps[2], "pooled": f.pooled}
    arrays["joint taps"] = np.concatenate(f.taps, 1)
    out = {"csg-clean (reference)": det.score_samples(f)}
    knn_sum = 0
    for name, layer in layers.items():
        out[f"vote gap {name}"] = layer.vote_gap(arrays[name], pred)
        out[f"lda surprise {name}"] = layer.lda_surprise(arrays[name], pred)
        kn = layer.knn(arrays[name], pred)
        out[f"knn disagreement {name}"] = kn
        if name != "joint taps":
            knn_sum = knn_sum + kn
    out["knn disagreement sum"] = knn_sum
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--data-root", default="../shared/data/cifar10-jpeg")
    ap.add_argument("--fit", type=int, default=10000, help="training images the statistics are fitted on")
    ap.add_argument("--limit", type=int, default=500, help="test images attacked (tail of the seed-0 order)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--cache", default="runs/probe/cache", help="adversarial sets, made once")
    ap.add_argument("--ref", type=int, default=10000, help="k-NN reference images (of the fit images)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    loaded = load_model(args.run)
    ds = load_dataset("cifar10", args.data_root)
    train = ds.train.subset(np.arange(args.fit))
    ft = extract_features(loaded.model, train.x())
    keep = np.flatnonzero(ft.pred == train.labels.numpy())
    fit = ft.subset(keep)
    labels = fit.pred
    c = fit.num_classes
    layers = {name: Layer(a, labels, c, args.k, args.ref) for name, a in
              {"tap0": fit.taps[0], "tap1": fit.taps[1], "tap2": fit.taps[2], "pooled": fit.pooled,
               "joint taps": np.concatenate(fit.taps, 1)}.items()}
    det = build_detector("csg-clean").fit(fit)
    perm = np.random.default_rng(0).permutation(len(ds.test))
    rows = torch.as_tensor(np.sort(perm[-args.limit:]))
    x, y = ds.test.x()[rows], ds.test.labels[rows]
    val = stats(layers, extract_features(loaded.model, ds.val.x()), det)

    def combos(st: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """csg-clean plus one vote statistic, each as its clean surprise on the validation images, summed."""
        def surprise(k):
            ref = np.sort(val[k])
            return -np.log1p(-np.searchsorted(ref, st[k], side="right") / (len(ref) + 1))
        base = surprise("csg-clean (reference)")
        return {**st, **{f"csg-clean + {k}": base + surprise(k) for k in
                         ("lda surprise joint taps", "vote gap joint taps", "knn disagreement joint taps",
                          "lda surprise tap2")}}

    clean = combos(stats(layers, extract_features(loaded.model, x), det))
    table: dict[str, list[float]] = {k: [] for k in clean}
    originals: dict[str, list[float]] = {k: [] for k in clean}
    cache = Path(args.cache) / Path(args.run).name
    cache.mkdir(parents=True, exist_ok=True)
    for cname, method, kw in CELLS:
        path = cache / f"{cname.replace('/', '_')}-{args.limit}.npz"
        if path.is_file():
            adv = load_adversarial_set(path)
        else:
            adv = run_attack(loaded, x, y, method, seed=0, progress=False, dataset="cifar10", **kw)
            save_adversarial_set(path, adv)
        adv = adv.successful()
        fa = extract_features(loaded.model, torch.as_tensor(adv.x_adv))
        ok = np.flatnonzero(fa.pred != adv.y)
        s = combos(stats(layers, fa.subset(ok), det))
        # the same statistic on the clean originals of those images: how much of the AUROC is which
        # images an attack succeeds on (selection), not what the perturbation did
        so = combos(stats(layers, extract_features(loaded.model, torch.as_tensor(adv.x[ok])), det))
        for k in table:
            table[k].append(auroc(clean[k], s[k]))
            originals[k].append(auroc(clean[k], so[k]))
        print(f"  {cname}: {len(fa)} successful, {time.perf_counter() - t0:.0f}s", flush=True)
    print(f"command: {command_line()}\n")
    print_table(f"AUROC of each statistic, clean test images vs successful attacks ({args.run})",
                [c[0] for c in CELLS], table)
    print()
    print_table("AUROC of each statistic, clean test images vs the clean originals of those attacks' successes",
                [c[0] for c in CELLS], originals)
    print(f"\nseconds: {time.perf_counter() - t0:.0f}")


if __name__ == "__main__":
    main()

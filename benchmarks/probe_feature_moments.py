"""Probe: do second moments of the early feature maps (or the input's own fine detail) see
CIFAR-10 PGD at 2/255-4/255, where every channel-mean statistic is at chance?

Recorded, not shipped. csg-clean's taps are channel *means* of earlier layers (Lee et al.
2018's feature ensemble): a dense sign perturbation of 2/255 barely moves a mean, but it adds
fine, high-frequency energy to every map, and the JPEG copy's images carry little of it.
Candidates, each a clean-only statistic (class-conditional ones by predicted class, tied
Ledoit-Wolf covariance, fitted on the first ``--fit`` training images):

* ``tap means``: the channel means of the stem and stage outputs (csg-clean's taps-joint);
* ``tap spreads``: their channel-wise spatial standard deviations, joint over layers;
* ``stem spreads``: the stem's alone;
* ``stem roughness``: per channel, mean |f - 3x3 local mean of f| on the stem map, Mahalanobis;
* ``input roughness``: mean |x - 3x3 local mean of x| of the input (one number, larger = rougher).

Scored against the cached adversarial sets of the development grid (the last 1,000 images of
the seed-0 test order, made by ``benchmarks/detector_variants.py cifar10 ... --test-rows tail``),
successful attacks only. Prints AUROC per cell.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_feature_moments.py CSG [CIFAR_ROOT]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import print_table, probe_parser

from csgguard import load_dataset, load_model
from csgguard.attacks.advset import load_adversarial_set
from csgguard.metrics import auroc
from csgguard.scores import class_means, shrunk_precision

CELLS = ("pgd@0.007843", "pgd@0.01569", "pgd@0.03137", "bim@0.007843", "fgsm@0.007843", "fgsm@0.03137",
         "cw", "deepfool")


def _rough(m: torch.Tensor) -> torch.Tensor:
    """Per channel, the mean absolute difference between a map and its 3x3 local mean."""
    return (m - F.avg_pool2d(m, 3, 1, 1, count_include_pad=False)).abs().mean(dim=(2, 3))


@torch.no_grad()
def moments(model, x: torch.Tensor, batch: int = 500) -> dict[str, np.ndarray]:
    """The candidate statistics of a CIFAR ResNet (stem, then each stage's output), plus the prediction."""
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("means", "spreads", "stem", "stem_rough", "input", "pred")}
    bb = model.backbone
    for s in range(0, len(x), batch):
        xb = x[s:s + batch].float()
        h = bb.stem((xb - model.mean) / model.std)
        maps = [h]
        for i, block in enumerate(bb.blocks):
            h = block(h)
            if i + 1 < len(bb.blocks) and bb.blocks[i + 1].conv1.stride[0] == 2:
                maps.append(h)
        out["means"].append(torch.cat([m.mean(dim=(2, 3)) for m in maps], 1).double().numpy())
        out["spreads"].append(torch.cat([m.std(dim=(2, 3)) for m in maps], 1).double().numpy())
        out["stem"].append(maps[0].std(dim=(2, 3)).double().numpy())
        out["stem_rough"].append(_rough(maps[0]).double().numpy())
        out["input"].append(_rough(xb).mean(1).double().numpy())
        out["pred"].append(model(xb).argmax(1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


class MomentProbe:
    """Tied class-conditional Mahalanobis distances of each candidate vector, clean-only."""

    VECTORS = {"tap means": "means", "tap spreads": "spreads", "stem spreads": "stem", "stem roughness": "stem_rough"}

    def __init__(self, fit: dict[str, np.ndarray], num_classes: int) -> None:
        p = fit["pred"]
        self.stats = {}
        for name, key in self.VECTORS.items():
            mu = class_means(fit[key], p, num_classes)
            self.stats[name] = (key, mu, shrunk_precision(fit[key] - mu[p]))
        self.stats["tap means + spreads"] = None

    def scores(self, m: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        p = m["pred"]
        out = {}
        for name, st in self.stats.items():
            if st is None:
                continue
            key, mu, prec = st
            r = m[key] - mu[p]
            out[name] = np.einsum("ij,jk,ik->i", r, prec, r)
        out["input roughness"] = m["input"]
        return out


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--fit", type=int, default=10000, help="clean training images the statistics are fitted on")
    args = ap.parse_args()

    loaded = load_model(Path(args.runs) / f"cifar10-resnet20-{args.model.lower()}")
    model = loaded.model.eval()
    ds = load_dataset("cifar10", args.data_root)
    train = ds.train.subset(np.arange(min(args.fit, len(ds.train))))
    probe = MomentProbe(moments(model, train.x()), ds.num_classes)
    rows = np.sort(np.random.default_rng(0).permutation(len(ds.test))[-1000:])
    clean = probe.scores(moments(model, ds.test.x()[torch.as_tensor(rows)]))
    table: dict[str, list[float]] = {k: [] for k in clean}
    for cell in CELLS:
        adv = load_adversarial_set(Path(args.cache) / f"{args.model}-{cell}.npz").successful()
        m = moments(model, torch.as_tensor(adv.x_adv))
        keep = m["pred"] != adv.y
        s = probe.scores({k: v[keep] for k, v in m.items()})
        for k in clean:
            table[k].append(auroc(clean[k], s[k]))
    title = (f"feature-moment probe, {args.model} development model, CIFAR-10 (JPEG q75 copy), 1,000 clean images, "
             f"statistics fitted on {len(train)} training images")
    print_table(title, CELLS, table)


if __name__ == "__main__":
    main()

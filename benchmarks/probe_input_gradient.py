"""Probe: does the input gradient (one backward pass) see CIFAR-10 attacks that one forward pass misses?

Recorded, not shipped (until a rule picks it). csg-clean, every statistic of one forward
pass, sits at 0.56-0.64 AUROC on CIFAR-10 FGSM (every budget) and PGD/BIM 2/255; only
detectors that run the network again (feature squeezing, noise response) see the small
iterative budgets, and none sees FGSM. This probes what one backward pass adds: how
sensitive the decision is at the input, which an attacker's steps change and a forward
pass's statistics do not show.

Statistics, for an input predicted as y (the margin m = f_y - max_z f_z over the logits):

* ``grad``: log of the L2 norm of the gradient of m with respect to the input;
* ``dist``: -log of the first-order distance to the decision boundary, |m| / ||grad m||
  (DeepFool's linear estimate; larger = nearer the boundary);
* ``ce-grad``: log of the L2 norm of the input gradient of the cross-entropy at label y;

each standardised per predicted class by its mean and spread over the correctly
classified training images (clean-only, as every csgguard detector's units), the score
the absolute z (two-sided: which side an attack lands on is measured, not assumed) and
its upper side (``+``). Beside them: the shipped csg-clean score on the same rows, and the
max of the clean percentiles of csg-clean and of each statistic (calibrated on the
validation images), to show what a union would add.

Evaluated on the development grid's rows (the last N of the seed-0 test order) of the
development model; the adversarial sets are made here (or read from --cache if present).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_input_gradient.py CSG [CIFAR_ROOT] --images 500
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import correct_training_images, print_table, probe_parser

from csgguard import load_dataset, load_model
from csgguard.attacks import run as run_attack
from csgguard.attacks.advset import load_adversarial_set, save_adversarial_set
from csgguard.detectors import build_detector
from csgguard.features import extract_features
from csgguard.metrics import auroc

CELLS = (("fgsm@0.007843", "fgsm", {"eps": 2 / 255}), ("fgsm@0.03137", "fgsm", {"eps": 8 / 255}),
         ("fgsm@0.06275", "fgsm", {"eps": 16 / 255}),
         ("pgd@0.007843", "pgd", {"eps": 2 / 255}), ("pgd@0.01569", "pgd", {"eps": 4 / 255}),
         ("pgd@0.03137", "pgd", {"eps": 8 / 255}), ("bim@0.007843", "bim", {"eps": 2 / 255}),
         ("cw", "cw", {"preset": "fast"}), ("deepfool", "deepfool", {}))


def gradient_statistics(model, x: torch.Tensor, batch: int = 100) -> dict[str, np.ndarray]:
    """Per input: predicted class, log ||d margin / dx||, -log(|margin| / ||d margin / dx||), log ||d CE / dx||."""
    out = {"pred": [], "grad": [], "dist": [], "ce-grad": []}
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].float().clone().requires_grad_(True)
        z = model(xb).float()
        y = z.argmax(1)
        other = z.masked_fill(torch.nn.functional.one_hot(y, z.shape[1]).bool(), -torch.inf).amax(1)
        margin = z.gather(1, y[:, None])[:, 0] - other
        (g,) = torch.autograd.grad(margin.sum(), xb, retain_graph=True)
        (gce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y, reduction="sum"), xb)
        gn = g.flatten(1).norm(dim=1).double().clamp_min(1e-12)
        out["pred"].append(y.numpy())
        out["grad"].append(gn.log().numpy())
        out["dist"].append((gn.log() - margin.detach().double().abs().clamp_min(1e-12).log()).numpy())
        out["ce-grad"].append(gce.flatten(1).norm(dim=1).double().clamp_min(1e-30).log().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def standardise(stats: dict[str, np.ndarray], units: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    y = stats["pred"]
    return {k: (stats[k] - mu[y]) / sd[y] for k, (mu, sd) in units.items()}


def percentile_of(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Share of the clean reference scores below each score (the clean percentile)."""
    ref = np.sort(reference)
    return np.searchsorted(ref, scores, side="right") / len(ref)


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--images", type=int, default=500, help="evaluation rows (the last N of the seed-0 test order)")
    ap.add_argument("--fit", type=int, default=5000, help="training images the clean units come from")
    args = ap.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)

    loaded = load_model(Path(args.runs) / f"cifar10-resnet20-{args.model.lower()}")
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ds = load_dataset("cifar10", args.data_root)
    rows = np.sort(np.random.default_rng(0).permutation(len(ds.test))[-args.images:])
    x, y = ds.test.x()[torch.as_tensor(rows)], ds.test.labels[torch.as_tensor(rows)]
    cache = Path(args.cache)
    advs = {}
    for name, method, kw in CELLS:
        path = cache / f"{args.model}-{name}.npz"
        if args.images == 1000 and path.is_file():
            advs[name] = load_adversarial_set(path).successful()
            continue
        t = time.perf_counter()
        advs[name] = run_attack(loaded, x, y, method, seed=0, progress=False, **kw).successful()
        print(f"  {name}: {len(advs[name].x_adv)} successful, {time.perf_counter() - t:.0f}s", file=sys.stderr,
              flush=True)
        if args.images == 1000:
            cache.mkdir(parents=True, exist_ok=True)
            save_adversarial_set(path, advs[name])

    xt, ft = correct_training_images(model, ds, args.fit)
    st = gradient_statistics(model, xt)
    k = ds.num_classes
    units = {}
    for name in ("grad", "dist", "ce-grad"):
        mu = np.array([st[name][st["pred"] == c].mean() for c in range(k)])
        sd = np.array([st[name][st["pred"] == c].std() + 1e-6 for c in range(k)])
        units[name] = (mu, sd)
    det = build_detector("csg-clean").bind_model(model).fit(ft, inputs=xt)
    xv = ds.val.x()
    val_z = standardise(gradient_statistics(model, xv), units)
    val_csg = det.score_samples(extract_features(model, xv), inputs=xv)

    def scores(inputs: torch.Tensor) -> dict[str, np.ndarray]:
        z = standardise(gradient_statistics(model, inputs), units)
        csg = det.score_samples(extract_features(model, inputs), inputs=inputs)
        out = {"csg-clean": csg}
        for name in units:
            out[f"|{name}|"] = np.abs(z[name])
            out[f"{name}+"] = z[name]
            out[f"{name}-"] = -z[name]
            out[f"csg-clean v |{name}|"] = np.maximum(percentile_of(val_csg, csg),
                                                      percentile_of(np.abs(val_z[name]), np.abs(z[name])))
        return out

    clean = scores(x)
    table: dict[str, list[float]] = {key: [] for key in clean}
    for name, _, _ in CELLS:
        a = advs[name]
        xa = torch.as_tensor(a.x_adv)
        with torch.no_grad():
            keep = np.flatnonzero(model(xa).argmax(1).numpy() != np.asarray(a.y))  # still adversarial here
        adv = scores(xa[torch.as_tensor(keep)])
        for key in table:
            table[key].append(auroc(clean[key], adv[key]))
    title = (f"input-gradient probe, {args.model} development model, CIFAR-10 (JPEG q75 copy), {len(x)} clean "
             f"images (misclassified included), AUROC ({time.perf_counter() - t0:.0f}s)")
    print_table(title, [c[0] for c in CELLS], table)


if __name__ == "__main__":
    main()

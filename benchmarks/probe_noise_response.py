"""Probe: does the logits' response to random noise see CIFAR-10 attacks at 2/255-4/255?

Recorded, not shipped (until a rule picks it). Every single-pass statistic csgguard has
probed is at chance on CIFAR-10 PGD 2/255 (benchmarks/results/probe-*.md); only feature
squeezing, which runs the network on altered copies of the input, sees it. This probes the
idea of Roth et al. 2019 ("The odds are odd"): an adversarial input sits where a little
random noise moves the logits back toward the class it came from, a clean input does not.

Statistics, each clean-only (means and spreads from correctly classified training images
of the development model, per predicted class y, per other class z), all through the same
fixed noise bank as the shipped detector (``csgguard.detectors.noise``):

* ``flip``: share of M noisy copies whose prediction differs from the input's;
* ``shift``: mean L1 change of the softmax vector under noise;
* ``odds``: Roth et al.'s statistic, max over z of the standardised mean noise-induced
  change of the logit difference f_z - f_y: the shipped ``noise-response`` detector's score,
  called, not rewritten;
* ``drop``: the standardised mean drop of the predicted class's logit margin under noise.

Noise: Gaussian, sigma in --sigmas (on [0, 1] images, clipped), M copies per input (the bank of seed 0).
Evaluated on the development grid's images (the last 1,000 of the seed-0 test order) and
its adversarial sets, made here if the cache lacks them (``benchmarks/detector_variants.py``
names them the same).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_noise_response.py CSG [CIFAR_ROOT]
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
from csgguard.detectors.noise import logit_gaps, noise_bank
from csgguard.features import extract_features
from csgguard.metrics import auroc

CELLS = (("fgsm@0.007843", "fgsm", {"eps": 2 / 255}), ("fgsm@0.03137", "fgsm", {"eps": 8 / 255}),
         ("pgd@0.007843", "pgd", {"eps": 2 / 255}), ("pgd@0.01569", "pgd", {"eps": 4 / 255}),
         ("pgd@0.03137", "pgd", {"eps": 8 / 255}), ("pgd@0.06275", "pgd", {"eps": 16 / 255}),
         ("bim@0.007843", "bim", {"eps": 2 / 255}),
         ("cw", "cw", {"preset": "fast"}), ("deepfool", "deepfool", {}))


@torch.no_grad()
def copy_logits(model, x: torch.Tensor, sigma: float, copies: int, batch: int = 32):
    """Logits of x (N, K) and of its noisy copies (N, copies, K), through the detector's fixed noise bank."""
    bank = sigma * noise_bank(tuple(x.shape[1:]), copies, seed=0)
    base, noisy = [], []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].float()
        base.append(model(xb).double())
        noisy.append(model((xb[:, None] + bank[None]).clamp(0, 1).flatten(0, 1)).double().reshape(len(xb), copies, -1))
    return torch.cat(base), torch.cat(noisy)


def probe_statistics(z: torch.Tensor, zn: torch.Tensor, drop_units) -> dict[str, np.ndarray]:
    """The probe's own statistics (not shipped): flip share, softmax shift, standardised margin drop."""
    y = z.argmax(1)
    p = torch.softmax(z, 1)
    flip = (zn.argmax(2) != y[:, None]).double().mean(1)
    shift = (torch.softmax(zn, 2) - p[:, None]).abs().sum(2).mean(1)
    mean_noisy = zn.mean(1)
    gap, gap_noisy = logit_gaps(z, y), logit_gaps(mean_noisy, y)
    gap[torch.arange(len(z)), y] = -np.inf
    gap_noisy[torch.arange(len(z)), y] = -np.inf
    drop = gap_noisy.max(1).values - gap.max(1).values  # the margin's loss under noise
    out = {"flip": flip.numpy(), "shift": shift.numpy(), "drop": drop.numpy()}
    if drop_units is not None:
        mu, sd = drop_units
        out["drop"] = (out["drop"] - mu[y.numpy()]) / sd[y.numpy()]
    return out


def main() -> None:
    ap = probe_parser(__doc__)
    ap.add_argument("--sigmas", default="4/255,8/255,16/255")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--fit", type=int, default=5000, help="training images the clean statistics come from")
    args = ap.parse_args()
    sigmas = [float(a) / float(b or 1) for a, _, b in (s.partition("/") for s in args.sigmas.split(","))]

    loaded = load_model(Path(args.runs) / f"cifar10-resnet20-{args.model.lower()}")
    model = loaded.model.eval()
    ds = load_dataset("cifar10", args.data_root)
    rows = np.sort(np.random.default_rng(0).permutation(len(ds.test))[-1000:])
    x, y = ds.test.x()[torch.as_tensor(rows)], ds.test.labels[torch.as_tensor(rows)]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    advs = {}
    for name, method, kw in CELLS:
        path = cache / f"{args.model}-{name}.npz"
        if not path.is_file():
            t = time.perf_counter()
            save_adversarial_set(path, run_attack(loaded, x, y, method, seed=0, progress=False, **kw))
            print(f"  {name}: {time.perf_counter() - t:.0f}s", file=sys.stderr, flush=True)
        advs[name] = load_adversarial_set(path).successful()
    xt, ft = correct_training_images(model, ds, args.fit)
    fc = extract_features(model, x)
    for sigma in sigmas:
        t = time.perf_counter()
        # "odds" is the shipped statistic itself (detectors/noise.py), the same fixed bank (seed 0)
        det = build_detector("noise-response", sigma=sigma, copies=args.copies).bind_model(model).fit(ft, inputs=xt)
        st = probe_statistics(*copy_logits(model, xt, sigma, args.copies), None)
        yt = ft.pred
        units = (np.array([st["drop"][yt == c].mean() for c in range(ds.num_classes)]),
                 np.array([st["drop"][yt == c].std() + 1e-6 for c in range(ds.num_classes)]))
        clean = probe_statistics(*copy_logits(model, x, sigma, args.copies), units)
        clean["odds"] = det.score_samples(fc, inputs=x)
        table = {k: [] for k in ("flip", "shift", "odds", "drop")}
        for name, _, _ in CELLS:
            a = advs[name]
            xa = torch.as_tensor(a.x_adv)
            fa = extract_features(model, xa)
            keep = np.flatnonzero(fa.pred != a.y)
            s = probe_statistics(*copy_logits(model, xa[torch.as_tensor(keep)], sigma, args.copies), units)
            s["odds"] = det.score_samples(fa.subset(keep), inputs=xa[torch.as_tensor(keep)])
            for k in table:
                table[k].append(auroc(clean[k], s[k]))
        title = (f"noise-response probe, {args.model} development model, CIFAR-10 (JPEG q75 copy), sigma "
                 f"{sigma * 255:.0f}/255, {args.copies} copies, 1,000 clean images ({time.perf_counter() - t:.0f}s)")
        print_table(title, [c[0] for c in CELLS], table)
        print(flush=True)


if __name__ == "__main__":
    main()

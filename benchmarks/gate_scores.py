"""Reproduce docs/detectors.md "Measurements": every csg-clean score and csg-supervised, CSG vs STD.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_scores.py                      # digits, CPU, ~1 min
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gate_scores.py --csg RUN --std RUN  # reuse trained runs
    .venv/bin/python benchmarks/gate_scores.py --data mnist --data-root DIR --limit 2000 --epochs 3

Protocol (the split policy of :mod:`csgguard.fitting`, through its public calls only):

* two models, ``TrainConfig(data, gate=True|False, epochs, seed=0)``, or ``--csg`` / ``--std`` runs;
* FGSM and PGD (Linf, every ``--eps``) from ``csgguard.attacks.run`` on the **test** split
  (the first ``--limit`` images); an attack only touches correctly classified images
  and only its successful examples are positives;
* each detector is fitted and calibrated by ``csgguard.fitting.fit_detector``: clean
  statistics on the correctly classified **train** images, threshold on the clean
  correctly classified **val** images at ``--fpr``; ``csg-supervised`` additionally sees
  PGD + FGSM at the first eps, generated on those train images (later eps are unseen);
* negatives: the correctly classified clean **test** images. Each cell: AUROC / TPR at
  the calibrated threshold; ``FPR test (val)`` is the realised false-positive rate.

Nothing here is fitted by hand: the numbers are what ``csgguard fit`` would produce.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import command_line

METHODS = ("fgsm", "pgd")


def _models(args, out: Path, log) -> dict[str, Path]:
    """The CSG and STD run directories: given with --csg/--std, else trained into ``out``."""
    from csgguard import TrainConfig, train
    from csgguard.errors import CsgguardError
    from csgguard.models.store import load_model

    runs: dict[str, Path] = {}
    for label, gate, given in (("CSG", True, args.csg), ("STD", False, args.std)):
        if given:
            runs[label] = Path(given)
            loaded = load_model(runs[label], "cpu")
            trained_on = (loaded.manifest.get("training") or {}).get("data")
            if trained_on != args.data:
                raise CsgguardError(f"{given}: model was trained on {trained_on!r}, not --data {args.data!r}")
            if (loaded.model.gate is not None) != gate:
                raise CsgguardError(f"{given}: expected a {label} model ({'with' if gate else 'without'} a gate)")
            log(f"reusing {label} run {given}")
            continue
        runs[label] = out / label.lower()
        cfg = TrainConfig(data=args.data, data_root=args.data_root, gate=gate, epochs=args.epochs, seed=0,
                          device=args.device)
        t0 = time.perf_counter()
        train(cfg, runs[label], progress=False)
        log(f"trained {label} -> {runs[label]} in {time.perf_counter() - t0:.0f} s "
            f"(TrainConfig(data={args.data!r}, gate={gate}, epochs={args.epochs}, seed=0))")
    return runs


def _correct(features, labels: torch.Tensor):
    """The features of the images the model classifies correctly (the clean negatives)."""
    return features.subset(np.flatnonzero(features.pred == labels.numpy()))


def _attack_test(loaded, test, eps_list: list[float], dataset: str, device) -> dict[str, dict[str, Any]]:
    """FGSM / PGD on the test split: features of the successful examples, success rate, count."""
    from csgguard.attacks import run as run_attack
    from csgguard.features import extract_features

    out = {}
    for eps in eps_list:
        for method in METHODS:
            adv = run_attack(loaded, test.x(), test.labels, method, eps=eps, dataset=dataset, device=device,
                             progress=False)
            ok = adv.successful()
            x_adv = torch.as_tensor(np.asarray(ok.x_adv, dtype=np.float32))
            out[f"{method}@{eps:g}"] = {"features": extract_features(loaded.model, x_adv, device=device),
                                        "success_rate": adv.success_rate, "n": len(ok),
                                        "attacked": int(adv.attacked.sum())}
    return out


def _fit(run: Path, name: str, params: dict[str, Any], args, eps_list: list[float], tmp: Path, device):
    """One ``csgguard fit`` (train split fit, val split threshold), saved into a scratch file."""
    from csgguard.fitting import fit_detector

    kw: dict[str, Any] = {"attacks": ("pgd", "fgsm"), "eps": eps_list[0]} if name == "csg-supervised" else {}
    label = "-".join([run.name, name, *map(str, params.values())])
    return fit_detector(run, detector=name, params=params, fpr=args.fpr, limit=args.limit, device=device,
                        data_root=args.data_root, out=tmp / f"{label}.json", progress=False, **kw)


def _cells(det, clean, advs: dict[str, dict[str, Any]]) -> tuple[float, list[str]]:
    """Realised test FPR and one ``AUROC / TPR`` cell per attack at the detector's own threshold."""
    from csgguard.metrics import auroc, tpr_at_threshold

    clean_scores = det.score_samples(clean)
    cells = []
    for a in advs.values():
        s = det.score_samples(a["features"])
        cells.append(f"{auroc(clean_scores, s):.3f} / {tpr_at_threshold(s, det.threshold_):.2f}" if len(s) else "-")
    return tpr_at_threshold(clean_scores, det.threshold_), cells


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--limit", type=int, default=None,
                    help="first N train images for the fit and first N test images for the evaluation")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--eps", default="0.1,0.2", help="Linf budgets; csg-supervised is fitted at the first")
    ap.add_argument("--fpr", type=float, default=0.05)
    ap.add_argument("--csg", default=None, help="reuse this trained CSG run instead of training one")
    ap.add_argument("--std", default=None, help="reuse this trained STD run instead of training one")
    ap.add_argument("--out", default=None, help="where to train the models (default runs/gate_scores/<data>)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    from csgguard.errors import CsgguardError

    try:
        run(args)
    except CsgguardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def run(args) -> None:
    from csgguard.data import load_dataset
    from csgguard.detectors.gate import CLEAN_SCORES
    from csgguard.devices import select_device
    from csgguard.errors import CsgguardError
    from csgguard.evaluate import machine_info
    from csgguard.features import extract_features
    from csgguard.metrics import accuracy
    from csgguard.models.store import load_model

    try:
        eps_list = [float(e) for e in args.eps.split(",") if e.strip()]
    except ValueError:
        raise CsgguardError(f"--eps must be comma-separated numbers, got {args.eps!r}") from None
    if not eps_list:
        raise CsgguardError("--eps is empty")
    if args.limit is not None and args.limit < 1:
        raise CsgguardError(f"--limit must be >= 1, got {args.limit}")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    device = select_device(args.device)
    runs = _models(args, Path(args.out or f"runs/gate_scores/{args.data}"), log)
    ds = load_dataset(args.data, args.data_root)
    test = ds.test if args.limit is None else ds.test.subset(np.arange(min(args.limit, len(ds.test))))

    per_model: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gate_scores-") as tmp:
        for label, run_dir in runs.items():
            loaded = load_model(run_dir, device)
            feats = extract_features(loaded.model, test.x(), device=device)
            gate = loaded.model.gate
            info = {"accuracy": accuracy(feats.logits, test.labels.numpy()),
                    "density": None if gate is None else float(gate.density()),
                    "clean": _correct(feats, test.labels)}
            log(f"{label}: attacking {len(test)} test images ({', '.join(METHODS)} at eps {args.eps})")
            info["advs"] = _attack_test(loaded, test, eps_list, args.data, device)
            log(f"{label}: fitting {len(CLEAN_SCORES)} csg-clean scores + csg-supervised")
            info["fits"] = {s: _fit(run_dir, "csg-clean", {"score": s}, args, eps_list, Path(tmp), device)
                            for s in CLEAN_SCORES}
            info["fits"]["csg-supervised"] = _fit(run_dir, "csg-supervised", {}, args, eps_list, Path(tmp), device)
            per_model[label] = info

    m = machine_info(device)
    print(f"$ {command_line()}")
    print(f"machine: {m['platform']}, {m['cpu_count']} CPUs, device {m['device']} {m.get('gpu', '')}".rstrip()
          + f", torch {m['torch']}, threads {torch.get_num_threads()}, python {m['python']}")
    sizes = {k: len(getattr(ds, k)) for k in ("train", "val", "test")}
    print(f"data: {args.data}, splits {sizes}, limit {args.limit}; eps {eps_list} (Linf); target FPR {args.fpr}; "
          f"seconds {time.perf_counter() - t0:.0f}")
    for label, info in per_model.items():
        dens = "" if info["density"] is None else f", gate density {info['density']:.3f}"
        sup = info["fits"]["csg-supervised"].summary
        print(f"model {label}: {runs[label]}, test accuracy {info['accuracy']:.3f}{dens}; clean test "
              f"{len(info['clean'])}, val {sup['calibration']}, train fit {sup['clean_fit']}, "
              f"supervised adversarial train {sup['adversarial_fit']}")
    attacks = list(next(iter(per_model.values()))["advs"])
    names = [k.replace("@", " ").upper() for k in attacks]

    print("\nAttack success on the test split (successful / attacked):\n")
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, info in per_model.items():
        print(f"| {label} | " + " | ".join(f"{a['success_rate']:.2f} ({a['n']}/{a['attacked']})"
                                           for a in info["advs"].values()) + " |")

    print(f"\nDetectors (cells: AUROC / TPR at the val-calibrated {args.fpr:.0%}-FPR threshold):\n")
    print("| model | detector | FPR test (val) | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for label, info in per_model.items():
        suffix = "" if info["density"] is not None else " (pseudo-gate)"
        for name, key in (("csg-clean", CLEAN_SCORES[0]), ("csg-supervised", "csg-supervised")):
            fit = info["fits"][key]
            fpr, cells = _cells(fit.detector, info["clean"], info["advs"])
            print(f"| {label} | {name}{suffix} | {fpr:.3f} ({fit.summary['realised_fpr_val']:.3f}) | "
                  + " | ".join(cells) + " |")

    print(f"\ncsg-clean scores (AUROC / TPR at the val-calibrated {args.fpr:.0%}-FPR threshold; "
          "last column: realised test FPR CSG / STD):\n")
    cols = [f"{label} {n}" for label in per_model for n in names]
    print("| score | " + " | ".join(cols) + " | FPR test |")
    print("|---|" + "---|" * (len(cols) + 1))
    for s in CLEAN_SCORES:
        row, fprs = [], []
        for info in per_model.values():
            fpr, cells = _cells(info["fits"][s].detector, info["clean"], info["advs"])
            row += cells
            fprs.append(f"{fpr:.3f}")
        print(f"| {s} | " + " | ".join(row) + f" | {' / '.join(fprs)} |")


if __name__ == "__main__":
    main()

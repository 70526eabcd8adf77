"""Which components and combiner should ``csg-clean`` use? The study behind its default.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detector_variants.py digits \\
        --csg runs/digits-csg --std runs/digits-std
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/detector_variants.py mnist \\
        --data-root ../shared/data/mnist --csg runs/mnist-csg --std runs/mnist-std --limit 1500

Every variant is the shipped detector (``GateCleanDetector(components=..., combine=..., covariance=...)``),
fitted and calibrated the way ``csgguard fit`` does it:

* fit: the clean training images the model classifies correctly (at most ``--fit-limit``);
* threshold: every clean validation image (5% target false-positive rate);
* evaluation: ``--limit`` test images (seeded): negatives are all of them, positives the
  successful adversarial examples of the correctly classified ones, kept only when the
  model really mispredicts them;
* attacks (``csgguard.attacks.run``, seed 0): FGSM, PGD and BIM at every Linf budget of
  the sweep (``--eps``), C&W-L2 (fast preset) and DeepFool-L2 (minimum-norm); made once
  and cached (``--cache``) as adversarial-set files, read by every variant.

Two rules have picked the default (docs/detectors.md), each fixed before its grid ran.
The first (``--summarise --rule worst``): highest worst-case AUROC over digits and MNIST,
CSG and STD. The second and current one (``--summarise``, minimax regret): the grid adds
CIFAR-10 (evaluated with ``--test-rows tail``, disjoint from the harness's images); in
each cell a candidate's regret is the best candidate's AUROC minus its own; the smallest
largest regret wins, ties within 0.01 go to the higher mean AUROC, then fewer components.
``--json`` saves every cell; ``--summarise A.json B.json ...`` applies the rule over
several saved grids and prints the ranking. ``--study votes`` runs the sixth question's
candidates (the ``votes`` component); ``--summarise --rule votes`` applies the second rule to them. ``--study units`` runs the third question's two
candidates (units from the fit images or from held-out ones) and ``--summarise --rule units``
applies its rule.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import command_line

#: the candidates of the second choice (docs/detectors.md), named; each is (components, combine, covariance)
VARIANTS = {
    "taps,pattern,margin sum (first default)": ("taps,pattern,margin", "sum", "class"),
    "taps,pattern,margin sum tied": ("taps,pattern,margin", "sum", "tied"),
    "taps,pattern,margin max tied": ("taps,pattern,margin", "max", "tied"),
    "pattern,margin sum": ("pattern,margin", "sum", "class"),
    "pattern,margin sum tied": ("pattern,margin", "sum", "tied"),
    "pattern tied": ("pattern", "sum", "tied"),
    "taps,pattern sum tied": ("taps,pattern", "sum", "tied"),
    "all five sum tied": ("taps,pattern,mismatch,margin,norm", "sum", "tied"),
    "taps-joint,pattern,margin sum tied": ("taps-joint,pattern,margin", "sum", "tied"),
    "taps-joint,pattern,margin max tied": ("taps-joint,pattern,margin", "max", "tied"),
}
#: the third question (docs/detectors.md): the default detector, its units from the fit images or
#: from one half of the held-out (validation) images; each is (components, combine, covariance, units)
UNIT_VARIANTS = {
    "default, units fit": ("taps-joint,pattern,margin", "sum", "tied", "fit"),
    "default, units held-out": ("taps-joint,pattern,margin", "sum", "tied", "held-out"),
}
#: the sixth question (docs/detectors.md): the layers' class votes as a component; (components, combine, covariance)
VOTE_VARIANTS = {
    "taps-joint,pattern,margin sum tied (default)": ("taps-joint,pattern,margin", "sum", "tied"),
    "taps-joint,votes,pattern,margin sum tied": ("taps-joint,votes,pattern,margin", "sum", "tied"),
    "votes,pattern,margin sum tied": ("votes,pattern,margin", "sum", "tied"),
    "taps-joint,votes,pattern,margin max tied": ("taps-joint,votes,pattern,margin", "max", "tied"),
}
#: the fourth question (docs/detectors.md): the union's default parts, for natural images at small budgets;
#: each is (parts, part_params, extra forward passes per image). Candidates have a comma in their parts;
#: the single detectors are references, not candidates.
_NOISE = "csg-clean,noise-response"
UNION_VARIANTS = {
    "union csg-clean + feature-squeezing (current)": ("csg-clean,feature-squeezing", None, 3),
    "union csg-clean + noise 4/255": (_NOISE, {"noise-response": {"sigma": 4 / 255}}, 8),
    "union csg-clean + noise 8/255": (_NOISE, {"noise-response": {"sigma": 8 / 255}}, 8),
    "union csg-clean + noise 16/255": (_NOISE, {"noise-response": {"sigma": 16 / 255}}, 8),
    "union csg-clean + noise 4/255 + feature-squeezing": ("csg-clean,noise-response,feature-squeezing",
                                                         {"noise-response": {"sigma": 4 / 255}}, 11),
    "noise-response 4/255 alone (reference)": ("noise-response", {"noise-response": {"sigma": 4 / 255}}, 8),
    "feature-squeezing alone (reference)": ("feature-squeezing", None, 3),
    "csg-clean alone (reference)": ("csg-clean", None, 0),
}
SWEEP = {"digits": "0.05,0.1,0.2,0.3", "mnist": "0.05,0.1,0.2,0.3", "cifar10": "2/255,4/255,8/255,16/255"}


def parse_list(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        num, _, den = part.strip().partition("/")
        out.append(float(num) / (float(den) if den else 1.0))
    return out


def attack_cells(eps_list: list[float]) -> list[tuple[str, str, dict]]:
    cells = []
    for method in ("fgsm", "pgd", "bim"):
        for eps in eps_list:
            cells.append((f"{method}@{eps:.4g}", method, {"eps": eps}))
    cells.append(("cw", "cw", {"preset": "fast"}))
    cells.append(("deepfool", "deepfool", {}))
    return cells


def adversarial_features(loaded, x, y, cells, cache: Path, label: str, log):
    from csgguard.attacks import run
    from csgguard.attacks.advset import load_adversarial_set, save_adversarial_set
    from csgguard.features import extract_features

    out = {}
    for name, method, kw in cells:
        path = cache / f"{label}-{name.replace('/', '_')}.npz"
        if path.is_file():
            adv = load_adversarial_set(path)
        else:
            t = time.perf_counter()
            adv = run(loaded, x, y, method, seed=0, progress=False, **kw)
            save_adversarial_set(path, adv)
            log(f"  {label} {name}: {int(adv.success.sum())}/{int(adv.attacked.sum())} in "
                f"{time.perf_counter() - t:.1f}s")
        ok = adv.successful()
        feats = extract_features(loaded.model, torch.as_tensor(ok.x_adv))
        keep = np.flatnonzero(feats.pred != ok.y)
        out[name] = (feats.subset(keep), float(len(keep) / max(int(adv.attacked.sum()), 1)),
                     torch.as_tensor(ok.x_adv[keep]))
    return out


def study_model(label: str, run: str, args, log) -> list[dict]:
    from csgguard import extract_features, load_dataset, load_model
    from csgguard.detectors.gate import GateCleanDetector
    from csgguard.metrics import auroc

    loaded = load_model(run)
    ds = load_dataset(args.dataset, args.data_root)
    train = ds.train.subset(np.arange(min(args.fit_limit, len(ds.train))))
    f = extract_features(loaded.model, train.x())
    fit_rows = np.flatnonzero(f.pred == train.labels.numpy())
    fit = f.subset(fit_rows)
    cal = extract_features(loaded.model, ds.val.x())
    perm = np.random.default_rng(0).permutation(len(ds.test))
    # head: the first --limit of the seeded order; tail: the last --limit, disjoint from the images
    # the same-harness sweep (benchmarks/detection_sweep.py, seed 0) evaluates on
    rows = np.sort(perm[: args.limit] if args.test_rows == "head" else perm[-args.limit:])
    x, y = ds.test.x()[torch.as_tensor(rows)], ds.test.labels[torch.as_tensor(rows)]
    clean = extract_features(loaded.model, x)
    cells = attack_cells(parse_list(args.eps or SWEEP[args.dataset]))
    cache = Path(args.cache) / (args.dataset + ("" if args.test_rows == "head" else "-tail"))
    cache.mkdir(parents=True, exist_ok=True)
    adv = adversarial_features(loaded, x, y, cells, cache, label, log)
    if args.study == "union":
        return study_unions(loaded, label, args, (fit, train.x()[torch.as_tensor(fit_rows)]), (cal, ds.val.x()),
                            (clean, x), adv, log)
    out = []
    candidates = {"units": UNIT_VARIANTS, "votes": VOTE_VARIANTS}.get(args.study, VARIANTS)
    for vname, (components, combine, covariance, *units) in candidates.items():
        det = GateCleanDetector(components=components, combine=combine, covariance=covariance,
                                units=units[0] if units else "fit").fit(fit)
        det.calibrate(cal)
        s_clean = det.score_samples(clean)
        fpr = float(np.mean(s_clean > det.threshold_))
        for cname, (fa, success, _) in adv.items():
            s = det.score_samples(fa)
            out.append({"dataset": args.dataset, "model": label, "variant": vname, "components": components,
                        "combine": combine, "covariance": covariance, "attack": cname, "auroc": auroc(s_clean, s) if len(s) else None,
                        "tpr": float(np.mean(s > det.threshold_)) if len(s) else None, "n_adv": len(s),
                        "success_rate": success, "realised_fpr": fpr})
    # per-component AUROC (the ablation: what each statistic sees alone)
    ablation = {"variants": ("tied", "class"), "votes": ("tied",)}.get(args.study, ())
    for covariance in ablation:
        comps = ("taps-joint,votes,pattern,margin" if args.study == "votes"
                 else "taps,taps-joint,pattern,mismatch,margin,norm" if covariance == "tied" else "pattern")
        det = GateCleanDetector(components=comps, covariance=covariance).fit(fit).calibrate(cal)
        z_clean = det.statistics(clean)
        for cname, (fa, _, _) in adv.items():
            z = det.statistics(fa)
            for comp in z:
                suffix = " (class covariance)" if covariance == "class" else ""
                out.append({"dataset": args.dataset, "model": label, "variant": f"component {comp}{suffix}",
                            "attack": cname, "auroc": auroc(z_clean[comp], z[comp]) if len(fa) else None,
                            "tpr": None, "n_adv": len(fa)})
    return out


def study_unions(loaded, label: str, args, fit, cal, clean, adv, log) -> list[dict]:
    """The fourth question's candidates (``UNION_VARIANTS``): each union fitted on the fit images,
    its parts' tables and threshold from the validation images (as ``csgguard fit`` does), scored on
    the clean test images and every adversarial set, the model bound for the parts that run it."""
    from csgguard.detectors import build_detector
    from csgguard.metrics import auroc

    out = []
    for vname, (parts, part_params, passes) in UNION_VARIANTS.items():
        t = time.perf_counter()
        if "," in parts:
            det = build_detector("union", parts=parts, part_params=part_params)
        else:
            det = build_detector(parts, **(part_params or {}).get(parts, {}))
        det.bind_model(loaded.model)
        det.fit(fit[0], inputs=fit[1] if det.needs_inputs else None)
        det.calibrate(cal[0], inputs=cal[1] if det.needs_inputs else None)
        s_clean = det.score_samples(clean[0], inputs=clean[1] if det.needs_inputs else None)
        fpr = float(np.mean(s_clean > det.threshold_))
        for cname, (fa, success, xa) in adv.items():
            s = det.score_samples(fa, inputs=xa if det.needs_inputs else None) if len(fa) else np.zeros(0)
            out.append({"dataset": args.dataset, "model": label, "variant": vname, "components": parts,
                        "extra_passes": passes, "attack": cname,
                        "auroc": auroc(s_clean, s) if len(s) else None,
                        "tpr": float(np.mean(s > det.threshold_)) if len(s) else None, "n_adv": len(s),
                        "success_rate": success, "realised_fpr": fpr})
        log(f"  {label} {vname}: {time.perf_counter() - t:.0f}s")
    return out


def print_tables(rows: list[dict]) -> None:
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    for model in dict.fromkeys(r["model"] for r in rows):
        print(f"\n## {rows[0]['dataset']} {model}: AUROC / detection rate at the fitted 5% threshold")
        print("| variant | " + " | ".join(attacks) + " | worst AUROC | worst rate | realised FPR |")
        print("|---" * (len(attacks) + 4) + "|")
        for v in dict.fromkeys(r["variant"] for r in rows if r["model"] == model):
            cells = {r["attack"]: r for r in rows if r["model"] == model and r["variant"] == v}
            au = [c["auroc"] for c in cells.values() if c["auroc"] is not None]
            tp = [c["tpr"] for c in cells.values() if c["tpr"] is not None]

            def fmt(c):
                if c["auroc"] is None:
                    return "-"
                return f"{c['auroc']:.3f}" + (f" / {c['tpr']:.2f}" if c["tpr"] is not None else "")

            fpr = next(iter(cells.values())).get("realised_fpr")
            line = [fmt(cells[a]) if a in cells else "-" for a in attacks]
            line += [f"{min(au):.3f}" if au else "-", f"{min(tp):.2f}" if tp else "-",
                     f"{fpr:.3f}" if fpr is not None else "-"]
            print(f"| {v} | " + " | ".join(line) + " |")


def _candidates(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["variant"] for r in rows if not r["variant"].startswith("component")))


def _n_components(rows: list[dict], v: str) -> int:
    return len(next(r for r in rows if r["variant"] == v)["components"].split(","))


def apply_rule(rows: list[dict]) -> list[tuple[str, float, float, int]]:
    """The first rule of docs/detectors.md: (variant, worst AUROC, worst rate, components), best first.
    Ties within 0.005 of worst AUROC go to the worst rate, then fewer components."""
    out = []
    for v in _candidates(rows):
        cells = [r for r in rows if r["variant"] == v and r["auroc"] is not None]
        out.append((v, min(c["auroc"] for c in cells), min(c["tpr"] for c in cells), _n_components(rows, v)))
    best = max(a for _, a, _, _ in out)
    tied = [t for t in out if t[1] >= best - 0.005]
    rest = [t for t in out if t[1] < best - 0.005]
    return sorted(tied, key=lambda t: (-t[2], t[3])) + sorted(rest, key=lambda t: -t[1])


def minimax_regret(rows: list[dict], variants: list[str], cost, tie_order) -> list[dict]:
    """Candidates ranked by minimax regret, best first: a cell is (dataset, model, attack), a
    candidate's regret there the best candidate's AUROC minus its own; the smallest largest regret
    wins, candidates within 0.01 of it are ordered by ``tie_order`` (a sort key over the row),
    the rest by their regret. ``cost(variant)`` fills the row's ``components`` column."""
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["variant"] in variants and r["auroc"] is not None:
            table.setdefault((r["dataset"], r["model"], r["attack"]), {})[r["variant"]] = r["auroc"]
    cells = {k: v for k, v in table.items() if len(v) == len(variants)}  # cells every candidate was scored on
    out = []
    for v in variants:
        regrets = {k: max(c.values()) - c[v] for k, c in cells.items()}
        worst_cell = max(regrets, key=regrets.get)
        aurocs = [c[v] for c in cells.values()]
        out.append({"variant": v, "max_regret": regrets[worst_cell], "at": " ".join(worst_cell),
                    "mean_auroc": float(np.mean(aurocs)), "worst_auroc": min(aurocs), "components": cost(v)})
    best = min(o["max_regret"] for o in out)
    tied = [o for o in out if o["max_regret"] <= best + 0.01]
    rest = [o for o in out if o["max_regret"] > best + 0.01]
    return sorted(tied, key=tie_order) + sorted(rest, key=lambda o: o["max_regret"])


def apply_regret_rule(rows: list[dict]) -> list[dict]:
    """The second rule of docs/detectors.md (minimax regret), best first: ties within 0.01 go to
    the higher mean AUROC over all cells, then to fewer components."""
    return minimax_regret(rows, _candidates(rows), lambda v: _n_components(rows, v),
                           lambda o: (-o["mean_auroc"], o["components"]))


def apply_union_rule(rows: list[dict]) -> list[dict]:
    """The fourth rule of docs/detectors.md (the union's default parts), best first: minimax regret
    among the unions (the single detectors are references); ties within 0.01 of the smallest
    largest regret go to fewer extra forward passes, then the higher mean AUROC."""
    first = {r["variant"]: r for r in reversed(rows)}
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if "," in first[v]["components"]]
    return minimax_regret(rows, variants, lambda v: first[v]["extra_passes"],
                           lambda o: (o["components"], -o["mean_auroc"]))


def apply_units_rule(rows: list[dict], margin: float = 0.01, fpr_tolerance: float = 0.02,
                     target_fpr: float = 0.05) -> dict:
    """The third rule of docs/detectors.md: ``held-out`` units become the default only if their largest
    AUROC deficit to ``fit`` (over every cell) is smaller than fit's largest deficit to them by more than
    ``margin``, and their realised test FPR is within ``fpr_tolerance`` of the target on every grid."""
    fit, held = "default, units fit", "default, units held-out"
    table: dict[tuple, dict[str, float]] = {}
    fprs: dict[tuple, float] = {}
    for r in rows:
        if r["variant"] in (fit, held) and r["auroc"] is not None:
            table.setdefault((r["dataset"], r["model"], r["attack"]), {})[r["variant"]] = r["auroc"]
        if r["variant"] == held:
            fprs[(r["dataset"], r["model"])] = r["realised_fpr"]
    cells = {k: v for k, v in table.items() if len(v) == 2}
    deficit = {v: {k: max(c.values()) - c[v] for k, c in cells.items()} for v in (fit, held)}
    worst = {v: max(d, key=d.get) for v, d in deficit.items()}
    fpr_ok = all(abs(f - target_fpr) <= fpr_tolerance for f in fprs.values())
    adopt = deficit[held][worst[held]] < deficit[fit][worst[fit]] - margin and fpr_ok
    return {"deficit": {v: (deficit[v][worst[v]], " ".join(worst[v])) for v in (fit, held)},
            "held_out_fpr": fprs, "fpr_ok": fpr_ok, "adopt_held_out": adopt, "cells": len(cells),
            "wins": {v: sum(1 for c in cells.values() if c[v] > min(c.values())) for v in (fit, held)}}


def summarise(paths: list[str], rule: str = "regret") -> None:
    rows = [r for p in paths for r in json.loads(Path(p).read_text())]
    grid = sorted({(r["dataset"], r["model"]) for r in rows})
    print(f"# the {rule} rule over {len(grid)} dataset x model grids: {', '.join(' '.join(g) for g in grid)}")
    if rule == "units":
        o = apply_units_rule(rows)
        print(f"cells: {o['cells']}; cells each candidate is strictly better in: {o['wins']}")
        for v, (d, at) in o["deficit"].items():
            print(f"- {v}: largest AUROC deficit to the other {d:.3f} at {at}")
        print("- held-out realised test FPR per grid: "
              + ", ".join(f"{' '.join(k)} {f:.3f}" for k, f in sorted(o["held_out_fpr"].items()))
              + f" (all within 0.02 of 0.05: {o['fpr_ok']})")
        print(f"decision: {'held-out units become the default' if o['adopt_held_out'] else 'fit units stay the default'}")
        return
    if rule == "worst":
        print("| rank | variant | worst AUROC | worst detection rate | components |")
        print("|---|---|---|---|---|")
        for i, (v, a, t, n) in enumerate(apply_rule(rows), 1):
            print(f"| {i} | {v} | {a:.3f} | {t:.2f} | {n} |")
        return
    # "votes" (the sixth rule) is the second rule over the sixth question's candidates
    ranked = apply_union_rule(rows) if rule == "union" else apply_regret_rule(rows)
    last = "extra forward passes" if rule == "union" else "components"
    print(f"| rank | variant | largest regret | at | mean AUROC | worst AUROC | {last} |")
    print("|---|---|---|---|---|---|---|")
    for i, o in enumerate(ranked, 1):
        print(f"| {i} | {o['variant']} | {o['max_regret']:.3f} | {o['at']} | {o['mean_auroc']:.3f} | "
              f"{o['worst_auroc']:.3f} | {o['components']} |")


def main(argv: list[str] | None = None) -> list[dict]:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--summarise":
        # benchmarks/detector_variants.py --summarise [--rule worst|regret] a.json b.json
        rest = sys.argv[2:]
        rule = "regret"
        if rest[:1] == ["--rule"]:
            rule, rest = rest[1], rest[2:]
        summarise(rest, rule)
        return []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=sorted(SWEEP))
    p.add_argument("--data-root", default=None)
    p.add_argument("--csg", required=True, help="CSG run directory")
    p.add_argument("--std", default=None, help="STD twin run directory")
    p.add_argument("--limit", type=int, default=1000, help="test images to evaluate on")
    p.add_argument("--test-rows", choices=("head", "tail"), default="head",
                   help="which end of the seeded test order to evaluate on (tail: disjoint from the harness's)")
    p.add_argument("--fit-limit", type=int, default=20000, help="at most this many training images to fit on")
    p.add_argument("--eps", default=None, help="Linf budgets, e.g. 0.05,0.1 or 2/255,8/255")
    p.add_argument("--cache", default="runs/study/variants")
    p.add_argument("--only", choices=("CSG", "STD"), default=None,
                   help="study one model of the pair (two processes, one per model, each on its own core)")
    p.add_argument("--json", default=None)
    p.add_argument("--study", choices=("variants", "units", "union", "votes"), default="variants",
                   help="variants: the second choice's candidates and the component ablation; units: the "
                        "third question (the default with fit vs held-out units); union: the fourth "
                        "(the union's default parts); votes: the sixth (the layers' class votes)")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    rows = study_model("CSG", args.csg, args, log) if args.only in (None, "CSG") else []
    if args.std and args.only in (None, "STD"):
        rows += study_model("STD", args.std, args, log)
    print(f"# detector variants on {args.dataset}")
    print(f"command: {command_line()}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"{time.perf_counter() - t0:.0f}s")
    print_tables(rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

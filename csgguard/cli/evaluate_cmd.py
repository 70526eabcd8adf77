"""``csgguard evaluate``: the honest benchmark (CSG vs STD vs same-harness baselines)."""

from __future__ import annotations

import contextlib

import click

from ..errors import CsgguardError
from ..progress import log
from ..shipped import refuse_shipped_output
from . import main
from .common import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    compile_option,
    device_option,
    emit_mapping,
    emit_rows,
    format_option,
    parse_budget_list,
    parse_fraction,
    progress_option,
    run_option,
)

# = csgguard.evaluate.DEFAULT_ATTACKS / DEFAULT_DETECTORS / DEFAULT_SUPERVISED_ON, kept here so --help does
# not import torch (tests/test_structure.py checks they agree)
DEFAULT_ATTACKS = ("fgsm", "pgd", "bim", "pgd-l2", "cw", "deepfool")
DEFAULT_DETECTORS = ("csg-clean", "csg-supervised", "mahalanobis", "lid", "kd-bu", "feature-squeezing", "noise-response")
DEFAULT_SUPERVISED_ON = ("fgsm", "pgd")


def _names(value: str, what: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if not names:
        raise CsgguardError(f"--{what} is empty; give a comma-separated list")
    return names


@main.command("evaluate")
@run_option
@click.option("--compare-run", type=click.Path(file_okay=False), default=None,
              help="The STD twin's run directory: evaluated on the same images, reported beside the CSG model.")
@click.option("--attacks", default=",".join(DEFAULT_ATTACKS), show_default=True,
              help="Comma-separated: fgsm, pgd, bim (Linf, every --eps), pgd-l2, bim-l2 (L2, every --l2-eps), "
                   "cw, deepfool (minimum-norm, once); NAME@BUDGET (pgd@8/255) for one budget only.")
@click.option("--detectors", default=",".join(DEFAULT_DETECTORS), show_default=True,
              help="Comma-separated detector names; 'saved' adds each run's own detector, the one `csgguard fit` "
                   "saved and `csgguard screen` uses, measured as it is (not refitted, its own threshold).")
@click.option("--fpr", default="0.05", show_default=True, help="Target false-positive rate of the fixed threshold.")
@click.option("--limit", type=POSITIVE_INT, default=None, help="Use this many test images (split into fit/calibration/evaluation).")
@click.option("--eps", default=None, metavar="LIST",
              help="Linf budgets of fgsm/pgd/bim and the adaptive attack, in (0, 1], e.g. 0.05,0.1 or 2/255,8/255 "
                   "(default per dataset: digits/MNIST 0.05,0.1,0.2,0.3; CIFAR-10 2/255,4/255,8/255,16/255).")
@click.option("--l2-eps", default=None, metavar="LIST",
              help="L2 budgets of pgd-l2/bim-l2, > 0 (default per dataset: digits 0.5,1,1.5; MNIST 0.5,1,2; "
                   "CIFAR-10 0.25,0.5,1).")
@click.option("--supervised-on", default=",".join(DEFAULT_SUPERVISED_ON), show_default=True,
              help="Attacks (every budget) or cells (pgd@0.1) supervised detectors are fitted on, on the fit split; "
                   "every other cell is unseen.")
@click.option("--adaptive/--no-adaptive", default=True, show_default=True,
              help="Also run the adaptive attack (classifier + detector together) at every Linf budget "
                   "(or those of --adaptive-eps).")
@click.option("--adaptive-eps", default=None, metavar="LIST",
              help="Linf budgets of the adaptive attack only, e.g. 2/255 (default: those of --eps). On natural "
                   "images the adaptive attack is the slow part of a sweep.")
@click.option("--adaptive-targets", default=None, metavar="LIST|all",
              help="Detectors the adaptive attack is aimed at, each through its own differentiable score "
                   "(csg-clean, csg-robust, mahalanobis, noise-response; 'all': every evaluated one that has such a score; "
                   "default csg-clean). The others are scored on the attack aimed at the first target, marked "
                   "as transfer.")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True, help="Fixes the splits and the attacks' randomness.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Report folder (default RUN/evaluation): report.json, report.md, curve_*.png, roc_*.png, "
                   "gate_heatmap.png.")
@click.option("--data-root", type=click.Path(), default=None, help="Dataset root, for mnist / cifar10 runs.")
@device_option
@compile_option("the foolbox attacks' steps", "CIFAR-10 ResNet-20 PGD on a 1-thread AVX2 CPU: "
                "benchmarks/attack_compile.py; the adaptive attack and the detectors stay eager")
@format_option()
@progress_option
def evaluate_command(run_dir, compare_run, attacks, detectors, fpr, limit, eps, l2_eps, supervised_on, adaptive,
                     adaptive_eps, adaptive_targets, seed, out, data_root, device, torch_compile, fmt, progress):
    """Measure detection honestly: disjoint splits, one fixed threshold, a budget sweep, unseen and adaptive attacks.

    Splits the test data once into fit / calibration / evaluation parts, attacks the
    correctly classified images at every budget of the sweep, fits every detector,
    fixes each threshold on all clean calibration images (as `csgguard fit` does) and
    reports AUROC, TPR at 5% and 1% FPR, the realised FPR and the attack success rate
    per detector, attack and budget, for the CSG model and (with --compare-run) its STD
    twin; robustness curves per attack. See docs/evaluation.md.

    \b
    Examples:
      csgguard evaluate --run runs/csg --compare-run runs/std
      csgguard evaluate --attacks pgd,pgd-l2 --eps 2/255,8/255 --l2-eps 0.5,1
      csgguard evaluate --detectors saved,mahalanobis   (the detector `fit` saved)
    """
    from pathlib import Path

    from ..artifacts import check_output_dir, folder_lock
    from ..evaluate import evaluate
    from ..report import SUMMARY_COLUMNS, summary_rows

    # every value is checked before anything is loaded: a bad request costs nothing
    attack_names, detector_names = _names(attacks, "attacks"), _names(detectors, "detectors")
    fpr_value = parse_fraction(fpr, "--fpr", example="1/20")
    if not 0.0 < fpr_value < 1.0:
        raise CsgguardError(f"--fpr must be between 0 and 1, got {fpr}")
    eps_list, l2_list = parse_budget_list(eps, "--eps"), parse_budget_list(l2_eps, "--l2-eps")
    adaptive_list = parse_budget_list(adaptive_eps, "--adaptive-eps")
    if out is None:
        refuse_shipped_output(run_dir, "--out DIR")
    out_dir = Path(out) if out is not None else Path(run_dir) / "evaluation"
    check_output_dir(out_dir, "--out")
    created = not out_dir.exists()
    try:
        with folder_lock(out_dir, "evaluate"):
            report = evaluate(run_dir, compare_run=compare_run, attacks=attack_names, detectors=detector_names,
                              fpr=fpr_value, limit=limit, seed=seed, device=device,
                              supervised_on=_names(supervised_on, "supervised-on"), adaptive=adaptive, out=out,
                              adaptive_targets=None if adaptive_targets is None
                              else _names(adaptive_targets, "adaptive-targets"),
                              eps=eps_list, l2_eps=l2_list, adaptive_eps=adaptive_list, data_root=data_root,
                              progress=progress, compile=torch_compile)
    except BaseException:
        if created:  # a refused request (unknown name, too few images, other classes) leaves no empty folder
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only succeeds while empty
        raise
    log(f"report: {report['out']}/report.md")
    for e in report["errors"]:
        log(f"note: {e}")
    if fmt == "json":
        emit_mapping(report, "json")
        return
    emit_rows(summary_rows(report), SUMMARY_COLUMNS, fmt, title=f"evaluate {run_dir}")  # table or csv

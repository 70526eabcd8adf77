"""``csgguard evaluate``: the honest benchmark (CSG vs STD vs same-harness baselines)."""

from __future__ import annotations

import click

from ..errors import CsgguardError
from ..progress import log
from . import main
from .common import (
    device_option,
    emit_mapping,
    emit_rows,
    format_option,
    parse_fraction,
    progress_option,
    run_option,
)

# = csgguard.evaluate.DEFAULT_ATTACKS / DEFAULT_DETECTORS, kept here so --help does not import torch
# (tests/test_structure.py checks they agree)
DEFAULT_ATTACKS = ("fgsm", "pgd", "cw", "deepfool")
DEFAULT_DETECTORS = ("csg-clean", "csg-supervised", "mahalanobis", "lid", "kd-bu", "feature-squeezing")


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
              help="Comma-separated: fgsm, pgd, bim, cw, deepfool.")
@click.option("--detectors", default=",".join(DEFAULT_DETECTORS), show_default=True,
              help="Comma-separated detector names.")
@click.option("--fpr", default="0.05", show_default=True, help="Target false-positive rate of the fixed threshold.")
@click.option("--limit", type=int, default=None, help="Use this many test images (split into fit/calibration/evaluation).")
@click.option("--eps", default=None, help="Linf budget of fgsm/pgd/bim and the adaptive attack, e.g. 0.1 or 8/255 "
                                          "(default per dataset).")
@click.option("--supervised-on", default="fgsm", show_default=True,
              help="The attack supervised detectors are fitted on; every other attack is unseen.")
@click.option("--adaptive/--no-adaptive", default=True, show_default=True,
              help="Also run PGD against classifier + csg-clean detector together.")
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes the splits and the attacks' randomness.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Report folder (default RUN/evaluation): report.json, report.md, roc_*.png, gate_heatmap.png.")
@click.option("--data-root", type=click.Path(), default=None, help="Dataset root, for mnist / cifar10 runs.")
@device_option
@format_option(("table", "json"))
@progress_option
def evaluate_command(run_dir, compare_run, attacks, detectors, fpr, limit, eps, supervised_on, adaptive, seed, out,
                     data_root, device, fmt, progress):
    """Measure detection honestly: disjoint splits, one fixed threshold, unseen and adaptive attacks.

    Splits the test data once into fit / calibration / evaluation parts, attacks the
    correctly classified images, fits every detector, fixes each threshold on clean
    calibration data and reports AUROC, TPR at 5% and 1% FPR, the realised FPR and
    the attack success rate per detector and attack, for the CSG model and (with
    --compare-run) its STD twin. See docs/evaluation.md.
    """
    from ..evaluate import evaluate
    from ..report import SUMMARY_COLUMNS, summary_rows

    report = evaluate(run_dir, compare_run=compare_run, attacks=_names(attacks, "attacks"),
                      detectors=_names(detectors, "detectors"), fpr=parse_fraction(fpr, "--fpr"), limit=limit,
                      seed=seed, device=device, supervised_on=supervised_on, adaptive=adaptive, out=out,
                      eps=None if eps is None else parse_fraction(eps, "--eps"), data_root=data_root,
                      progress=progress)
    log(f"report: {report['out']}/report.md")
    for e in report["errors"]:
        log(f"note: {e}")
    if fmt == "json":
        emit_mapping(report, "json")
        return
    emit_rows(summary_rows(report), SUMMARY_COLUMNS, "table", title=f"evaluate {run_dir}")

"""``csgguard fit``: fit a detector on the run's train split, calibrate it on val, save it beside the model."""

from __future__ import annotations

import json

import click

from ..errors import CsgguardError
from ..progress import log
from . import main
from .common import (
    device_option,
    emit_mapping,
    format_option,
    parse_fraction,
    progress_option,
    run_option,
)


@main.command("fit")
@run_option
@click.option("--detector", default="csg-clean", show_default=True,
              help="csg-clean (clean-only, attack-agnostic) or csg-supervised (clean vs --attacks); "
                   "also any array-only baseline (mahalanobis, lid, kd-bu).")
@click.option("--attacks", default="pgd,fgsm", show_default=True,
              help="Attacks generated on train-split images for a supervised detector (comma-separated).")
@click.option("--eps", default=None, help="Attack budget in [0,1] pixel units, e.g. 0.1 or 8/255 "
                                          "(default: the attacks' per-dataset default).")
@click.option("--fpr", type=float, default=0.05, show_default=True,
              help="Target false-positive rate; the threshold is set on the clean val split.")
@click.option("--limit", type=int, default=None, help="Use only the first N train images (faster fits).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Detector parameter, e.g. --param score=combined (JSON values allowed); repeatable.")
@click.option("--data-root", type=click.Path(), default=None,
              help="Dataset root, when the run was trained on mnist/cifar10.")
@click.option("--out", type=click.Path(), default=None,
              help="Detector file (X.json -> X.json + X.safetensors) or folder; default the run directory.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@format_option()
@progress_option
def fit_command(run_dir, detector, attacks, eps, fpr, limit, params, data_root, out, batch_size, seed, device,
                fmt, progress):
    """Fit a gate-pattern detector and calibrate its threshold.

    \b
    Split policy: clean statistics (and a supervised detector's adversarial
    examples) come from the model's TRAIN split; the threshold is set on the
    held-out VAL split at --fpr; the TEST split is left for `csgguard evaluate`.

    \b
    Examples:
      csgguard fit                                          # csg-clean into runs/default
      csgguard fit --detector csg-supervised --attacks fgsm --eps 0.1
      csgguard fit --run runs/std --param score=combined --out runs/std/combined.json
    """
    parsed = {}
    for item in params:
        if "=" not in item:
            raise CsgguardError(f"--param {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    from ..fitting import fit_detector

    result = fit_detector(run_dir, detector=detector, attacks=attacks.split(","),
                          eps=parse_fraction(eps, "--eps") if eps is not None else None, fpr=fpr, limit=limit,
                          params=parsed, device=device, data_root=data_root, out=out, batch_size=batch_size,
                          seed=seed, progress=progress, log=log)
    log(f"wrote {result.path} (+ arrays); threshold {result.summary['threshold']:.4g} at target FPR {fpr:g}, "
        f"realised {result.summary['realised_fpr_val']:.3f} on {result.summary['calibration']} clean val images")
    emit_mapping(result.summary, fmt, title="detector fit")

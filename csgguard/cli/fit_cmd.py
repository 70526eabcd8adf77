"""``csgguard fit``: fit a detector on the run's train split, calibrate it on val, save it beside the model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from ..errors import CsgguardError
from ..progress import log
from ..shipped import refuse_shipped_output
from ..sweep import parse_fraction
from . import main
from .common import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    FiniteFloat,
    device_option,
    emit_mapping,
    format_option,
    parse_budget_list,
    progress_option,
    run_option,
)


@main.command("fit")
@run_option
@click.option("--detector", default="csg-clean", show_default=True,
              help="csg-clean (clean-only, attack-agnostic), csg-supervised (clean vs --attacks), csg-robust "
                   "(trained against attacks on itself) or union (csg-clean and feature squeezing flagging "
                   "together, --param parts=A,B; three extra forward passes per screened image), noise-response "
                   "(how the logits move under random noise, --param sigma=4/255; eight extra passes); also any "
                   "baseline (mahalanobis, lid, kd-bu, feature-squeezing).")
@click.option("--attacks", default="pgd,fgsm", show_default=True,
              help="Attacks generated on train-split images for a supervised detector (comma-separated): fgsm, "
                   "pgd, bim (every --eps), pgd-l2, bim-l2 (every --l2-eps), cw, deepfool; NAME@BUDGET for one.")
@click.option("--eps", default=None, metavar="LIST",
              help="Linf budgets in (0, 1] pixel units, e.g. 0.05,0.1 or 2/255,8/255 (default: the dataset's "
                   "sweep, as `csgguard evaluate`).")
@click.option("--l2-eps", default=None, metavar="LIST", help="L2 budgets (> 0) of pgd-l2 / bim-l2 (default: the "
                                                             "dataset's sweep).")
@click.option("--fpr", type=FiniteFloat(0.0, 1.0, low_open=True, high_open=True), default=0.05, show_default=True,
              help="Target false-positive rate; the threshold is set on the clean val split.")
@click.option("--limit", type=POSITIVE_INT, default=None, help="Use only the first N train images (faster fits).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE",
              help="Detector parameter, e.g. --param combine=sum (JSON values and fractions like 4/255 "
                   "allowed); repeatable.")
@click.option("--data-root", type=click.Path(), default=None,
              help="Dataset root, when the run was trained on mnist/cifar10.")
@click.option("--out", type=click.Path(), default=None,
              help="Detector file (X.json -> X.json + X.safetensors) or folder; default the run directory.")
@click.option("--batch-size", type=POSITIVE_INT, default=256, show_default=True)
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@device_option
@format_option()
@progress_option
def fit_command(run_dir, detector, attacks, eps, l2_eps, fpr, limit, params, data_root, out, batch_size, seed, device,
                fmt, progress):
    """Fit a gate-pattern detector and calibrate its threshold.

    \b
    Split policy: clean statistics (and a supervised detector's adversarial
    examples) come from the model's TRAIN split; the threshold is set on the
    held-out VAL split at --fpr (every clean val image, misclassified ones
    included); the TEST split is left for `csgguard evaluate`.

    \b
    Examples:
      csgguard fit                                          # csg-clean into runs/default
      csgguard fit --detector csg-supervised --attacks fgsm --eps 0.1
      csgguard fit --detector csg-supervised --attacks fgsm,pgd,pgd-l2 --eps 0.05,0.1,0.2 --l2-eps 1
      csgguard fit --run runs/std --param combine=sum --out runs/std/sum.json
      csgguard fit --run cifar10-resnet20-csg --detector union --out my/union.json  # + feature squeezing
      csgguard fit --run cifar10-resnet20-csg --detector noise-response --param sigma=4/255 --out my/noise.json
    """
    from ..artifacts import check_output_dir, check_output_file, folder_lock

    parsed = _parse_params(detector, params)
    eps_list, l2_list = parse_budget_list(eps, "--eps"), parse_budget_list(l2_eps, "--l2-eps")
    if out is not None and Path(out).suffix in (".json", ".safetensors"):
        from ..detectors.store import detector_paths

        for path in detector_paths(out):  # the manifest and its arrays, before any work
            check_output_file(path, "--out")
        out_dir = Path(out).parent
    else:
        if out is None:
            refuse_shipped_output(run_dir, "--out DIR or --out FILE.json")
        out_dir = Path(out) if out is not None else Path(run_dir)
        check_output_dir(out_dir, "--out")
    with folder_lock(out_dir, "fit"):
        _fit(run_dir, detector, attacks, eps_list, l2_list, fpr, limit, parsed, data_root, out, batch_size, seed,
             device, fmt, progress)


def _parse_params(detector: str, params) -> dict:
    """--param KEY=VALUE pairs, checked against the detector's parameters before any work."""
    import inspect

    from ..artifacts import parse_json
    from ..detectors import detector_class

    cls = detector_class(detector)
    known = [k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "fpr")]
    parsed = {}
    for item in params:
        if "=" not in item:
            raise CsgguardError(f"--param {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        if key not in known:
            raise CsgguardError(f"--param {key}: detector {detector!r} has no such parameter; "
                                f"it takes {', '.join(known) or 'none'}")
        if key in parsed:  # the last one winning silently hides a typo in a long command
            raise CsgguardError(f"--param {key} is given twice; give each parameter once")
        try:
            parsed[key] = parse_json(value)
        except json.JSONDecodeError:
            parsed[key] = value
            if re.fullmatch(r"\s*\d+(\.\d*)?\s*/\s*\d+(\.\d*)?\s*", value):  # a fraction: sigma=4/255
                parsed[key] = parse_fraction(value, f"--param {key}", example="4/255")
        except ValueError as exc:
            raise CsgguardError(f"--param {item}: {exc}") from None
    try:
        cls(**parsed).validate_params()  # __init__ only stores (scikit-learn contract): check here, before any work
    except CsgguardError:
        raise
    except (TypeError, ValueError) as exc:
        raise CsgguardError(f"--param: {exc}") from None
    return parsed


def _fit(run_dir, detector, attacks, eps_list, l2_list, fpr, limit, parsed, data_root, out, batch_size, seed, device,
         fmt, progress):
    from ..fitting import fit_detector

    result = fit_detector(run_dir, detector=detector, attacks=attacks.split(","),
                          eps=eps_list, l2_eps=l2_list, fpr=fpr, limit=limit,
                          params=parsed, device=device, data_root=data_root, out=out, batch_size=batch_size,
                          seed=seed, progress=progress, log=log)
    log(f"wrote {result.path} (+ arrays); threshold {result.summary['threshold']:.4g} at target FPR {fpr:g}, "
        f"realised {result.summary['realised_fpr_val']:.3f} on {result.summary['calibration']} clean val images")
    emit_mapping(result.summary, fmt, title="detector fit")

"""``csgguard attack``: run a foolbox attack on a run's split and save the adversarial set."""

from __future__ import annotations

from pathlib import Path

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
    format_option,
    parse_fraction,
    progress_option,
    run_option,
)

METHODS = ("fgsm", "bim", "pgd", "cw", "deepfool", "adaptive", "adaptive-FORM")


@main.command("attack")
@click.option("--method", default="pgd", show_default=True, help=f"Attack: {', '.join(METHODS)}.")
@click.option("--eps", default=None, help="Budget in pixel units of [0, 1] images: Linf in (0, 1], e.g. 8/255 "
                                          "or 0.1; L2 any positive norm, e.g. 1.5 (default per dataset; not for "
                                          "cw/deepfool).")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default=None,
              help="Threat model (default: linf; l2 for cw and deepfool).")
@click.option("--steps", type=POSITIVE_INT, default=None, help="Iterations (bim 10, pgd 40, deepfool 50, cw per preset).")
@click.option("--restarts", type=POSITIVE_INT, default=None, help="pgd: tries per input in all; inputs still not adversarial get a fresh random start (default 1).")
@click.option("--preset", type=click.Choice(["fast", "thorough"]), default=None,
              help="cw: fast (3 searches x 25-50 steps, default) or thorough (6 x 150 steps); the step size and "
                   "constant follow the image family (docs/attacks.md), recorded in the set's sidecar.")
@run_option
@click.option("--data-root", type=click.Path(), default=None,
              help="Dataset root (default: the one the model was trained on).")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--limit", type=POSITIVE_INT, default=None, help="Attack only the first N images of the split.")
@click.option("--batch-size", type=POSITIVE_INT, default=256, show_default=True)
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@device_option
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Adversarial-set file (default RUN/attacks/<method>-<norm>-<eps|preset>-<split>.npz); "
                   "a sidecar FILE.json holds the metadata.")
@click.option("--save-images", type=click.Path(file_okay=False), default=None,
              help="Also write adversarial images as 8-bit PNG: DIR/<index>_true<y>_adv<pred>.png; only those "
                   "still adversarial after rounding to 8 bits are written (the others are counted as dropped).")
@compile_option("the attack's steps", "CIFAR-10 ResNet-20 PGD on a 1-thread AVX2 CPU: "
                "benchmarks/attack_compile.py; the adaptive attack stays eager")
@format_option()
@progress_option
def attack_command(method, eps, norm, steps, restarts, preset, run_dir, data_root, split, limit, batch_size, seed,
                   device, out, save_images, torch_compile, fmt, progress):
    """Make adversarial examples for a trained model with foolbox.

    Only test images the model classifies correctly are attacked; a success is
    counted only when foolbox reports it and re-predicting the image confirms it.

    \b
    Examples:
      csgguard attack --method pgd --eps 0.1                 # digits default run
      csgguard attack --method pgd --norm l2 --eps 1.0 --restarts 3
      csgguard attack --method cw --preset fast --limit 256
      csgguard attack --method adaptive --eps 0.1   # vs the run's fitted detector (adaptive-margin, ...)
      csgguard attack --method fgsm --eps 8/255 --run runs/cifar --save-images adv_png/
    """
    from ..artifacts import check_output_dir, check_output_file, folder_lock
    from ..attacks import make_attack

    eps_value = parse_fraction(eps, "--eps") if eps is not None else None
    settings = {"restarts": restarts, "preset": preset}
    spec = make_attack(method, norm=norm, steps=steps, **settings)  # fail fast on a bad request
    spec.resolve_eps(eps_value)

    if out is not None and Path(out).is_dir():
        raise CsgguardError(f"--out {out}: is a directory; give a file name such as {out}/{method}.npz")
    if not out:
        refuse_shipped_output(run_dir, "--out FILE.npz")
    out_dir = Path(out).parent if out else Path(run_dir) / "attacks"
    if out is not None:
        from ..attacks.advset import sidecar_path

        check_output_file(out, "--out")
        check_output_file(sidecar_path(out), "--out's sidecar")  # both files of the pair, before any work
    else:
        check_output_dir(out_dir, "--out")
    if save_images:
        check_output_dir(save_images, "--save-images")
    with folder_lock(out_dir, "attack"):
        _attack(spec, run_dir, split, limit, data_root, eps_value, batch_size, seed, device, progress, out,
                save_images, fmt, torch_compile)


def _attack(spec, run_dir, split, limit, data_root, eps_value, batch_size, seed, device, progress, out, save_images,
            fmt, torch_compile=False):
    from ..artifacts import StagedWrites
    from ..attacks import (
        attack_run_split,
        default_output_path,
        save_adversarial_images,
        save_adversarial_set,
    )

    advset = attack_run_split(run_dir, split, spec, limit=limit, data_root=data_root, eps=eps_value,
                              batch_size=batch_size, seed=seed, device=device, progress=progress,
                              compile=torch_compile)
    meta = advset.meta
    images = None
    # the PNGs are staged beside their folder first and renamed into place only once the set they were
    # cut from is written: a failure in either leaves no PNG of this call behind
    with StagedWrites() as stage:
        if save_images:
            from ..devices import select_device
            from ..models.store import load_model

            model = load_model(run_dir, select_device(device)).model
            images = save_adversarial_images(advset, save_images, model, batch_size=batch_size, stage=stage)
        path = save_adversarial_set(Path(out) if out else default_output_path(run_dir, meta), advset)
    log(f"wrote {path} and {path.name}.json")

    pert = meta["perturbation"]
    summary = {
        "attack": meta["attack"], "norm": meta["norm"], "eps": meta["eps"], "split": split,
        "total": meta["total"], "attacked": meta["attacked"], "succeeded": meta["succeeded"],
        "success_rate": meta["success_rate"],
        f"median_{meta['norm']}": pert["median"], f"max_{meta['norm']}": pert["max"],
        "seconds": meta["seconds"], "images_per_second": meta["images_per_second"], "out": str(path),
    }
    if images is not None:
        summary.update(images)
        summary["images_dir"] = str(save_images)
        log(f"wrote {summary['png_written']} PNG files to {save_images} (still adversarial after 8-bit rounding); "
            f"dropped {summary['png_dropped']} that rounding turned back into correct predictions")
    if fmt == "json":
        emit_mapping({**summary, "settings": meta["settings"], "perturbation": pert}, "json")
    else:  # table, or csv: the summary as one row
        emit_mapping(summary, fmt, title=f"{meta['attack']} on {run_dir} ({split})")

"""``csgguard train``: train a CSG CNN or its STD twin and write a run directory."""

from __future__ import annotations

import click

from ..progress import log
from . import main
from .common import device_option, emit_mapping, format_option, progress_option

DATASET_NAMES = ("digits", "mnist", "cifar10", "imagefolder:PATH")  # = csgguard.data.DATASET_NAMES (a test checks)


def data_options(f):
    f = click.option("--data-root", type=click.Path(), default=None,
                     help="Directory holding the dataset files (mnist, cifar10); env CSGGUARD_DATA_ROOT.")(f)
    f = click.option("--data", default="digits", show_default=True,
                     help=f"Dataset: {', '.join(DATASET_NAMES)}.")(f)
    return f


@main.command("train")
@data_options
@click.option("--out", type=click.Path(file_okay=False), default="runs/default", show_default=True,
              help="Run directory to write (model.safetensors, model.json, metrics.jsonl, summary.json).")
@click.option("--arch", default=None, help="Backbone: small_cnn, resnet20, resnet32, resnet18, resnet50 "
                                           "(default per dataset).")
@click.option("--width", type=int, default=None, help="Filters K in the gated layer (backbone default).")
@click.option("--gate/--no-gate", default=True, show_default=True,
              help="--no-gate trains the STD baseline (same network, STD path only).")
@click.option("--epochs", type=int, default=None, help="Epochs (default per dataset: digits 30, mnist 6, cifar10 40).")
@click.option("--batch-size", type=int, default=None)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None)
@click.option("--lr", type=float, default=None, help="STD-path learning rate.")
@click.option("--csg-lr", type=float, default=None, help="CSG-path learning rate (network weights).")
@click.option("--gate-lr", type=float, default=None, help="Learning rate of the gate (Adam).")
@click.option("--weight-decay", type=float, default=None)
@click.option("--lr-schedule", type=click.Choice(["step", "cosine"]), default=None,
              help="step: x0.1 at 40/60/80% of the epochs; cosine: per-step cosine to 0 after a linear "
                   "warm-up (default per dataset: cifar10 cosine, others step).")
@click.option("--lr-warmup-epochs", type=float, default=None, help="Linear LR warm-up length (cosine only).")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True,
              help="Label smoothing of every cross-entropy (0 keeps logits unsquashed for the detectors).")
@click.option("--schedule", type=click.Choice(["alternate", "joint"]), default="alternate", show_default=True,
              help="alternate: per-epoch STD/CSG alternation (reference); joint: summed losses every step.")
@click.option("--warmup", type=int, default=None, help="STD-only epochs before the alternation starts.")
@click.option("--period", type=int, default=None, help="Alternation period in epochs.")
@click.option("--csg-from", type=int, default=None, help="An epoch is CSG when epoch %% period >= this (m).")
@click.option("--density", type=float, default=0.2, show_default=True, help="Target gate L1-density d.")
@click.option("--lam", type=float, default=1e-3, show_default=True, help="Sparsity hinge weight lambda.")
@click.option("--augment/--no-augment", default=None, help="Random crop + flip (default on for cifar10).")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast (+ channels-last) where the device runs bf16 natively: CUDA, or a CPU "
                   "with AVX512-BF16/AMX; a no-op elsewhere.")
@click.option("--sync-bn", is_flag=True, help="Under torchrun: BatchNorm statistics over the global batch "
                                              "(SyncBatchNorm, CUDA only).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its checkpoint.")
@format_option()
@progress_option
def train_command(data, data_root, out, arch, width, gate, epochs, batch_size, optimizer, lr, csg_lr, gate_lr,
                  weight_decay, lr_schedule, lr_warmup_epochs, label_smoothing, schedule, warmup, period, csg_from, density, lam, augment, seed, device, amp,
                  sync_bn, resume, fmt, progress):
    """Train a CNN with a Class-Specific Gate (or the STD baseline with --no-gate).

    \b
    Examples:
      csgguard train                                   # digits, CSG, runs/default
      csgguard train --no-gate --out runs/std          # the STD twin
      csgguard train --data mnist --data-root ~/data/mnist --out runs/mnist
      csgguard train --out runs/mnist --resume         # after an interruption
      torchrun --nproc_per_node 4 -m csgguard train --data cifar10 --data-root DIR --out runs/c10
                                                       # data-parallel on 4 GPUs (rank 0 writes --out)

    Prints the summary (test_accuracy, gate_density, mis, epochs, seconds).
    """
    from ..distributed import is_main_process
    from ..train import TrainConfig, train

    cfg = TrainConfig(data=data, data_root=data_root, arch=arch, width=width, gate=gate, epochs=epochs,
                      batch_size=batch_size, optimizer=optimizer, lr=lr, csg_lr=csg_lr, gate_lr=gate_lr,
                      weight_decay=weight_decay, lr_schedule=lr_schedule, lr_warmup_epochs=lr_warmup_epochs,
                      label_smoothing=label_smoothing, schedule=schedule, warmup=warmup, period=period,
                      csg_from=csg_from, density=density, lam=lam, augment=augment, seed=seed, device=device,
                      amp=amp, sync_bn=sync_bn)
    result = train(cfg, out, resume=resume, progress=progress, log=log)
    if not is_main_process():  # under torchrun only rank 0 reports (and wrote the run directory)
        return
    log(f"wrote {result.run_dir}/model.safetensors and model.json")
    emit_mapping({"run": str(result.run_dir), **result.summary}, fmt, title="training summary")

"""``csgguard train``: train a CSG CNN or its STD twin and write a run directory."""

from __future__ import annotations

import contextlib

import click

from ..progress import log
from . import main
from .common import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    FiniteFloat,
    compile_option,
    device_option,
    emit_mapping,
    format_option,
    progress_option,
)

POSITIVE = FiniteFloat(0.0, low_open=True)
NON_NEGATIVE = FiniteFloat(0.0)

DATASET_NAMES = ("digits", "mnist", "cifar10", "imagefolder:PATH")  # = csgguard.data.DATASET_NAMES (a test checks)


def data_options(f):
    f = click.option("--data-root", type=click.Path(), default=None,
                     help="Directory holding the dataset files (mnist, cifar10); env CSGGUARD_DATA_ROOT.")(f)
    f = click.option("--data", default="digits", show_default=True,
                     help=f"Dataset: {', '.join(DATASET_NAMES)}. An image folder (imagefolder:PATH, one "
                          "sub-folder per class, at least two classes) with train/ and test/ sub-trees uses "
                          "them; a flat tree is split 80/20 (stratified, seed 0) into train/test; 10% of "
                          "train is held out for validation either way. Symlinks leaving PATH are refused.")(f)
    return f


class _SplitFirst:
    """The training log, preceded (once the data has been read) by how an image folder was split."""

    def __init__(self, data: str) -> None:
        self.data, self.said = data, False

    def __call__(self, message: str) -> None:
        if not self.said:
            self.said = True
            _describe_split(self.data)
        log(message)


def _describe_split(data: str) -> None:
    """Say how an image folder is split (train.py's first line then gives the sizes)."""
    from pathlib import Path

    if not data.startswith("imagefolder:"):
        return
    root = Path(data.split(":", 1)[1])
    if (root / "train.tar.gz").is_file() and (root / "test.tar.gz").is_file():
        how = "train.tar.gz -> train, test.tar.gz -> test"
    elif (root / "train").is_dir() and (root / "test").is_dir():
        how = f"{root / 'train'} -> train, {root / 'test'} -> test"
    else:
        how = "flat tree: 80% train / 20% test (stratified, seed 0)"
    log(f"image-folder split: {how}; 10% of train held out as val")


@main.command("train")
@data_options
@click.option("--out", type=click.Path(file_okay=False), default="runs/default", show_default=True,
              help="Run directory to write (model.safetensors, model.json, metrics.jsonl, summary.json).")
@click.option("--arch", default=None, help="Backbone: small_cnn, resnet20, resnet32, resnet18, resnet50 "
                                           "(default per dataset; an image folder gets small_cnn and the "
                                           "mnist recipe, or the cifar10 recipe with --arch resnet20/32).")
@click.option("--width", type=POSITIVE_INT, default=None, help="Filters K in the gated layer (backbone default).")
@click.option("--gate/--no-gate", default=True, show_default=True,
              help="--no-gate trains the STD baseline (same network, STD path only).")
@click.option("--epochs", type=POSITIVE_INT, default=None, help="Epochs of the main schedule (default per dataset: digits 30, mnist 6, cifar10 200; "
                   "cifar10 then averages 30 more, --swa-epochs).")
@click.option("--batch-size", type=POSITIVE_INT, default=None)
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default=None)
@click.option("--lr", type=POSITIVE, default=None, help="STD-path learning rate.")
@click.option("--csg-lr", type=POSITIVE, default=None, help="CSG-path learning rate (network weights).")
@click.option("--gate-lr", type=POSITIVE, default=None, help="Learning rate of the gate (Adam).")
@click.option("--weight-decay", type=NON_NEGATIVE, default=None)
@click.option("--lr-schedule", type=click.Choice(["step", "cosine"]), default=None,
              help="step: x0.1 at 40/60/80% of the epochs; cosine: per-step cosine to 0 after a linear "
                   "warm-up (default per dataset: cifar10 cosine, others step).")
@click.option("--lr-warmup-epochs", type=NON_NEGATIVE, default=None, help="Linear LR warm-up length (cosine only).")
@click.option("--label-smoothing", type=FiniteFloat(0.0, 1.0, high_open=True), default=0.0, show_default=True,
              help="Label smoothing of every cross-entropy (0 keeps logits unsquashed for the detectors).")
@click.option("--schedule", type=click.Choice(["alternate", "joint"]), default="alternate", show_default=True,
              help="alternate: per-epoch STD/CSG alternation (reference); joint: both paths' losses summed every "
                   "step, so the ungated path trains in every epoch (CIFAR-10 ResNet-20: +1.2 / +1.6 points of "
                   "validation accuracy over alternate at 30-40 epochs, none at the full 230-epoch recipe).")
@click.option("--warmup", type=NON_NEGATIVE_INT, default=None, help="STD-only epochs before the alternation starts.")
@click.option("--period", type=POSITIVE_INT, default=None, help="Alternation period in epochs.")
@click.option("--csg-from", type=NON_NEGATIVE_INT, default=None, help="An epoch is CSG when epoch % period >= this (m).")
@click.option("--density", type=FiniteFloat(0.0, 1.0, low_open=True), default=0.2, show_default=True, help="Target gate L1-density d.")
@click.option("--lam", type=NON_NEGATIVE, default=1e-3, show_default=True, help="Sparsity hinge weight lambda.")
@click.option("--augment/--no-augment", default=None, help="Random crop + flip (default on for cifar10).")
@click.option("--cutout", type=NON_NEGATIVE_INT, default=None,
              help="With --augment: erase a square of this many pixels per image, 0 = off (default: 16 on cifar10, else 0).")
@click.option("--seed", type=NON_NEGATIVE_INT, default=0, show_default=True)
@device_option
@click.option("--amp/--no-amp", default=True, show_default=True, help="bf16 autocast (+ channels-last) where the device runs bf16 natively: CUDA, or a CPU "
                   "with AVX512-BF16/AMX; a no-op elsewhere.")
@compile_option("the training step", "CIFAR-10 ResNet-20 on a 1-thread AVX2 CPU: about 1.13x per epoch, "
                "benchmarks/train_speed.py --compile; --resume may add or drop it")
@click.option("--sync-bn", is_flag=True, help="Under torchrun: BatchNorm statistics over the global batch "
                                              "(SyncBatchNorm, CUDA only).")
@click.option("--train-limit", type=int, default=None,
              help="Train on the first N training images only (smoke runs, dry runs of a recipe).")
@click.option("--swa-epochs", type=NON_NEGATIVE_INT, default=None,
              help="Weight averaging: this many more epochs after the schedule, each one LR cycle, whose "
                   "end-of-epoch weights are averaged (BatchNorm re-estimated); the average is the model "
                   "(default per dataset: cifar10 30, others 0).")
@click.option("--swa-lr", type=FiniteFloat(0.0, 1.0, low_open=True), default=None,
              help="Peak of each averaging epoch's LR cycle, as a fraction of the base learning rates "
                   "(default 0.1: on CIFAR-10 it lifted accuracy, 0.5 lowered it).")
@click.option("--teacher", "teachers", multiple=True, metavar="RUN",
              help="Distil this finished run (repeat for several, a run folder or a pretrained name): the "
                   "STD path learns the teachers' averaged softened outputs beside the labels; the CSG "
                   "path keeps learning the gate from labels. Teachers must have the same classes.")
@click.option("--distill-weight", type=FiniteFloat(0.0, 1.0), default=None,
              help="With --teacher: the teachers' share of the STD-path loss (default 0.9; the rest is "
                   "cross-entropy with the labels).")
@click.option("--distill-temperature", type=POSITIVE, default=None,
              help="With --teacher: softmax temperature of the teachers' targets (default 4).")
@click.option("--extend", "extend", type=click.Path(), default=None, metavar="RUN",
              help="Start from the finished run RUN (its recipe, weights and history) and train only "
                   "--swa-epochs averaging epochs into --out; RUN is left as it is.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run in --out from its checkpoint, with "
                                             "the settings it was started with (options given must match them; "
                                             "--data-root and --device may change).")
@format_option()
@progress_option
@click.pass_context
def train_command(ctx, data, data_root, out, arch, width, gate, epochs, batch_size, optimizer, lr, csg_lr, gate_lr,
                  weight_decay, lr_schedule, lr_warmup_epochs, label_smoothing, schedule, warmup, period, csg_from, density, lam, augment, cutout, seed, device, amp,
                  torch_compile, sync_bn, train_limit, swa_epochs, swa_lr, teachers, distill_weight, distill_temperature, extend, resume,
                  fmt, progress):
    """Train a CNN with a Class-Specific Gate (or the STD baseline with --no-gate).

    \b
    Examples:
      csgguard train                                   # digits, CSG, runs/default
      csgguard train --no-gate --out runs/std          # the STD twin
      csgguard train --data mnist --data-root ~/data/mnist --out runs/mnist
      csgguard train --out runs/mnist --resume         # after an interruption
      csgguard train --extend runs/c10 --swa-epochs 30 --out runs/c10-swa
                                                       # average 30 more epochs of a finished run
      csgguard train --extend runs/c10 --swa-epochs 30 --teacher runs/a --teacher runs/b --out runs/c10-kd
                                                       # ... distilling two finished runs meanwhile
      torchrun --nproc_per_node 4 -m csgguard train --data cifar10 --data-root DIR --out runs/c10
                                                       # data-parallel on 4 GPUs (rank 0 writes --out)

    \b
    Image folders (--data imagefolder:PATH): PATH/train + PATH/test sub-trees are
    used as the train and test splits; a flat class-per-folder tree is split 80/20
    (stratified, seed 0). Either way 10% of train becomes the validation split. The
    recipe is mnist's (small_cnn, adam, lr 1e-3, 6 epochs) unless --arch resnet20 or
    resnet32 selects cifar10's (sgd 0.1, cosine, 200 epochs, cutout 16, then 30
    weight-averaging epochs); every value can be set.
    The split sizes are printed before training starts.

    Prints the summary (test_accuracy, gate_density, mis, epochs, seconds).
    --out is locked while training: a second process writing it is refused.
    """
    from ..artifacts import check_output_dir, folder_lock
    from ..distributed import is_main_process
    from ..train import TrainConfig, train

    check_output_dir(out, "--out")
    if not teachers and (distill_weight is not None or distill_temperature is not None):
        from ..errors import CsgguardError

        raise CsgguardError("--distill-weight and --distill-temperature set how --teacher runs are distilled; "
                            "give at least one --teacher RUN")
    distill = dict(teachers=tuple(teachers),
                   **({} if distill_weight is None else {"distill_weight": distill_weight}),
                   **({} if distill_temperature is None else {"distill_temperature": distill_temperature}))
    if extend is not None:
        cfg = _extension(ctx, extend, swa_epochs, swa_lr, data_root, device, amp, out, distill)
    elif resume:  # the interrupted run's own settings; any given beside --resume must match them
        import dataclasses

        from ..train import checkpoint_config

        cfg = checkpoint_config(out, data_root=data_root, device=device)
        fields = {f.name for f in dataclasses.fields(cfg)}
        given = {name: ctx.params[name] for name in _given(ctx, LOCATION_OPTIONS) if name in fields}
        if "teachers" in given:
            given["teachers"] = tuple(given["teachers"])
        cfg = dataclasses.replace(cfg, **given)  # train() refuses what differs from the checkpoint
    else:
        cfg = TrainConfig(data=data, data_root=data_root, arch=arch, width=width, gate=gate, epochs=epochs,
                          batch_size=batch_size, optimizer=optimizer, lr=lr, csg_lr=csg_lr, gate_lr=gate_lr,
                          weight_decay=weight_decay, lr_schedule=lr_schedule, lr_warmup_epochs=lr_warmup_epochs,
                          label_smoothing=label_smoothing, schedule=schedule, warmup=warmup, period=period,
                          csg_from=csg_from, density=density, lam=lam, augment=augment, cutout=cutout, seed=seed,
                          device=device, amp=amp, sync_bn=sync_bn, train_limit=train_limit, swa_epochs=swa_epochs,
                          swa_lr=swa_lr, **distill)
    cfg.compile = torch_compile
    lock = folder_lock(out, "train") if is_main_process() else contextlib.nullcontext()
    with lock:
        result = train(cfg, out, resume=resume, extend=extend, progress=progress, log=_SplitFirst(cfg.data))
    if not is_main_process():  # under torchrun only rank 0 reports (and wrote the run directory)
        return
    log(f"wrote {result.run_dir}/model.safetensors and model.json")
    emit_mapping({"run": str(result.run_dir), **result.summary}, fmt, title="training summary")


# what says where, how and how visibly a run trains, not what it learns
LOCATION_OPTIONS = {"data_root", "device", "torch_compile", "out", "resume", "fmt", "progress"}
# what --extend may be combined with: everything else is the extended run's recipe
EXTEND_OPTIONS = LOCATION_OPTIONS | {"extend", "swa_epochs", "swa_lr", "amp", "teachers", "distill_weight",
                                     "distill_temperature"}


def _given(ctx, allowed: set[str]) -> list[str]:
    """The options typed on the command line (not defaults) outside ``allowed``."""
    return sorted(p.name for p in ctx.command.params
                  if p.name not in allowed and ctx.get_parameter_source(p.name) is not click.core.ParameterSource.DEFAULT)


def _extension(ctx, extend, swa_epochs, swa_lr, data_root, device, amp, out, distill):
    """The extended run's recipe plus the averaging phase; refuses recipe options given beside --extend."""
    from pathlib import Path

    from ..errors import CsgguardError
    from ..models.store import resolve_run
    from ..train import extension_config

    given = _given(ctx, EXTEND_OPTIONS)
    if given:
        raise CsgguardError("--extend takes the recipe from the run it extends; drop "
                            + ", ".join("--" + n.replace("_", "-") for n in sorted(given)))
    if not swa_epochs:
        raise CsgguardError("--extend trains weight-averaging epochs only: give --swa-epochs N (N >= 1)")
    if Path(out).resolve() == resolve_run(extend).resolve():
        raise CsgguardError(f"--out {out} is the run being extended; write the extension to another folder")
    return extension_config(extend, swa_epochs=swa_epochs, swa_lr=swa_lr, data_root=data_root, device=device,
                            amp=amp, **distill)

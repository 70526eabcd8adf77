"""Training the CSG CNN (and its STD twin) by the per-epoch path alternation of docs/method.md.

Schedule (authors' code): the first ``warmup`` epochs train the STD path alone;
after that an epoch trains the CSG path when ``epoch % period >= csg_from`` and
the STD path otherwise. Each path has its own optimiser and step-decay schedule
(x ``gamma`` at the ``milestones`` fractions of the epochs). A CSG step minimises
CE(gated logits, y) + lambda * relu(||G||_1 - d*K*C) and is followed by the gate's
row-max normalise + clamp. ``schedule="joint"`` instead sums both losses every step
(the authors' earlier formulation). ``--no-gate`` trains the STD baseline: the
same network on the STD path alone.

The best checkpoint is the epoch with the highest validation accuracy among those
whose gate density already meets the target (all epochs for STD); ties go to the
later epoch. ``checkpoint.safetensors`` holds everything ``--resume`` needs (weights,
optimiser moments, RNG state; history and config as JSON in its header), one file
replaced atomically each epoch.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same loop runs data-parallel: see
:mod:`csgguard.distributed` for the sharding design; rank 0 alone validates and
writes the run directory, and every rank returns rank 0's summary.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, update_bn

from .artifacts import (
    load_tensors,
    parse_json,
    read_json,
    remove_stale_temporaries,
    save_tensors,
    to_jsonable,
    write_json,
)
from .compiling import compile_errors, compile_module
from .data import Dataset, check_val_fraction, load_dataset
from .devices import autocast, channels_last, select_device
from .distill import distillation_loss, teacher_targets
from .distributed import (
    SINGLE,
    DistContext,
    all_reduce_sum,
    broadcast_json,
    convert_sync_batchnorm,
    distributed,
    replica_divergence,
    shard,
    wrap_model,
)
from .errors import CsgguardError
from .features import extract_features
from .metrics import accuracy, mutual_information_score
from .models import CSGNet, ModelConfig
from .models.store import LIMITS, save_model
from .progress import make_progress

# Per-dataset defaults: chosen so `make demo` trains in well under a minute on 2 CPU
# cores and MNIST / CIFAR-10 follow standard recipes. Every field can be overridden.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": dict(arch="small_cnn", epochs=30, batch_size=64, optimizer="adam", lr=2e-3, csg_lr=2e-3,
                   gate_lr=2e-2, weight_decay=0.0, warmup=3, period=3, csg_from=1, augment=False, cutout=0),
    "mnist": dict(arch="small_cnn", epochs=6, batch_size=128, optimizer="adam", lr=1e-3, csg_lr=1e-3,
                  gate_lr=1e-2, weight_decay=0.0, warmup=1, period=3, csg_from=1, augment=False, cutout=0),
    # CIFAR-10: a cosine schedule with a linear LR warm-up and cutout 16, which lifted both ResNet-20s'
    # validation accuracy; 200 epochs, which with cutout lifted the pair's again (100 and 150 did less);
    # then 30 weight-averaging epochs with cycles from 0.1 x the base LR, which lifted it once more
    # (cycles from 0.5 x lowered it; docs/results.md "Training", each step by a rule written before its runs)
    "cifar10": dict(arch="resnet20", epochs=200, batch_size=128, optimizer="sgd", lr=0.1, csg_lr=0.1,
                    gate_lr=1e-2, weight_decay=5e-4, warmup=2, period=3, csg_from=2, augment=True,
                    lr_schedule="cosine", lr_warmup_epochs=1.0, cutout=16, swa_epochs=30, swa_lr=0.1),
}
LR_SCHEDULES = ("step", "cosine")
#: the averaging cycles' peak where the dataset sets none (the setting that lifted CIFAR-10; 0.5 lowered it)
DEFAULT_SWA_LR = 0.1


@dataclass
class TrainConfig:
    data: str = "digits"
    data_root: str | None = None
    arch: str | None = None
    width: int | None = None             # K, the gated layer's filters (backbone default when None)
    gate: bool = True
    epochs: int | None = None
    batch_size: int | None = None
    optimizer: str | None = None          # adam | sgd
    lr: float | None = None               # STD-path learning rate
    csg_lr: float | None = None           # CSG-path learning rate (network weights)
    gate_lr: float | None = None          # CSG-path learning rate of the gate itself (Adam)
    weight_decay: float | None = None
    momentum: float = 0.9
    lr_schedule: str | None = None        # step (x gamma at milestones) | cosine (per step, to 0)
    lr_warmup_epochs: float | None = None  # linear LR ramp from 0 over this many epochs (cosine only)
    milestones: tuple[float, ...] = (0.4, 0.6, 0.8)
    gamma: float = 0.1
    label_smoothing: float = 0.0
    schedule: str = "alternate"           # alternate (reference) | joint
    warmup: int | None = None
    period: int | None = None
    csg_from: int | None = None           # "m": CSG epoch when epoch % period >= m
    density: float = 0.2                  # target L1-density d
    lam: float = 1e-3                     # sparsity weight lambda
    joint_weight: float = 1.0             # lambda1 for schedule=joint
    augment: bool | None = None
    cutout: int | None = None             # side of a square erased at a random place per image (0 = off)
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    compile: bool = False                 # torch.compile the training steps (how a run trains, not what)
    val_fraction: float | None = None
    sync_bn: bool = False                 # SyncBatchNorm under torchrun (CUDA only)
    train_limit: int | None = None        # train on the first N training images only (smoke runs, benchmarks)
    swa_epochs: int | None = None         # weight-averaging epochs after the main schedule (0 = none)
    swa_lr: float | None = None           # peak of each averaging epoch's LR cycle, as a fraction of the base LRs
    teachers: tuple[str, ...] = ()        # finished runs whose averaged soft outputs the STD path learns (distillation)
    distill_weight: float = 0.9           # share of the teachers' term in the STD-path loss (the rest: labels)
    distill_temperature: float = 4.0      # softmax temperature of the teachers' targets and of that term

    def resolved(self) -> TrainConfig:
        """Fill unset fields from the dataset's defaults."""
        key = self.data if self.data in DATASET_DEFAULTS else None
        if key is None:
            key = "cifar10" if self.arch in ("resnet20", "resnet32") else "mnist"
        out = copy.copy(self)
        for k, v in DATASET_DEFAULTS[key].items():
            if getattr(out, k) is None:
                setattr(out, k, v)
        if out.lr_schedule is None:
            out.lr_schedule = "step"
        if out.lr_warmup_epochs is None:
            out.lr_warmup_epochs = 0.0
        if out.swa_epochs is None:
            out.swa_epochs = 0
        if out.swa_lr is None:
            out.swa_lr = DEFAULT_SWA_LR
        out.milestones = tuple(out.milestones)
        out.teachers = tuple(out.teachers)
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        # configs saved before cutout / weight averaging existed trained without them
        d = {"cutout": 0, "swa_epochs": 0, **d}
        return cls(**{k: v for k, v in d.items() if k in names})

    def validate(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise CsgguardError(f"--epochs must be >= 1, got {self.epochs}")
        if self.train_limit is not None and self.train_limit < 1:
            raise CsgguardError(f"train_limit must be >= 1, got {self.train_limit}")
        if self.width is not None and not 1 <= self.width <= LIMITS["width"]:
            raise CsgguardError(f"--width must be in [1, {LIMITS['width']}] (the most a model.json may hold), "
                                f"got {self.width}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CsgguardError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.optimizer not in (None, "adam", "sgd"):
            raise CsgguardError(f"unknown optimizer {self.optimizer!r}; choose adam or sgd")
        if self.schedule not in ("alternate", "joint"):
            raise CsgguardError(f"unknown schedule {self.schedule!r}; choose alternate or joint")
        if self.lr_schedule not in (None, *LR_SCHEDULES):
            raise CsgguardError(f"unknown --lr-schedule {self.lr_schedule!r}; choose {' or '.join(LR_SCHEDULES)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise CsgguardError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.cutout is not None and self.cutout < 0:
            raise CsgguardError(f"--cutout must be >= 0 pixels, got {self.cutout}")
        if self.swa_epochs is not None and self.swa_epochs < 0:
            raise CsgguardError(f"--swa-epochs must be >= 0, got {self.swa_epochs}")
        if self.swa_lr is not None and not (math.isfinite(self.swa_lr) and 0 < self.swa_lr <= 1):
            raise CsgguardError(f"--swa-lr must be in (0, 1] (a fraction of the base learning rates), got {self.swa_lr}")
        if not 0 < self.density <= 1:
            raise CsgguardError(f"--density must be in (0, 1], got {self.density}")
        if not (math.isfinite(self.distill_weight) and 0 <= self.distill_weight <= 1):
            raise CsgguardError(f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        if not (math.isfinite(self.distill_temperature) and self.distill_temperature > 0):
            raise CsgguardError(f"--distill-temperature must be > 0, got {self.distill_temperature}")
        if self.period is not None and self.csg_from is not None and not 0 <= self.csg_from < self.period:
            raise CsgguardError(f"--csg-from must be in [0, period), got {self.csg_from} with period {self.period}")
        # the numbers the CLI checks as it parses, checked again for callers of the Python API
        for name in ("lr", "csg_lr", "gate_lr"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise CsgguardError(f"{name} must be a finite number > 0, got {v}")
        for name, v in (("weight_decay", self.weight_decay), ("lam", self.lam), ("joint_weight", self.joint_weight),
                        ("lr_warmup_epochs", self.lr_warmup_epochs)):
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise CsgguardError(f"{name} must be a finite number >= 0, got {v}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise CsgguardError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise CsgguardError(f"gamma must be in (0, 1], got {self.gamma}")
        if not all(math.isfinite(m) and 0 < m < 1 for m in self.milestones):
            raise CsgguardError(f"milestones are fractions of the schedule in (0, 1), got {tuple(self.milestones)}")
        if self.val_fraction is not None:
            check_val_fraction(self.val_fraction)
        for name, low in (("warmup", 0), ("period", 1), ("csg_from", 0)):
            v = getattr(self, name)
            if v is not None and v < low:
                raise CsgguardError(f"{name} must be >= {low}, got {v}")


@dataclass
class TrainResult:
    run_dir: Path
    summary: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)


def epoch_path(cfg: TrainConfig, epoch: int) -> str:
    """Which path trains in ``epoch`` (0-based): "std", "csg" or "joint"."""
    if not cfg.gate:
        return "std"
    if cfg.schedule == "joint":
        return "std" if epoch < cfg.warmup else "joint"
    if epoch < cfg.warmup:
        return "std"
    return "csg" if epoch % cfg.period >= cfg.csg_from else "std"


def default_model_config(cfg: TrainConfig, ds: Dataset) -> ModelConfig:
    return ModelConfig(arch=cfg.arch, num_classes=ds.num_classes, in_channels=ds.in_channels,
                       input_size=ds.image_size, gate=cfg.gate, width=cfg.width, mean=ds.mean, std=ds.std)


def _make_optimizer(cfg: TrainConfig, params: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=cfg.momentum, nesterov=True)
    return torch.optim.Adam(params)


class Trainer:
    """Holds the model, both optimisers and schedules; one ``run_epoch`` per epoch."""

    def __init__(self, cfg: TrainConfig, ds: Dataset, device: torch.device, dist: DistContext = SINGLE) -> None:
        self.cfg, self.ds, self.device, self.dist = cfg, ds, device, dist
        torch.manual_seed(cfg.seed)
        self.model = CSGNet(default_model_config(cfg, ds)).to(device)
        if cfg.sync_bn:
            self.model = convert_sync_batchnorm(self.model, device, dist)
        self.channels_last = channels_last(device, cfg.amp)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_split = _stage_split(ds.train, device)
        gate_params = [] if self.model.gate is None else [self.model.gate.weight]
        net_params = [p for n, p in self.model.named_parameters() if not n.startswith("gate.")]
        decay = [p for p in net_params if p.dim() > 1]
        no_decay = [p for p in net_params if p.dim() <= 1]
        wd = cfg.weight_decay
        self.opt_std = _make_optimizer(cfg, [dict(params=decay, lr=cfg.lr, weight_decay=wd),
                                             dict(params=no_decay, lr=cfg.lr, weight_decay=0.0)])
        self.opt_csg = None
        if gate_params:
            groups = [dict(params=decay, lr=cfg.csg_lr, weight_decay=wd),
                      dict(params=no_decay, lr=cfg.csg_lr, weight_decay=0.0)]
            self.opt_csg = _make_optimizer(cfg, groups)
            # the gate always uses Adam: its sparsity gradient (lambda) is tiny next to
            # CE gradients, and Adam's per-entry normalisation lets it move at gate_lr
            self.opt_gate = torch.optim.Adam(gate_params, lr=cfg.gate_lr)
        milestones = sorted({max(1, int(round(f * cfg.epochs))) for f in cfg.milestones})
        self.milestones = milestones
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.fill = torch.tensor(ds.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # cutout's fill
        # what the training steps call: the model itself, or its DDP wrapper under torchrun
        # (a gated model's STD epochs leave the gate out of the graph: DDP must know)
        self.net = wrap_model(self.model, device, dist, find_unused=self.model.gate is not None)
        if cfg.compile:
            # fixed shapes: one graph per path and batch size (the last, smaller batch of an
            # epoch gets its own); the module itself, its state_dict and checkpoints stay eager
            self.net = compile_module(self.net, device)
        self.averaged: AveragedModel | None = None  # the running weight average (averaging phase only)
        self.soft_targets: torch.Tensor | None = None  # (N_train, C) teachers' targets (distillation only)
        self.gate_frozen = False                    # True in the averaging phase (see _set_lr)

    # ------------------------------------------------------------------ schedule
    def lr_factor(self, epoch: float) -> float:
        """Multiplier of every base learning rate at (fractional) ``epoch``.

        ``step``: x gamma at each milestone (per epoch). ``cosine``: a linear ramp over
        ``lr_warmup_epochs``, then half a cosine down to 0 at the last step; it is set
        every step, so both paths' optimisers follow the one curve. After ``epochs``, in
        the weight-averaging phase, each epoch is one cosine cycle from ``swa_lr`` down to
        0, so every averaged snapshot is taken at the bottom of a cycle (Izmailov et al.
        2018, cyclical SWA).
        """
        cfg = self.cfg
        if epoch >= cfg.epochs:  # the averaging phase: one cosine cycle per epoch, swa_lr -> 0
            return cfg.swa_lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - math.floor(epoch))))
        if cfg.lr_schedule == "cosine":
            if epoch < cfg.lr_warmup_epochs:
                return max(epoch, 1e-3) / cfg.lr_warmup_epochs
            span = max(cfg.epochs - cfg.lr_warmup_epochs, 1e-9)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (epoch - cfg.lr_warmup_epochs) / span)))
        return cfg.gamma ** sum(int(epoch) >= m for m in self.milestones)

    def _set_lr(self, epoch: float) -> None:
        f = self.lr_factor(epoch)
        for g in self.opt_std.param_groups:
            g["lr"] = self.cfg.lr * f
        if self.opt_csg is not None:
            for g in self.opt_csg.param_groups:
                g["lr"] = self.cfg.csg_lr * f
            # the gate is frozen while weights are averaged: the averaged network keeps the very
            # gate its snapshots were trained with (and so its density)
            self.gate_frozen = epoch >= self.cfg.epochs
            for g in self.opt_gate.param_groups:
                g["lr"] = 0.0 if self.gate_frozen else self.cfg.gate_lr * f

    # ------------------------------------------------------------------ training
    def _augment(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random crop with 4-pixel zero padding + horizontal flip (the CIFAR recipe), then cutout if set."""
        generator = self.generator if generator is None else generator
        n, _, h, w = x.shape
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device, non_blocking=True)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        padded = F.pad(x, (4, 4, 4, 4))
        # an independent crop offset per image, gathered in one indexing op
        offsets = torch.randint(0, 9, (2, n), generator=generator).to(x.device, non_blocking=True)
        rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (offsets[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
        return self._cutout(x, generator) if self.cfg.cutout else x

    def _cutout(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cutout (DeVries & Taylor 2017): a ``cutout``-pixel square, centred anywhere (so it may
        hang over the border), set to the dataset mean -- the regulariser for a network that
        otherwise fits its training images exactly."""
        n, _, h, w = x.shape
        centres = torch.stack([torch.randint(0, h, (n,), generator=generator),
                               torch.randint(0, w, (n,), generator=generator)]).to(x.device, non_blocking=True)
        lo, hi = self.cfg.cutout // 2, (self.cfg.cutout + 1) // 2
        rows = torch.arange(h, device=x.device)[None, :]
        cols = torch.arange(w, device=x.device)[None, :]
        in_rows = (rows >= centres[0][:, None] - lo) & (rows < centres[0][:, None] + hi)
        in_cols = (cols >= centres[1][:, None] - lo) & (cols < centres[1][:, None] + hi)
        hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
        return torch.where(hole, self.fill.to(x.dtype), x)

    def run_epoch(self, epoch: int, progress=None, task=None) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        path = epoch_path(cfg, epoch)
        self._set_lr(epoch)
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        steps = max(1, -(-len(self.train_split) // cfg.batch_size))
        per_step = cfg.lr_schedule == "cosine"
        t0 = time.perf_counter()
        for i, (x, y, idx, scale, n_global) in enumerate(self._batches()):
            if per_step:
                self._set_lr(epoch + i / steps)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            soft = None if self.soft_targets is None else self.soft_targets[idx].to(self.device, non_blocking=True)
            loss, logits = self.step(path, x, y, scale=scale, soft=soft)
            loss_sum += float(loss) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            total += len(y)
            if progress is not None:
                progress.advance(task, n_global)
        if self.dist.enabled:  # epoch figures over the whole (global) epoch, the same on every rank
            loss_sum, correct, total = all_reduce_sum([loss_sum, correct, total], self.device, self.dist)
        seconds = time.perf_counter() - t0
        return {"epoch": epoch + 1, "path": path, "train_loss": loss_sum / max(total, 1),
                "train_accuracy": correct / max(total, 1), "lr_factor": self.lr_factor(epoch),
                "seconds": seconds}

    def _batches(self):
        """(x, y, positions in the train split, loss scale, global batch size) for this process, one epoch.

        Single-process: the shuffled batches of the train split. Under torchrun every
        rank draws the same order and augmentation from the shared generator, cuts the
        same global batches and keeps its slice; the loss scale makes the DDP-averaged
        gradient that of the global-batch mean. A last global batch with fewer images
        than ranks is skipped on every rank (after drawing its augmentation, so the
        generator stays in step with a single-process run).
        """
        cfg, split = self.cfg, self.train_split
        if not self.dist.enabled:  # the draws of split.batches(shuffle=True), with the positions kept
            order = torch.randperm(len(split), generator=self.generator)
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                x, y = next(split.batches(len(idx), positions=idx))
                yield (self._augment(x) if cfg.augment else x), y, idx, 1.0, len(y)
            return
        world = self.dist.world_size
        order = torch.randperm(len(split), generator=self.generator)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            mine = shard(idx, self.dist)
            if cfg.augment:  # the global batch's augmentation, then this rank's rows of it
                x, y = next(split.batches(len(idx), positions=idx))
                x, y = self._augment(x)[mine], y[mine]
            elif len(idx) >= world:
                x, y = next(split.batches(len(idx[mine]), positions=idx[mine]))
            if len(idx) < world:
                continue
            yield x, y, idx[mine], len(y) * world / len(idx), len(idx)

    def _std_loss(self, logits: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        """The STD path's loss: cross-entropy with the labels, or with teachers' targets the
        distillation mix of both (:func:`csgguard.distill.distillation_loss`)."""
        cfg = self.cfg
        if soft is None:
            return F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        return distillation_loss(logits, soft, y, temperature=cfg.distill_temperature, weight=cfg.distill_weight,
                                 label_smoothing=cfg.label_smoothing)

    def step(self, path: str, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0,
             soft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on the ``path`` ("std", "csg", "joint"); returns (loss, logits).

        ``scale`` multiplies the loss that is back-propagated (not the one returned):
        under DDP it turns the average over ranks into the global-batch mean. ``soft``: the
        teachers' targets for these images (distillation), read by the STD path's loss only;
        the CSG path learns the gate from the true classes whatever the teachers say.
        """
        with compile_errors("the training step"):
            return self._step(path, x, y, scale, soft)

    def _step(self, path: str, x: torch.Tensor, y: torch.Tensor, scale: float,
              soft: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, model, net = self.cfg, self.model, self.net
        with autocast(self.device, cfg.amp):
            if path == "std":
                logits = net(x)
                loss = self._std_loss(logits, y, soft)
            else:
                std_logits, csg_logits = net(x, y)
                loss = F.cross_entropy(csg_logits.float(), y, label_smoothing=cfg.label_smoothing)
                if path == "joint":
                    loss = self._std_loss(std_logits, y, soft) + cfg.joint_weight * loss
                loss = loss + cfg.lam * model.gate.penalty(cfg.density)
                logits = csg_logits if path == "csg" else std_logits
        grad_loss = loss if scale == 1.0 else loss * scale
        if path == "std":
            self.opt_std.zero_grad(set_to_none=True)
            grad_loss.backward()
            self.opt_std.step()
        else:
            opt = self.opt_std if path == "joint" else self.opt_csg
            opt.zero_grad(set_to_none=True)
            self.opt_gate.zero_grad(set_to_none=True)
            grad_loss.backward()
            opt.step()
            if not self.gate_frozen:
                self.opt_gate.step()
                model.gate.normalize_()
        return loss.detach(), logits.detach()

    # ------------------------------------------------------------------ weight averaging
    def update_average(self) -> None:
        """Add the current weights to the running average (started at the first averaging epoch)."""
        if self.averaged is None:
            self.averaged = AveragedModel(self.model)
        self.averaged.update_parameters(self.model)

    @torch.no_grad()
    def averaged_network(self, limit: int | None = None) -> CSGNet:
        """The averaged network with BatchNorm statistics recomputed over (the first ``limit``)
        training images: averaged weights make the snapshots' running statistics stale.

        The images are augmented as in training (by a generator of their own, so training's
        random stream is untouched and the result is reproducible): the network learnt its
        weights under statistics of augmented batches, and statistics of un-augmented images
        cost the CIFAR-10 ResNet-20 five points of validation accuracy on its first snapshot.
        """
        split = self.ds.train if limit is None else self.ds.train.subset(np.arange(min(limit, len(self.ds.train))))
        generator = torch.Generator().manual_seed(self.cfg.seed)

        def batches():
            for x, _ in split.batches(512):
                x = x.to(self.device)
                yield (self._augment(x, generator) if self.cfg.augment else x),

        net = self.averaged.module
        update_bn(batches(), net, device=self.device)
        return net

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str, model: CSGNet | None = None) -> dict[str, Any]:
        model = self.model if model is None else model
        s = self.ds.split(split)
        feats = extract_features(model, s.x(), batch_size=1024, device=self.device)
        labels = s.labels.numpy()
        out = {"accuracy": accuracy(feats.logits, labels)}
        if model.gate is not None:
            out["gate_density"] = float(model.gate.density())
        return out, feats, labels

    # ------------------------------------------------------------------ checkpointing
    def state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        opts = {"std": self.opt_std}
        if self.opt_csg is not None:
            opts.update(csg=self.opt_csg, gate=self.opt_gate)
        for name, opt in opts.items():
            for pid, st in opt.state_dict()["state"].items():
                for key, val in st.items():
                    t = val if torch.is_tensor(val) else torch.tensor(val)
                    tensors[f"opt.{name}.{pid}.{key}"] = t
        if self.averaged is not None:
            tensors.update({f"swa.{k}": v for k, v in self.averaged.state_dict().items()})
        if self.soft_targets is not None:  # computing them again would cost a resume every teacher's pass
            tensors["distill.targets"] = self.soft_targets
        tensors["rng.generator"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        return tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opts = {"std": self.opt_std}
        if self.opt_csg is not None:
            opts.update(csg=self.opt_csg, gate=self.opt_gate)
        for name, opt in opts.items():
            sd = opt.state_dict()
            state: dict[int, dict[str, torch.Tensor]] = {}
            prefix = f"opt.{name}."
            for k, v in tensors.items():
                if k.startswith(prefix):
                    pid, key = k[len(prefix):].split(".", 1)
                    state.setdefault(int(pid), {})[key] = v
            sd["state"] = state
            opt.load_state_dict(sd)
        averaged = {k[4:]: v for k, v in tensors.items() if k.startswith("swa.")}
        if averaged:
            self.averaged = AveragedModel(self.model)
            self.averaged.load_state_dict(averaged)
        targets = tensors.get("distill.targets")
        if targets is not None:
            want = (len(self.train_split), self.ds.num_classes)
            if tuple(targets.shape) != want or targets.dtype != torch.float32:
                raise CsgguardError(f"checkpoint: distillation targets of shape {tuple(targets.shape)} "
                                    f"({targets.dtype}), expected {want} float32; drop --resume to start afresh")
            self.soft_targets = targets
        self.generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])


def _stage_split(split, device: torch.device):
    """On CUDA, keep the uint8 train images where batches are cut: on the GPU when they fit
    in a small budget (no per-batch host copy at all), else in pinned host memory so the
    per-batch copies are asynchronous. On CPU the split is used as it is."""
    if device.type != "cuda":
        return split
    from .data import Split

    nbytes = split.images.element_size() * split.images.nelement()
    if nbytes <= GPU_STAGE_BYTES:
        return Split(split.name, split.images.to(device), split.labels.to(device), split.indices)
    return Split(split.name, split.images.pin_memory(), split.labels.pin_memory(), split.indices)


GPU_STAGE_BYTES = 2 << 30


def _select_best(history: list[dict[str, Any]], gated: bool, target: float) -> int | None:
    """Index of the best epoch: highest val accuracy among those meeting the density target."""
    ok = [i for i, h in enumerate(history) if not h.get("averaged")
          and (not gated or h.get("gate_density", 1.0) <= target + 1e-9)]
    if not ok:
        return None
    return max(ok, key=lambda i: (history[i]["val_accuracy"], i))


def train(cfg: TrainConfig, out: str | Path = "runs/default", *, resume: bool = False,
          extend: str | Path | None = None, progress: bool | None = None, log=None) -> TrainResult:
    """Train one model and write the run directory; returns the final summary.

    The summary holds ``test_accuracy``, ``gate_density``, ``mis`` (None for STD),
    ``epochs`` and ``seconds`` (plus validation figures and the best epoch).
    Under ``torchrun`` it trains data-parallel (:mod:`csgguard.distributed`); only
    rank 0 writes ``out`` and every rank returns rank 0's summary and history.

    ``extend`` names a finished run (see :func:`extension_config`) whose weights and
    history stand in for the main schedule: only the weight-averaging epochs are trained.
    """
    cfg.validate()
    cfg = cfg.resolved()
    cfg.validate()
    if extend is not None and cfg.swa_epochs < 1:
        raise CsgguardError("extending a finished run trains its weight-averaging epochs only: give --swa-epochs N")
    device = select_device(cfg.device)
    with distributed(device) as (ctx, device), _cudnn_benchmark(device):
        return _train(cfg, Path(out), device, ctx, resume=resume, extend=extend, progress=progress, log=log)


#: settings that say where or how a run trains, not what it learns: --resume may change them
WHERE_NOT_WHAT = ("device", "data_root", "compile")


def checkpoint_config(out: str | Path, *, data_root: str | None = None, device: str = "auto") -> TrainConfig:
    """The settings an interrupted run in ``out`` was started with, for ``--resume`` without
    retyping them (``data_root`` and ``device`` may differ: the data or the machine moved)."""
    meta, _ = _read_checkpoint(Path(out))
    return _saved_config(meta["config"], Path(out) / CHECKPOINT_FILE, data_root=data_root, device=device)


def checkpoint_epochs(out: str | Path) -> int:
    """How many whole epochs the checkpoint in ``out`` holds (0 when there is none): where a
    ``--resume`` would go on from, for scripts that move a run between machines."""
    try:
        meta, _ = _read_checkpoint(Path(out))
    except CsgguardError:
        return 0
    return len(meta["history"])


def _setting_fits(value: Any, hint: Any) -> bool:
    """``value`` (from JSON) is of the annotated type ``hint`` of a :class:`TrainConfig` field."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_setting_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # JSON writes 1.0 as 1 in some tools
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_setting_fits(v, item) for v in value)
    return True


def check_saved_settings(settings: Any, where: Path | str) -> None:
    """Saved training settings (model.json's ``training``, a checkpoint's config) hold values of the
    types :class:`TrainConfig` declares: a hand-edited file is one line naming the field, never a
    TypeError deep inside training."""
    import typing

    if not isinstance(settings, dict):
        raise CsgguardError(f"{where}: training settings must be a JSON object, got {type(settings).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    for key, value in settings.items():
        if key in hints and not _setting_fits(value, hints[key]):
            raise CsgguardError(f"{where}: training setting {key}={value!r} is not a valid "
                                f"{str(hints[key]).replace('typing.', '')}")


def _saved_config(settings: dict[str, Any], where: Path, *, data_root: str | None, device: str) -> TrainConfig:
    """A run's saved settings (checkpoint or model.json) as a config, moved to ``data_root`` / ``device``."""
    check_saved_settings(settings, where)
    try:
        cfg = TrainConfig.from_dict(settings)
    except TypeError as exc:
        raise CsgguardError(f"{where}: unreadable training settings ({exc})") from None
    cfg.milestones = tuple(cfg.milestones)
    cfg.teachers = tuple(cfg.teachers)
    cfg.device = device
    cfg.compile = False  # how the saved run was stepped is not part of its recipe: the caller says
    if data_root is not None:
        cfg.data_root = data_root
    return cfg


def extension_config(run: str | Path, *, swa_epochs: int, swa_lr: float | None = None, data_root: str | None = None,
                     device: str = "auto", amp: bool = True, teachers: tuple[str, ...] = (),
                     distill_weight: float | None = None, distill_temperature: float | None = None) -> TrainConfig:
    """The recipe of the finished ``run`` (its model.json), with a weight-averaging phase added.

    Why: averaging the weights of a few more epochs lifts a finished network's accuracy
    without retraining it; the recipe comes from the run itself so the extension
    trains on the same data, augmentation and alternation as the epochs before it.
    ``teachers`` (with ``distill_weight`` / ``distill_temperature``, defaults where None)
    makes the averaging epochs distil them (:mod:`csgguard.distill`).
    """
    from .models.store import read_manifest, resolve_run

    run_dir = resolve_run(run)
    manifest = read_manifest(run_dir)
    training = manifest.get("training")
    if not isinstance(training, dict):
        raise CsgguardError(f"{run_dir / 'model.json'}: holds no training section to extend")
    cfg = _saved_config(training, run_dir / "model.json", data_root=data_root, device=device)
    if cfg.swa_epochs:
        raise CsgguardError(f"{run_dir}: already holds averaged weights ({cfg.swa_epochs} epochs); extend the run it came from")
    cfg.swa_epochs, cfg.swa_lr, cfg.amp = swa_epochs, swa_lr, amp
    # the averaging epochs distil only the teachers given here: a distilled run's own teachers
    # (paths on the machine that trained it) are its history, not part of what is extended
    defaults = TrainConfig()
    cfg.teachers = tuple(str(t) for t in teachers)
    cfg.distill_weight = defaults.distill_weight if distill_weight is None else distill_weight
    cfg.distill_temperature = defaults.distill_temperature if distill_temperature is None else distill_temperature
    return cfg


def _start_from_run(trainer: Trainer, run: str | Path, cfg: TrainConfig) -> tuple[list[dict[str, Any]], Any, float]:
    """Load a finished run's weights into ``trainer``; its history, best epoch and seconds."""
    from .artifacts import read_json
    from .models.store import load_model, resolve_run

    run_dir = resolve_run(run)
    loaded = load_model(run_dir, trainer.device)
    try:
        trainer.model.load_state_dict(loaded.model.state_dict(), strict=True)
    except RuntimeError as exc:
        raise CsgguardError(f"{run_dir}: its network does not match this recipe "
                            f"({str(exc).strip().splitlines()[0]})") from None
    history = []
    path = run_dir / "metrics.jsonl"
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                history.append(parse_json(line))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CsgguardError(f"{path}: cannot read the run's history ({exc})") from None
    if len(history) != cfg.epochs or not all(isinstance(h, dict) for h in history):
        raise CsgguardError(f"{path}: holds {len(history)} epochs, the run's recipe {cfg.epochs}; "
                            "only a finished run can be extended")
    summary = read_json(run_dir / "summary.json", "run summary")
    return history, summary.get("best_epoch"), float(summary.get("seconds") or 0.0)


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device):
    """Let cuDNN pick the fastest kernels: image sizes are fixed for a whole run."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def _train(cfg: TrainConfig, out: Path, device: torch.device, ctx: DistContext, *, resume: bool,
           extend: str | Path | None, progress: bool | None, log) -> TrainResult:
    main = ctx.is_main
    ds = load_dataset(cfg.data, cfg.data_root, seed=0, val_fraction=cfg.val_fraction)
    if cfg.train_limit is not None and cfg.train_limit < len(ds.train):
        ds = dataclasses.replace(ds, train=ds.train.subset(np.arange(cfg.train_limit)))
    trainer = Trainer(cfg, ds, device, ctx)
    history: list[dict[str, Any]] = []
    start_epoch, best_state, best_epoch = 0, None, None
    elapsed_before = 0.0
    if resume:  # every rank reads the checkpoint (several nodes: --out on a shared filesystem)
        if main:
            remove_stale_temporaries(out)  # a kill mid-write leaves .NAME.<random>.tmp; the CLI holds out's lock
        meta, tensors = _read_checkpoint(out)
        saved = _saved_config(meta["config"], out / CHECKPOINT_FILE, data_root=None, device=cfg.device)
        was, now = saved.to_dict(), cfg.to_dict()
        differ = [k for k in now if k not in WHERE_NOT_WHAT and was.get(k) != now[k]]
        if differ:
            what = ", ".join(f"{k} {was.get(k)!r} -> {now[k]!r}" for k in differ)
            raise CsgguardError(f"{out}: --resume with different settings than the interrupted run ({what}); "
                                "rerun with the same options (or without --resume)")
        trainer.load_state_tensors(tensors)
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        best_state = best or None
        history = meta["history"]
        best_epoch = meta.get("best_epoch")
        start_epoch = len(history)
        elapsed_before = float(meta.get("seconds", 0.0))
    elif extend is not None:
        history, best_epoch, elapsed_before = _start_from_run(trainer, extend, cfg)
        start_epoch = cfg.epochs
    say = (log or (lambda _m: None)) if main else (lambda _m: None)
    where = f"{device}" if not ctx.enabled else f"{ctx.world_size} processes ({ctx.backend}, rank 0 on {device})"
    say(f"training {'CSG' if cfg.gate else 'STD'} {cfg.arch} on {ds.name} "
        f"({len(ds.train)} train / {len(ds.val)} val / {len(ds.test)} test) on {where}")
    t_start = time.perf_counter()
    with make_progress(progress if main else False) as bar:
        if cfg.teachers and trainer.soft_targets is None:  # (a resumed run read them from its checkpoint)
            # every rank computes the same targets (no broadcast of an (N, C) tensor)
            say(f"distilling from {len(cfg.teachers)} teacher run(s) at T={cfg.distill_temperature:g}, "
                f"weight {cfg.distill_weight:g}: scoring the training images")
            trainer.soft_targets = teacher_targets(cfg.teachers, ds.train, classes=ds.classes,
                                                   temperature=cfg.distill_temperature, device=device,
                                                   amp=cfg.amp, progress=bar)
        total_epochs = cfg.epochs + cfg.swa_epochs
        task = bar.add_task("train", total=(total_epochs - start_epoch) * len(ds.train), info="")
        for epoch in range(start_epoch, total_epochs):
            row = trainer.run_epoch(epoch, bar, task)
            averaging = epoch >= cfg.epochs
            if averaging:  # every rank: the replicas' weights, and so their averages, are the same
                trainer.update_average()
            if ctx.enabled:  # the replicas must hold the same weights (and so the same G)
                row["world_size"] = ctx.world_size
                row["replica_max_diff"] = replica_divergence(list(trainer.model.parameters()), ctx)
                if row["replica_max_diff"] > 0.0:
                    raise CsgguardError(f"epoch {epoch + 1}: model replicas diverged across ranks "
                                        f"(max |difference| {row['replica_max_diff']:.3g}); this is a bug")
            if not main:
                continue  # rank 0 alone validates, keeps the best state and writes checkpoints
            val, _, _ = trainer.evaluate("val")
            row["val_accuracy"] = val["accuracy"]
            if "gate_density" in val:
                row["gate_density"] = val["gate_density"]
            if averaging:  # how the average is doing (BatchNorm statistics from 10,000 images: a monitor)
                row["averaged"] = True
                row["averaged_val_accuracy"] = trainer.evaluate(
                    "val", trainer.averaged_network(limit=10_000))[0]["accuracy"]
            history.append(row)
            info = f"{row['path']} loss {row['train_loss']:.3f} val {row['val_accuracy']:.4f}"
            if averaging:
                info += f" averaged {row['averaged_val_accuracy']:.4f}"
            if "gate_density" in row:
                info += f" density {row['gate_density']:.3f}"
            bar.update(task, info=info)
            best_i = _select_best(history, cfg.gate, cfg.density)
            if best_i == len(history) - 1:
                best_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
                best_epoch = best_i + 1
            _write_checkpoint(out, trainer, cfg, history, best_state, best_epoch,
                              elapsed_before + time.perf_counter() - t_start)
    seconds = elapsed_before + time.perf_counter() - t_start
    summary: dict[str, Any] = {}
    if main:
        summary = _finish(cfg, out, trainer, ds, device, ctx, history, best_state, best_epoch, seconds, say)
    if ctx.enabled:  # doubles as the closing barrier: no rank returns before the run directory exists
        shared = broadcast_json({"summary": summary, "history": history}, device, ctx)
        summary, history = shared["summary"], shared["history"]
    return TrainResult(out, summary, history)


def _finish(cfg: TrainConfig, out: Path, trainer: Trainer, ds: Dataset, device: torch.device, ctx: DistContext,
            history, best_state, best_epoch, seconds: float, say) -> dict[str, Any]:
    """Test the best epoch's weights (or the averaged weights) and write the run directory (rank 0)."""
    if cfg.swa_epochs:  # the product is the average of the averaging epochs, BatchNorm re-estimated
        best_state = {k: v.detach().clone() for k, v in trainer.averaged_network().state_dict().items()}
        best_epoch = None
    elif best_state is None:  # no epoch met the density target: keep the last one, say so
        best_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        best_epoch = cfg.epochs
        last = history[-1].get("gate_density") if history else None
        reached = f" (last epoch {last:.4f})" if last is not None else ""
        say(f"[yellow]warning:[/] gate density never reached the target {cfg.density}{reached}; keeping the last "
            "epoch (more epochs, or a larger --lam, bring it down)")
    trainer.model.load_state_dict(best_state)
    test, feats, labels = trainer.evaluate("test")
    val, _, _ = trainer.evaluate("val")
    mis = mutual_information_score(feats.pooled, labels, ds.num_classes)
    summary = {
        "test_accuracy": test["accuracy"],
        "val_accuracy": val["accuracy"],
        "gate_density": test.get("gate_density"),
        "mis": mis if cfg.gate else None,
        "activation_mis": mis,  # MIS of the pooled activations, defined for STD too
        "epochs": cfg.epochs,
        "best_epoch": best_epoch,
        **({"swa_epochs": cfg.swa_epochs, "weights": f"average of epochs {cfg.epochs + 1}-{cfg.epochs + cfg.swa_epochs}"}
           if cfg.swa_epochs else {}),
        "seconds": round(seconds, 3),
        "device": str(device),
        "gated": cfg.gate,
    }
    if ctx.enabled:
        summary["world_size"] = ctx.world_size
    dataset_info = {"name": ds.name, "source": ds.source, **ds.recipe(), "train_limit": cfg.train_limit,
                    "sizes": {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test)}}
    save_model(trainer.model.cpu(), out, classes=ds.classes, dataset=dataset_info,
               training=cfg.to_dict(), metrics=summary, state_dict=best_state)
    from .artifacts import atomic_write_text

    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    write_json(out / "summary.json", summary)
    for p in (out / "checkpoint.json", out / "checkpoint.safetensors"):
        p.unlink(missing_ok=True)
    return summary


CHECKPOINT_FILE = "checkpoint.safetensors"


def _write_checkpoint(out: Path, trainer: Trainer, cfg: TrainConfig, history, best_state, best_epoch,
                      seconds: float) -> None:
    """One file, written atomically: the tensors, with the resume metadata as JSON in its header.

    There is no second file to fall out of step with: a kill at any moment leaves
    either the previous checkpoint or the new one (and at worst a ``.tmp`` file that
    ``--resume`` removes).
    """
    tensors = trainer.state_tensors()
    if best_state is not None:
        tensors.update({f"best.{k}": v for k, v in best_state.items()})
    meta = {"config": cfg.to_dict(), "history": history, "best_epoch": best_epoch, "seconds": seconds}
    save_tensors(out / CHECKPOINT_FILE, tensors,
                 metadata={"format": "csgguard.checkpoint", "checkpoint": json.dumps(to_jsonable(meta))})
    (out / "checkpoint.json").unlink(missing_ok=True)  # the two-file layout of earlier versions


def _read_checkpoint(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The resume metadata and tensors; also reads the earlier two-file layout (hash-checked)."""
    path, legacy = out / CHECKPOINT_FILE, out / "checkpoint.json"
    if not path.is_file():
        raise CsgguardError(f"{out}: nothing to resume (no {CHECKPOINT_FILE}); drop --resume to start afresh")
    tensors, header = load_tensors(path, None, with_metadata=True)
    if "checkpoint" in header:
        try:
            meta = parse_json(header["checkpoint"])
        except ValueError as exc:
            raise CsgguardError(f"{path}: damaged checkpoint metadata ({exc})") from None
    elif legacy.is_file():
        meta = read_json(legacy, "checkpoint manifest")
        tensors = load_tensors(path, meta.get("sha256") or "missing")
    else:
        raise CsgguardError(f"{path}: holds no resume metadata (not a csgguard checkpoint)")
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict) or \
            not isinstance(meta.get("history"), list):
        raise CsgguardError(f"{path}: damaged checkpoint metadata (config / history missing)")
    return meta, tensors


"""Knowledge distillation: training a network toward the averaged outputs of finished runs.

Why: an ensemble of networks the project has already trained knows more than any one of
them (on CIFAR-10 the 14 finished ResNet-20 runs average to 1.5 points above the best
single one), and a network of the same size can take part of that in by learning the
ensemble's softened class probabilities instead of hard labels alone (Hinton et al. 2015).

The teachers' targets are computed once, before training, on each training image and its
mirror image (averaged, so the target holds whichever way the augmentation flips the
image); crops of a few pixels and cutout are not re-scored by the teachers, which would
cost one teacher forward pass per image and epoch. A teacher is any csgguard run
(hash-checked on loading, as every run): its STD-path logits are what it teaches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .devices import autocast, channels_last
from .errors import CsgguardError


def _check_teacher(loaded, classes: list[str], input_shape: tuple[int, int, int]) -> None:
    """A teacher must name the same classes, in order, and read the same image shape."""
    where = loaded.run_dir
    got = list(loaded.classes)
    if got != list(classes):
        raise CsgguardError(f"{where}: teacher classes {got[:4]}... differ from the training data's "
                            f"{list(classes)[:4]}... (a teacher must be trained on the same classes, in the same order)")
    cfg = loaded.model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if shape != tuple(input_shape):
        raise CsgguardError(f"{where}: teacher reads {shape[0]}x{shape[1]}x{shape[2]} images, "
                            f"the training data is {input_shape[0]}x{input_shape[1]}x{input_shape[2]}")


@torch.no_grad()
def teacher_targets(teachers: Sequence[str], split, *, classes: list[str], temperature: float,
                    device: torch.device, amp: bool = True, batch_size: int = 1000,
                    progress=None) -> torch.Tensor:
    """(N, C) float32: the teachers' softmax at ``temperature`` on ``split``'s images, averaged
    over the teachers and over each image and its mirror image (rows sum to 1)."""
    from .models.store import load_model, resolve_run

    if not teachers:
        raise CsgguardError("distillation needs at least one teacher run")
    n = len(split)
    shape = tuple(split.images.shape[1:])
    total = torch.zeros(n, len(classes), dtype=torch.float32)
    task = None if progress is None else progress.add_task("teachers", total=len(teachers) * n, info="")
    for name in teachers:
        loaded = load_model(resolve_run(name), device)
        _check_teacher(loaded, classes, shape)
        net = loaded.model.eval()
        nhwc = channels_last(device, amp)
        if nhwc:
            net = net.to(memory_format=torch.channels_last)
        start = 0
        for x, _ in split.batches(batch_size):
            x = x.to(device)
            if nhwc:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp):
                both = net(torch.cat([x, x.flip(3)]))
            p = F.softmax(both.float() / temperature, dim=1)
            total[start:start + len(x)] += (0.5 * (p[:len(x)] + p[len(x):])).cpu()
            start += len(x)
            if task is not None:
                progress.advance(task, len(x))
    return total / len(teachers)


def distillation_loss(logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float, weight: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - weight) x CE(logits, labels) + weight x T^2 x KL(targets || softmax(logits / T)).

    The T^2 keeps the soft term's gradient on the scale of the hard one's as T changes
    (Hinton et al. 2015); ``targets`` are probabilities at the same T.
    """
    logits = logits.float()
    hard = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    log_p = F.log_softmax(logits / temperature, dim=1)
    soft = F.kl_div(log_p, targets, reduction="batchmean") * temperature ** 2
    return (1.0 - weight) * hard + weight * soft

"""The adaptive attack: PGD against the classifier *and* the gate-clean detector together.

A detector is only credible if it survives an attacker who knows it (Carlini &
Wagner 2017; Tramer et al. 2020). The attacker here minimises, inside the same Linf
ball as the plain PGD row,

    relu(z_y - max_{j != y} z_j + kappa)  +  w * (s(x) - threshold) / scale

where ``s`` is the fitted detector's own score, ``det.torch_score`` (the one torch
implementation in :mod:`csgguard.scores` that the detector itself reports; exact, not a
learnt stand-in), so its gradient is the true one almost everywhere. The margin term stops pulling once
the input is misclassified by ``kappa``, leaving the budget to hide from the
detector. Several weights ``w`` are tried; per image the attacker keeps the
misclassified iterate with the lowest detector score (best-iterate tracking). The
examples are then scored by *every* evaluated detector at its fixed threshold.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from .errors import CsgguardError
from .features import extract_features

Surrogate = Callable[..., torch.Tensor]  # (logits, pooled, taps) -> score, higher = more adversarial


def detector_surrogate(det) -> Surrogate:
    """The detector's own differentiable score (``det.torch_score``): the attack and the detector
    share one implementation (:mod:`csgguard.scores`), so the gradient is the true one."""
    if not hasattr(det, "torch_score"):
        raise CsgguardError(f"detector {det.name!r} has no differentiable score to attack")
    return det.torch_score


def adaptive_pgd(model, x: torch.Tensor, y: torch.Tensor, surrogate: Surrogate, *, eps: float, steps: int,
                 weight: float, threshold: float, scale: float, kappa: float = 1.0, seed: int = 0,
                 batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Linf PGD with random start; returns (best x_adv, its surrogate score; inf where never misclassified)."""
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    alpha = 2.5 * eps / steps
    out_x, out_s = [], []
    for s in range(0, len(x), batch_size):
        x0, yb = x[s:s + batch_size].to(dev), y[s:s + batch_size].to(dev)
        noise = (torch.rand(x0.shape, generator=gen) * 2 - 1).to(dev) * eps
        xa = (x0 + noise).clamp(0, 1)
        best_x, best_s = x0.clone(), torch.full((len(x0),), float("inf"), device=dev)
        for it in range(steps + 1):
            xa.requires_grad_(True)
            with torch.enable_grad():
                logits, pooled, taps = model.forward_signals(xa)
                det = surrogate(logits, pooled, taps).float()
                z_y = logits.gather(1, yb[:, None])[:, 0]
                z_other = logits.masked_fill(torch.nn.functional.one_hot(yb, logits.shape[1]).bool(),
                                             -float("inf")).max(1).values
                loss = torch.relu(z_y - z_other + kappa) + weight * (det - threshold) / scale
                (grad,) = torch.autograd.grad(loss.sum(), xa)
            with torch.no_grad():
                fooled = logits.argmax(1) != yb
                better = fooled & (det < best_s)
                best_x[better], best_s[better] = xa.detach()[better], det.detach()[better].to(best_s.dtype)
                if it == steps:
                    break
                xa = xa.detach() - alpha * grad.sign()
                xa = torch.min(torch.max(xa, x0 - eps), x0 + eps).clamp(0, 1)
        out_x.append(best_x.cpu())
        out_s.append(best_s.cpu())
    return torch.cat(out_x), torch.cat(out_s)


def adaptive_attack(model, x: torch.Tensor, y: torch.Tensor, detector, *, eps: float, threshold: float,
                    scale: float, steps: int = 40, weights: tuple[float, ...] = (0.5, 2.0, 8.0), seed: int = 0,
                    batch_size: int = 256, index: np.ndarray | None = None):
    """The adaptive attack as an :class:`~csgguard.attacks.AdversarialSet`, scored like any other attack.

    Only correctly classified inputs are attacked; per image the strongest of the
    ``weights`` (lowest detector score among misclassified iterates) is kept. A row
    succeeds when the kept iterate is misclassified; its detector score is not part of
    success (the caller judges evasion at its threshold).
    """
    from .attacks.advset import AdversarialSet

    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        pred = extract_features(model, x, batch_size=batch_size).pred
    attacked = pred == y.numpy()
    rows = np.flatnonzero(attacked)
    xc, yc = x[torch.as_tensor(rows)], y[torch.as_tensor(rows)]
    surrogate = detector_surrogate(detector)
    best_x, best_s = xc.clone(), torch.full((len(xc),), float("inf"))
    t = time.perf_counter()
    for i, w in enumerate(weights):
        xa, sa = adaptive_pgd(model, xc, yc, surrogate, eps=eps, steps=steps, weight=w, threshold=threshold,
                              scale=scale, seed=seed + i, batch_size=batch_size)
        better = sa < best_s
        best_x[better], best_s[better] = xa[better], sa[better]
    x_adv = x.clone()
    x_adv[torch.as_tensor(rows)] = best_x
    pred_adv = extract_features(model, x_adv, batch_size=batch_size).pred
    success = attacked & (pred_adv != y.numpy())
    meta = {"attack": "adaptive-pgd", "norm": "linf", "eps": float(eps), "steps": steps, "weights": list(weights),
            "target_detector": detector.name, "seed": seed, "seconds": time.perf_counter() - t}
    return AdversarialSet(x=x.numpy(), x_adv=x_adv.numpy(), y=y.numpy(), pred=pred, pred_adv=pred_adv,
                          success=success, attacked=attacked,
                          index=np.arange(len(y)) if index is None else np.asarray(index), meta=meta)

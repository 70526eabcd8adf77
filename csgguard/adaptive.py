"""The adaptive attack: PGD against the classifier *and* the gate-clean detector together.

A detector is only credible if it survives an attacker who knows it (Carlini &
Wagner 2017; Tramer et al. 2020). The attacker here minimises, inside the same Linf
ball as the plain PGD row,

    relu(z_y - max_{j != y} z_j + kappa)  +  w * (s(x) - threshold) / scale

where ``s`` is the fitted ``csg-clean`` score rewritten in torch from the detector's
own arrays (exact, not a learnt stand-in: the same means, precisions and gate), so
its gradient is the true one almost everywhere. The margin term stops pulling once
the input is misclassified by ``kappa``, leaving the budget to hide from the
detector. Several weights ``w`` are tried; per image the attacker keeps the
misclassified iterate with the lowest detector score (best-iterate tracking). The
examples are then scored by *every* evaluated detector at its fixed threshold.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import CsgguardError
from .features import extract_features

Surrogate = Callable[..., torch.Tensor]  # (logits, pooled, taps) -> score


def gate_clean_surrogate(det, model) -> Surrogate:
    """A differentiable copy of a fitted detector's score on (logits, pooled, taps) of one forward pass."""
    if hasattr(det, "torch_score"):
        return det.torch_score
    arrays, _ = det.state()
    score = getattr(det, "score", None)
    if "means_" not in arrays or score is None:
        raise CsgguardError(f"no differentiable surrogate for detector {det.name!r}")
    dev = next(model.parameters()).device
    A = {k: torch.as_tensor(np.asarray(v), dtype=torch.float32, device=dev) for k, v in arrays.items()}
    fc_w, fc_b = model.fc.weight, model.fc.bias

    def quad(r, p):
        return torch.einsum("nk,kl,nl->n", r, p, r)

    def gated_logits(pooled):
        return pooled @ (fc_w.t() * A["gate_"]) + fc_b

    def mismatch(pooled, pred):
        a = pooled.abs()
        return (a * (1 - A["gate_"].t()[pred])).sum(1) / a.sum(1).clamp_min(1e-12)

    def component(name, logits, pooled):
        pred = logits.argmax(1)
        if name == "mahalanobis":
            return quad(pooled - A["means_"][pred], A["precision_"])
        if name == "classcov":
            r = pooled - A["means_"][pred]
            return torch.einsum("nk,nkl,nl->n", r, A["class_precision_"][pred], r)
        if name == "gated-diagonal":
            g = A["gate_"].t()[pred]
            r2 = (pooled - A["means_"][pred]) ** 2 / A["var_"]
            return (g * r2).sum(1) / g.sum(1).clamp_min(1e-12)
        if name == "gated-logits":
            return quad(gated_logits(pooled) - A["logit_means_"][pred], A["logit_precision_"])
        if name == "logits":
            top2 = logits.topk(2, dim=1).values
            return -(top2[:, 0] - top2[:, 1])
        if name == "mismatch":
            return mismatch(pooled, pred)
        if name == "mismatch-z":
            return (mismatch(pooled, pred) - A["mismatch_mean_"][pred]).abs() / A["mismatch_std_"][pred]
        raise CsgguardError(f"no differentiable surrogate for score {name!r}")

    def two_sided(logits, pooled, parts):
        top2 = logits.topk(2, dim=1).values
        comps = {0: lambda: torch.log(component("mahalanobis", logits, pooled) + 1e-12),
                 1: lambda: torch.log(component("classcov", logits, pooled) + 1e-12),
                 2: lambda: -torch.log(top2[:, 0] - top2[:, 1] + 1e-6)}
        zs = [(comps[i]() - A["twosided_center_"][i]) / A["twosided_scale_"][i] for i in parts]
        return torch.stack(zs, 1).max(1).values

    def surrogate(logits, pooled, taps=()):
        if score in ("maha-margin", "classcov-margin"):
            return two_sided(logits, pooled, (0, 2) if score == "maha-margin" else (1, 2))
        if score != "combined":
            return component(score, logits, pooled)
        parts = [torch.log1p(component(n, logits, pooled).clamp_min(0)) for n in
                 ("mahalanobis", "gated-logits", "mismatch-z")]
        return ((torch.stack(parts, 1) - A["combined_center_"]) / A["combined_scale_"]).sum(1)

    return surrogate


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
                det = surrogate(logits, pooled, taps)  # the taps too: csg-clean reads them
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
    surrogate = gate_clean_surrogate(detector, model)
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


def adaptive_rows(h, fitted: dict[str, Any]) -> list[dict[str, Any]]:
    """Attack h.model + its fitted csg-clean detector; score the examples with every detector."""
    from .metrics import metrics_row

    s = h.s
    model = h.model
    target, thr, cal_clean = fitted["csg-clean"]
    x, y = h.data["evaluation"]
    feats = h.feats["evaluation"]
    correct = np.flatnonzero(feats.pred == y)
    xc, yc = x[torch.as_tensor(correct)], torch.as_tensor(y[correct])
    for p in model.parameters():
        p.requires_grad_(False)
    surrogate = gate_clean_surrogate(target, model)
    scale = float(np.std(cal_clean)) or 1.0
    best_x, best_s = xc.clone(), torch.full((len(xc),), float("inf"))
    t = time.perf_counter()
    for i, w in enumerate(s["adaptive_weights"]):
        xa, sa = adaptive_pgd(model, xc, yc, surrogate, eps=s["eps"], steps=s["adaptive_steps"], weight=w,
                              threshold=thr["target"], scale=scale, seed=s["seed"] + i, batch_size=s["batch_size"])
        better = sa < best_s
        best_x[better], best_s[better] = xa[better], sa[better]
    secs = time.perf_counter() - t
    ok = np.flatnonzero(torch.isfinite(best_s).numpy())
    x_adv = best_x[torch.as_tensor(ok)]
    adv_feats = extract_features(model, x_adv, device=h.device)
    keep = adv_feats.pred != yc.numpy()[ok]
    x_adv, adv_feats = x_adv[torch.as_tensor(keep)], adv_feats.subset(np.flatnonzero(keep))
    n_att, n_ok = len(correct), int(keep.sum())
    rows = []
    for name, (det, dthr, clean) in fitted.items():
        adv = h.score(det, adv_feats, x_adv)
        m = metrics_row(clean, adv, dthr)
        evaded = int((adv <= dthr["target"]).sum()) if len(adv) else 0
        row = {"model": h.label, "detector": name, "attack": "adaptive-pgd", "target": "csg-clean",
               "eps": s["eps"], "steps": s["adaptive_steps"], "weights": list(s["adaptive_weights"]),
               "n_attacked": n_att, "attack_success_rate": n_ok / n_att if n_att else None,
               "evasion_rate": evaded / n_att if n_att else None, "seconds": secs, **m}
        rows.append(row)
    return rows

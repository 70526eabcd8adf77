"""Adaptive attacks: PGD against the classifier *and* a detector together, several loss forms.

A detector is only credible if it survives an attacker who knows it (Carlini &
Wagner 2017; Tramer et al. 2020). Every attack here runs inside the same Linf ball
as the plain PGD row and differentiates the fitted detector's own score,
``det.torch_score`` (for the gate detectors the one torch implementation in
:mod:`csgguard.scores` that the detector itself reports; exact, not a learnt
stand-in). The attacker minimises a per-image loss; the loss forms
(foolbox-3 style: small classes, keyword-only settings, one shared loop) are

``margin``    ``relu(z_y - max_{j!=y} z_j + kappa) + w * relu(s - threshold + slack) / scale``:
              both terms hinged, so neither pulls once it is satisfied (the old
              form's unhinged detector term kept pulling the input back to its
              clean class, and reached 4% success on digits at Linf 0.1).
``targeted``  the same with a targeted margin ``relu(max_{j!=t} z_j - z_t + kappa)``, once for
              each of the ``top_k`` most likely wrong classes ``t`` of the clean input
              (multi-targeted, Gowal et al. 2019).
``feature``   targeted margin + ``w *`` the RMS z-score (hinged at 1) of the pooled
              activations and of each tap to the clean class-``t`` statistics (feature
              matching, Sabour et al. 2016): it does not read the detector's gradient at
              all, so a detector whose gradient is flat or misleading cannot hide.
``fixed``     the old attack, ``relu(margin + kappa) + w * (s - threshold) / scale`` at a fixed
              weight (kept for comparison: it is not part of the strongest attack).

The shared loop (:func:`attack_loss`) carries the rest once:

* **weight schedule** -- per image the second term is off until the input is first
  misclassified (find an adversarial input, then hide it: Carlini & Wagner 2017's
  detector attacks); from then on its weight ``w`` starts at one of ``weights`` and is
  multiplied by ``weight_step`` after a step where the input is misclassified but
  detected, divided by it where it no longer is misclassified (a continuous per-image
  binary search on the trade-off, as C&W's search on ``c``); ``fixed`` keeps its weight
  on from the first step.
* **step size** -- cosine decay from ``0.25 * eps`` to ``0.01 * eps`` (large steps to
  explore, small ones to settle close to the threshold).
* **restarts** -- one per initial weight; the first starts at the clean input, the
  others at a random point of the ball.
* **best iterate** -- per image, the misclassified iterate with the lowest detector
  score over every step, restart, target and form is kept (the strongest per image
  counts). PGD's last iterate is not the best one once two objectives compete, hence
  this loop instead of foolbox's.
* an image that already evades (misclassified, score below the threshold) is not attacked
  again by the later forms -- like csgguard's PGD restarts, which re-attack only
  failures: the same evasion at a fraction of the cost.

The examples are then scored by *every* evaluated detector at its fixed threshold.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .errors import CsgguardError
from .features import extract_features
from .progress import log

Surrogate = Callable[..., torch.Tensor]  # (logits, pooled, taps, *, inputs) -> score, higher = more adversarial

#: the loss forms of the strongest attack, in the order they run (cheapest first: later forms skip evaded images)
STRONGEST = ("margin", "targeted", "feature")


def detector_surrogate(det) -> Surrogate:
    """The detector's own differentiable score (``det.torch_score``): the attack and the detector
    share one implementation, so the gradient is the true one."""
    if not hasattr(det, "torch_score"):
        raise CsgguardError(f"detector {det.name!r} has no differentiable score to attack")
    fn = det.torch_score
    params = inspect.signature(fn).parameters
    if "inputs" in params:  # a score that runs the model again on the inputs (noise-response)
        return lambda logits, pooled, taps=(), *, inputs: fn(logits, pooled, taps, inputs=inputs)
    if "taps" not in params:  # a score of (logits, pooled) only, e.g. mahalanobis
        return lambda logits, pooled, taps=(), *, inputs=None: fn(logits, pooled)
    return lambda logits, pooled, taps=(), *, inputs=None: fn(logits, pooled, taps)


@dataclass
class Context:
    """What every loss may read: the detector's score, its operating point and clean class statistics."""

    surrogate: Surrogate
    threshold: float
    scale: float
    #: per block (pooled, tap0, tap1, ...): (C, D) clean class means and standard deviations
    means: list[torch.Tensor]
    stds: list[torch.Tensor]


def class_statistics(f, y: np.ndarray) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Clean per-class means / stds of the pooled activations and every tap, from the clean
    :class:`~csgguard.features.Features` ``f`` of the attacked images (the attacker's own clean data)."""
    y, num_classes = np.asarray(y), f.num_classes
    means, stds = [], []
    for block in (f.pooled, *f.taps):
        b = np.asarray(block, dtype=np.float64)
        mu = np.stack([b[y == c].mean(0) if np.any(y == c) else b.mean(0) for c in range(num_classes)])
        sd = np.stack([b[y == c].std(0) if np.sum(y == c) > 1 else b.std(0) for c in range(num_classes)])
        means.append(torch.as_tensor(mu, dtype=torch.float32))
        stds.append(torch.as_tensor(np.maximum(sd, 1e-3 * max(float(b.std()), 1e-6)), dtype=torch.float32))
    return means, stds


def _margin(logits: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``z_cls - max_{j != cls} z_j`` per row."""
    z = logits.float()
    own = z.gather(1, cls[:, None])[:, 0]
    other = z.masked_fill(torch.nn.functional.one_hot(cls, z.shape[1]).bool(), -float("inf")).max(1).values
    return own - other


class AdaptiveLoss:
    """One loss form: a per-image objective to *minimise*; the loop is :func:`attack_loss`."""

    name: ClassVar[str] = "base"
    #: whether the per-image weight schedule applies (``fixed`` keeps its weight)
    schedule: ClassVar[bool] = True

    def __init__(self, *, kappa: float = 1.0, slack: float = 0.1) -> None:
        self.kappa = kappa
        self.slack = slack

    def get_params(self) -> dict[str, Any]:
        sig = inspect.signature(type(self).__init__)
        return {k: getattr(self, k) for k in sig.parameters if k != "self"}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_params().items())})"

    def targets(self, logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        """One run per entry: ``None`` (untargeted) or a (N,) tensor of target classes."""
        return [None]

    def detector_term(self, det: torch.Tensor, ctx: Context) -> torch.Tensor:
        return torch.relu(det.float() - ctx.threshold + self.slack * ctx.scale) / ctx.scale

    def __call__(self, out, det: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                 weight: torch.Tensor, ctx: Context) -> torch.Tensor:
        raise NotImplementedError


class _TopK:
    def targets(self, logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        z = logits.float().scatter(1, y[:, None], -float("inf"))
        k = max(1, min(int(self.top_k), logits.shape[1] - 1))
        order = z.topk(k, dim=1).indices
        return [order[:, i] for i in range(k)]


class MarginDetectorLoss(AdaptiveLoss):
    """Untargeted hinged margin + weighted hinged detector score."""

    name = "margin"

    def __call__(self, out, det, y, target, weight, ctx):
        return torch.relu(_margin(out.logits, y) + self.kappa) + weight * self.detector_term(det, ctx)


class MultiTargetedLoss(_TopK, AdaptiveLoss):
    """Targeted hinged margin towards each of the ``top_k`` likeliest wrong classes + hinged detector score."""

    name = "targeted"

    def __init__(self, *, kappa: float = 1.0, slack: float = 0.1, top_k: int = 3) -> None:
        super().__init__(kappa=kappa, slack=slack)
        self.top_k = top_k

    def __call__(self, out, det, y, target, weight, ctx):
        return torch.relu(self.kappa - _margin(out.logits, target)) + weight * self.detector_term(det, ctx)


class FeatureMatchLoss(_TopK, AdaptiveLoss):
    """Targeted hinged margin + distance of the pooled activations and taps to target class's clean means."""

    name = "feature"

    def __init__(self, *, kappa: float = 1.0, slack: float = 0.1, top_k: int = 2) -> None:
        super().__init__(kappa=kappa, slack=slack)
        self.top_k = top_k

    def __call__(self, out, det, y, target, weight, ctx):
        blocks = (out.pooled, *out.taps)[:len(ctx.means)]
        # per block the RMS z-score to class t's clean statistics, hinged at 1 (a clean class-t input's level)
        dist = sum(torch.relu(((b.float() - mu[target]) / sd[target]).pow(2).mean(1).sqrt() - 1)
                   for b, mu, sd in zip(blocks, ctx.means, ctx.stds, strict=True)) / len(blocks)
        return torch.relu(self.kappa - _margin(out.logits, target)) + weight * dist


class FixedWeightLoss(AdaptiveLoss):
    """The old adaptive loss: unhinged detector term at a fixed weight (for comparison only)."""

    name = "fixed"
    schedule = False

    def __call__(self, out, det, y, target, weight, ctx):
        return torch.relu(_margin(out.logits, y) + self.kappa) + weight * (det.float() - ctx.threshold) / ctx.scale


LOSSES: dict[str, type[AdaptiveLoss]] = {c.name: c for c in (MarginDetectorLoss, MultiTargetedLoss,
                                                             FeatureMatchLoss, FixedWeightLoss)}


def parse_forms(forms: str | Sequence[str | AdaptiveLoss]) -> list[AdaptiveLoss]:
    """``"strongest"``, ``"margin,targeted"`` or a sequence of names / losses -> loss objects."""
    if isinstance(forms, str):
        forms = list(STRONGEST) if forms.strip() in ("strongest", "") else [f.strip() for f in forms.split(",")]
    out = []
    for f in forms:
        if isinstance(f, AdaptiveLoss):
            out.append(f)
        elif f in LOSSES:
            out.append(LOSSES[f]())
        else:
            raise CsgguardError(f"unknown adaptive loss {f!r}; choose from strongest, {', '.join(LOSSES)}")
    if not out:
        raise CsgguardError("give at least one adaptive loss form")
    return out


def step_sizes(eps: float, steps: int, *, high: float = 0.25, low: float = 0.01) -> list[float]:
    """Cosine decay of the signed-gradient step from ``high * eps`` to ``low * eps``."""
    if steps <= 1:
        return [high * eps] * steps
    return [eps * (low + (high - low) * 0.5 * (1 + math.cos(math.pi * t / (steps - 1)))) for t in range(steps)]


def attack_loss(model, x0: torch.Tensor, y: torch.Tensor, loss: AdaptiveLoss, ctx: Context, *, eps: float,
                steps: int, weight: float, target: torch.Tensor | None = None, random_start: bool = False,
                weight_step: float = 1.5, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One run of one loss form on one batch; returns (best x_adv, its detector score; inf where never
    misclassified). Best = lowest detector score among misclassified iterates (the first included)."""
    dev = x0.device
    if random_start:
        noise = (torch.rand(x0.shape, generator=generator) * 2 - 1).to(dev) * eps
        xa = (x0 + noise).clamp(0, 1)
    else:
        xa = x0.clone()
    w = torch.full((len(x0),), float(weight), device=dev)
    ever = torch.zeros(len(x0), dtype=torch.bool, device=dev)  # misclassified at some step so far
    best_x, best_s = x0.clone(), torch.full((len(x0),), float("inf"), dtype=torch.float64, device=dev)
    alphas = step_sizes(eps, steps)
    for it in range(steps + 1):
        xa.requires_grad_(True)
        with torch.enable_grad():
            out = model.forward_signals(xa)
            det = ctx.surrogate(out.logits, out.pooled, out.taps, inputs=xa)
            value = loss(out, det, y, target, torch.where(ever, w, 0.0) if loss.schedule else w, ctx)
            (grad,) = torch.autograd.grad(value.sum(), xa)
        with torch.no_grad():
            det = det.detach().double()
            fooled = out.logits.argmax(1) != y
            ever |= fooled
            better = fooled & (det < best_s)
            best_x[better], best_s[better] = xa.detach()[better], det[better]
            if it == steps:
                break
            if loss.schedule:
                up = fooled & (det > ctx.threshold)
                down = ever & ~fooled
                w = torch.where(up, w * weight_step, torch.where(down, w / weight_step, w)).clamp(1e-3, 1e4)
            xa = xa.detach() - alphas[it] * grad.sign()
            xa = torch.min(torch.max(xa, x0 - eps), x0 + eps).clamp(0, 1)
    return best_x, best_s


def strongest_attack(model, x: torch.Tensor, y: torch.Tensor, ctx: Context, *, eps: float, steps: int = 40,
                     forms: str | Sequence[str | AdaptiveLoss] = "strongest",
                     weights: Sequence[float] = (0.5, 2.0, 8.0), seed: int = 0, batch_size: int = 256,
                     skip_evaded: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Every form x target x restart on ``x`` (correctly classified); per image the best iterate of all.

    Returns (x_adv, detector score; inf where never misclassified, {form: images whose best it gave}).
    """
    losses = parse_forms(forms)
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    best_x, best_s = x.clone(), torch.full((len(x),), float("inf"), dtype=torch.float64)
    won = torch.full((len(x),), -1, dtype=torch.int64)
    for s in range(0, len(x), batch_size):
        x0, yb = x[s:s + batch_size].to(dev), y[s:s + batch_size].to(dev)
        with torch.no_grad():
            logits0 = model.forward_signals(x0).logits
        bx, bs = x0.clone(), torch.full((len(x0),), float("inf"), dtype=torch.float64, device=dev)
        bw = torch.full((len(x0),), -1, dtype=torch.int64, device=dev)
        for li, loss in enumerate(losses):
            for target in loss.targets(logits0, yb):
                for r, w in enumerate(weights):
                    todo = ~(bs <= ctx.threshold) if skip_evaded else torch.ones_like(yb, dtype=torch.bool)
                    rows = torch.nonzero(todo).flatten()
                    if len(rows) == 0:
                        continue
                    t = None if target is None else target[rows]
                    xa, sa = attack_loss(model, x0[rows], yb[rows], loss, ctx, eps=eps, steps=steps, weight=w,
                                         target=t, random_start=r > 0, generator=gen)
                    better = sa < bs[rows]
                    idx = rows[better]
                    bx[idx], bs[idx], bw[idx] = xa[better], sa[better], li
        best_x[s:s + len(x0)], best_s[s:s + len(x0)], won[s:s + len(x0)] = bx.cpu(), bs.cpu(), bw.cpu()
    counts = {loss.name: int((won == i).sum()) for i, loss in enumerate(losses)}
    return best_x, best_s, counts


def adaptive_attack(model, x: torch.Tensor, y: torch.Tensor, detector, *, eps: float, threshold: float,
                    scale: float, steps: int = 40, weights: tuple[float, ...] = (0.5, 2.0, 8.0), seed: int = 0,
                    batch_size: int = 256, index: np.ndarray | None = None,
                    forms: str | Sequence[str | AdaptiveLoss] = "strongest", skip_evaded: bool = True):
    """The adaptive attack as an :class:`~csgguard.attacks.AdversarialSet`, scored like any other attack.

    Only correctly classified inputs are attacked; per image the strongest of every loss
    form (``forms``: ``"strongest"`` = margin, targeted and feature), target and restart
    (one per initial weight in ``weights``) is kept: the misclassified iterate with the
    lowest detector score. A row succeeds when the kept iterate is misclassified; its
    detector score is not part of success (the caller judges evasion at its threshold).
    """
    from .attacks.advset import AdversarialSet

    if not (eps > 0 and math.isfinite(eps)):
        raise CsgguardError(f"adaptive attack: eps must be a positive number, got {eps!r}")
    if steps < 1 or not weights:
        raise CsgguardError("adaptive attack: needs steps >= 1 and at least one weight")
    losses = parse_forms(forms)
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    dev = next(model.parameters()).device
    clean = extract_features(model, x, batch_size=batch_size)
    pred = clean.pred
    attacked = pred == y.numpy()
    rows = torch.as_tensor(np.flatnonzero(attacked))
    xc, yc = x[rows], y[rows]
    t = time.perf_counter()
    means, stds = [], []
    if any(isinstance(loss, FeatureMatchLoss) for loss in losses) and len(xc):
        means, stds = class_statistics(clean.subset(rows.numpy()), yc.numpy())
        means, stds = [m.to(dev) for m in means], [s.to(dev) for s in stds]
    ctx = Context(detector_surrogate(detector), float(threshold), float(scale) if scale > 0 else 1.0, means, stds)
    best_x, best_s, counts = strongest_attack(model, xc, yc, ctx, eps=eps, steps=steps, forms=losses,
                                              weights=weights, seed=seed, batch_size=batch_size,
                                              skip_evaded=skip_evaded)
    x_adv = x.clone()
    x_adv[rows] = best_x
    pred_adv = extract_features(model, x_adv, batch_size=batch_size).pred
    success = attacked & (pred_adv != y.numpy())
    name = "adaptive" if [lo.name for lo in losses] == list(STRONGEST) else "adaptive-" + "+".join(
        lo.name for lo in losses)
    meta = {"attack": name, "norm": "linf", "eps": float(eps), "steps": steps, "weights": list(weights),
            "forms": [repr(lo) for lo in losses], "best_by_form": counts, "target_detector": detector.name,
            "threshold": float(threshold), "seed": seed, "seconds": time.perf_counter() - t}
    return AdversarialSet(x=x.numpy(), x_adv=x_adv.numpy(), y=y.numpy(), pred=pred, pred_adv=pred_adv,
                          success=success, attacked=attacked,
                          index=np.arange(len(y)) if index is None else np.asarray(index), meta=meta)


# ----------------------------------------------------------------------------- `csgguard attack --method adaptive`

def _spec_base():
    from .attacks.base import AttackSpec

    return AttackSpec


def adaptive_spec(method: str):
    """The attack spec for ``adaptive`` (the strongest) or ``adaptive-<form>[+<form>...]``, or None."""
    method = str(method).lower()
    if method != "adaptive" and not method.startswith("adaptive-"):
        return None
    form = "strongest" if method == "adaptive" else method[len("adaptive-"):].replace("+", ",")
    parse_forms(form)  # unknown forms fail here, before anything is loaded

    class AdaptiveSpec(_spec_base()):
        """The adaptive attack on a run's fitted detector (``RUN/detector.json`` unless ``detector`` names
        another), at the detector's saved threshold; ``scale`` = std of its clean scores on the inputs."""

        name = method
        norms = ("linf",)
        needs_detector = True

        def __init__(self, *, norm: str = "linf", steps: int = 40, weights: tuple[float, ...] = (0.5, 2.0, 8.0),
                     detector: str | None = None) -> None:
            super().__init__(norm=norm)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise CsgguardError(f"{method}: steps must be a positive integer, got {steps!r}")
            self.steps, self.weights, self.detector = steps, tuple(float(w) for w in weights), detector

        def run(self, model, x, y, *, eps=None, batch_size=256, seed=0, device=None, progress=None, index=None,
                dataset=None, model_sha256=None, compile=False):
            from .attacks.base import _check_inputs
            from .detectors.store import load_detector

            if compile:
                log(f"note: {method} runs eager: --compile applies to foolbox's attacks, and this one reads "
                    "the detector's signals through the whole forward pass")

            x, y = _check_inputs(x, y)
            eps = self.resolve_eps(eps, dataset=dataset, shape=tuple(x.shape))
            if self.detector is None:
                raise CsgguardError(f"{method} attacks a fitted detector: give its run folder or detector.json")
            det = load_detector(self.detector, model_sha256=model_sha256)
            if not hasattr(det, "threshold_"):
                raise CsgguardError(f"{self.detector}: the detector is not calibrated (no threshold)")
            if device is not None:
                from .devices import select_device

                model.to(select_device(device))
            dev = next(model.parameters()).device
            if getattr(det, "needs_inputs", False):
                det.bind_model(model)
            scores = det.score_samples(extract_features(model, x, batch_size=batch_size, device=dev),
                                       inputs=x if det.needs_inputs else None)
            t = time.perf_counter()
            adv = adaptive_attack(model, x, y, det, eps=eps, threshold=float(det.threshold_),
                                  scale=float(np.std(scores)) or 1.0, steps=self.steps, weights=self.weights,
                                  seed=seed, batch_size=batch_size, index=index, forms=form)
            extra = adv.meta
            x_adv = torch.as_tensor(adv.x_adv)
            s_adv = det.score_samples(extract_features(model, x_adv, batch_size=batch_size, device=dev),
                                      inputs=x_adv if det.needs_inputs else None)
            evaded = adv.success & (s_adv <= det.threshold_)
            adv.meta = {**self._meta(adv, eps=eps, seed=seed, batch_size=batch_size, device=dev,
                                     seconds=time.perf_counter() - t, model_sha256=model_sha256),
                        **{k: extra[k] for k in ("forms", "best_by_form", "target_detector", "threshold")}}
            adv.meta["settings"]["detector"] = str(self.detector)
            adv.meta["evaded"] = int(evaded.sum())
            adv.meta["evasion_rate"] = float(evaded.sum() / max(int(adv.attacked.sum()), 1))
            return adv

    return AdaptiveSpec

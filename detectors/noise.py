"""``noise-response``: how the logits move under a little random noise (after Roth, Kilcher &
Hofmann, "The Odds are Odd", ICML 2019).

Why it exists. On natural images a perturbation of 2/255-4/255 leaves every statistic of the
single forward pass at chance (docs/detectors.md: the logit and feature-moment probes), yet
the adversarial input sits somewhere special: it was pushed just far enough across a
boundary, so random noise of about the budget's size moves its logits back toward the class
it came from, which noise does not do to a clean input of the same predicted class.

The statistic, clean-only. For an input x predicted as y and every other class z, the
logit gap ``g_z = f_z - f_y``; its noise response ``d_z`` is the mean of ``g_z`` over
``copies`` noisy copies ``clip(x + sigma * eta_m)`` minus ``g_z(x)``. The clean images of each
predicted class y give a mean and spread of ``d_z`` per (y, z); the score is the largest
standardised response over z != y. Clean inputs stay near 0, an adversarial one's true class
stands out.

The noise is a fixed bank of ``copies`` Gaussian images drawn from ``seed`` (the image's
shape), so an image's score does not depend on its batch, its order or the machine's random
state, and a refit draws the same bank.

Two-sided (``sides="two"``). The score's clean distribution has a low tail too: an input
pushed far past a boundary (a large single step, a confident minimisation attack) sits where
noise moves nothing, more stable than clean images of its class (on digits C&W scores *below*
clean images). ``sides="two"`` turns the one-sided score r into
``max((r - m_y) / u_y, (m_y - r) / l_y)``: m_y the median of r over the clean fit images of
predicted class y, u_y and l_y the distances from it to their 97.5th and 2.5th percentiles (the
pooled figures for a class with fewer than ``_MIN_CLASS_ROWS`` fit images), so both tails
count, each in its own clean units.

Cost: ``copies`` extra forward passes per image (8 by default: 9x one forward pass; measured
by ``benchmarks/detector_cost.py``). An option for natural images, alone or as a ``union``
part; not the default.

The score is written once, in torch (:meth:`NoiseResponseDetector.torch_score`): screening
runs it without gradients, the adaptive attack (``evaluate --adaptive-targets
noise-response``) differentiates it through the same fixed bank. An attacker who knows the
bank optimises against the exact score; Tramer et al. 2020 broke the original, whose noise
was fresh per query, by averaging over it. Do not read a non-adaptive number as robustness.
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions

from ..errors import CsgguardError
from ..features import Features
from .base import Detector

#: float64 floor on a per-(class, class) spread, so a pair every clean image answers alike cannot divide by 0
_MIN_SPREAD = 1e-6
#: fit images of one predicted class below which the two-sided units are the pooled ones
_MIN_CLASS_ROWS = 40
#: the clean quantiles whose distance from the median is a two-sided score's unit, low and high
_TAILS = (0.025, 0.975)


def noise_bank(shape: tuple[int, ...], copies: int, seed: int) -> torch.Tensor:
    """``copies`` standard Gaussian images of ``shape`` (C, H, W) from ``seed``: the same bank on every call."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((copies, *shape), generator=gen)


def logit_gaps(logits: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(N, K) ``f_z - f_y`` for each class z, y the given (predicted) class."""
    return logits - logits.gather(1, pred[:, None])


class NoiseResponseDetector(Detector):
    """Largest standardised noise-induced change of a logit gap (module docstring).

    Parameters
    ----------
    sigma : float
        Standard deviation of the Gaussian noise on [0, 1] images (default 4/255).
    copies : int
        Noisy copies per image: the extra forward passes it costs.
    seed : int
        Seed of the fixed noise bank.
    batch_size : int
        Noisy copies per forward batch (``batch_size // copies`` images at a time, at least one).
    sides : {"one", "two"}
        ``one``: large responses alone are atypical (Roth et al.); ``two``: unusually small ones
        too, each side in units of its own clean tail (module docstring).
    fpr : float
        Target clean false-positive rate of the calibrated threshold.
    """

    name = "noise-response"
    supervised = False
    needs_inputs = True
    _parameter_constraints = {
        **Detector._parameter_constraints,
        "sigma": [Interval(Real, 0, 1, closed="right")],
        "copies": [Interval(Integral, 1, None, closed="left")],
        "seed": [Interval(Integral, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "sides": [StrOptions({"one", "two"})],
    }

    def __init__(self, *, sigma: float = 4 / 255, copies: int = 8, seed: int = 0, batch_size: int = 256,
                 sides: str = "one", fpr: float = 0.05) -> None:
        super().__init__(fpr=fpr)
        self.sigma = sigma
        self.copies = copies
        self.seed = seed
        self.batch_size = batch_size
        self.sides = sides

    def _bank(self, shape: tuple[int, ...], device) -> torch.Tensor:
        """The fixed bank, scaled by ``sigma``, cached per image shape and device."""
        key = (tuple(shape), str(device), float(self.sigma), int(self.copies), int(self.seed))
        cached = getattr(self, "_bank_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, (self.sigma * noise_bank(tuple(shape), self.copies, self.seed)).to(device))
            self._bank_cache = cached
        return cached[1]

    def _gap_response(self, model, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((N, K) float64 noise response ``d_z`` of every logit gap, (N,) predicted class y), in torch;
        differentiable in ``x`` and ``logits`` (the one implementation: fit, score and attack)."""
        z0 = logits.double()
        y = z0.argmax(1)
        bank = self._bank(tuple(x.shape[1:]), x.device)
        noisy = (x[:, None].float() + bank[None]).clamp(0.0, 1.0).flatten(0, 1)
        zn = model(noisy).double().reshape(len(x), self.copies, -1).mean(1)
        return logit_gaps(zn, y) - logit_gaps(z0, y), y

    def _batches(self, features: Features, inputs):
        """(model, x, logits) per forward batch of ``batch_size`` noisy copies, on the model's device."""
        model = self._bound_model(inputs, self.name)
        device = next(model.parameters()).device
        x_all = torch.as_tensor(inputs)
        if len(x_all) != len(features):
            raise CsgguardError(f"{self.name}: {len(x_all)} input images for {len(features)} feature rows")
        step = max(1, self.batch_size // self.copies)
        for s in range(0, len(x_all), step):
            x = x_all[s:s + step].to(device).float()
            yield model, x, torch.as_tensor(features.logits[s:s + len(x)], device=device)

    @torch.no_grad()
    def responses(self, features: Features, inputs) -> np.ndarray:
        """(N, K) float64 noise response ``d_z`` of every logit gap, per input (its predicted class y: 0)."""
        out = [self._gap_response(model, x, z)[0].cpu().numpy() for model, x, z in self._batches(features, inputs)]
        k = features.logits.shape[1] if len(features) else 0
        return np.concatenate(out) if out else np.zeros((0, k))

    def torch_score(self, logits: torch.Tensor, pooled: torch.Tensor | None = None, taps=(), *,
                    inputs: torch.Tensor) -> torch.Tensor:
        """The score of :meth:`score_samples` for the batch ``inputs`` whose logits are ``logits``; float64,
        differentiable in both (used by screening and by the adaptive attack). The whole batch runs at
        once, ``copies`` noisy images per input: the attack's batch size (``--batch-size``) bounds its
        memory, not ``batch_size``."""
        model = self._bound_model(inputs, self.name)
        d, y = self._gap_response(model, inputs, logits)
        r = self._one_sided(d, y)
        if self.sides == "one":
            return r
        center, upper, lower = (torch.as_tensor(a, device=r.device)[y] for a in (self.center_, self.upper_, self.lower_))
        return torch.maximum((r - center) / upper, (center - r) / lower)

    def _one_sided(self, d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) the largest standardised response over z != y: Roth et al.'s statistic."""
        mean = torch.as_tensor(self.mean_, device=d.device)[y]
        spread = torch.as_tensor(self.spread_, device=d.device)[y]
        t = (d - mean) / spread
        own = torch.nn.functional.one_hot(y, t.shape[1]).bool()
        return t.masked_fill(own, -float("inf")).max(1).values

    def _fit(self, clean: Features, adversarial=None, *, inputs=None, adversarial_inputs=None) -> None:
        d = self.responses(clean, inputs)
        pred = np.asarray(clean.pred)
        k = int(clean.num_classes)
        mean = np.zeros((k, k))
        spread = np.ones((k, k))
        for c in range(k):
            rows = d[pred == c]
            if len(rows) >= 2:
                mean[c] = rows.mean(0)
                spread[c] = np.maximum(rows.std(0, ddof=1), _MIN_SPREAD)
        self.mean_, self.spread_ = mean, spread
        self.class_counts_ = np.bincount(pred, minlength=k).astype(np.int64)
        self.num_classes_ = k
        if self.sides == "two":
            r = self._one_sided(torch.from_numpy(d), torch.from_numpy(pred)).numpy()
            self.center_, self.upper_, self.lower_ = _tail_units(r, pred, k)

    @torch.no_grad()
    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        out = [self.torch_score(z, inputs=x).cpu().numpy() for _, x, z in self._batches(features, inputs)]
        return np.concatenate(out) if out else np.zeros(0)

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"mean_": self.mean_, "spread_": self.spread_, "class_counts_": self.class_counts_}
        if self.sides == "two":
            arrays.update(center_=self.center_, upper_=self.upper_, lower_=self.lower_)
        return arrays, {"num_classes_": int(self.num_classes_)}

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        mean = np.asarray(arrays.get("mean_", np.zeros(0)), dtype=np.float64)
        spread = np.asarray(arrays.get("spread_", np.zeros(0)), dtype=np.float64)
        k = int(extra.get("num_classes_", 0))
        if (mean.shape != (k, k) or spread.shape != (k, k) or k < 2 or not np.all(np.isfinite(mean))
                or not np.all(np.isfinite(spread)) or np.any(spread <= 0)):
            raise CsgguardError("noise-response state holds no valid (class x class) means and spreads")
        self.mean_, self.spread_, self.num_classes_ = mean, spread, k
        self.class_counts_ = np.asarray(arrays.get("class_counts_", np.zeros(k)), dtype=np.int64)
        if self.sides == "two":
            units = [np.asarray(arrays.get(n, np.zeros(0)), dtype=np.float64) for n in ("center_", "upper_", "lower_")]
            if (any(u.shape != (k,) or not np.all(np.isfinite(u)) for u in units)
                    or np.any(units[1] <= 0) or np.any(units[2] <= 0)):
                raise CsgguardError("two-sided noise-response state holds no valid per-class centre and tail units")
            self.center_, self.upper_, self.lower_ = units


def _tail_units(r: np.ndarray, pred: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per predicted class: the median of the clean one-sided scores ``r`` and its distances to the
    two ``_TAILS`` quantiles; a class with fewer than ``_MIN_CLASS_ROWS`` rows takes the pooled ones."""
    def units(v: np.ndarray) -> tuple[float, float, float]:
        lo, mid, hi = np.quantile(v, [_TAILS[0], 0.5, _TAILS[1]])
        return float(mid), max(float(hi - mid), _MIN_SPREAD), max(float(mid - lo), _MIN_SPREAD)

    finite = np.isfinite(r)
    pooled = units(r[finite]) if finite.any() else (0.0, 1.0, 1.0)
    out = np.array([units(r[finite & (pred == c)]) if np.sum(finite & (pred == c)) >= _MIN_CLASS_ROWS else pooled
                    for c in range(k)])
    return out[:, 0].copy(), out[:, 1].copy(), out[:, 2].copy()

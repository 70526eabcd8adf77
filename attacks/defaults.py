"""Per-dataset attack budgets, and the norm arithmetic every attack shares.

Budgets are in [0, 1] pixel units (8/255 is not 8/256). The digits and MNIST
defaults sit in the range where detection is informative (the method notes: at
Linf 0.3 every detector saturates); CIFAR-10 uses the usual 8/255 and L2 0.5.
digits images are 8x8, so their L2 budget is smaller than MNIST's 28x28.
:data:`DEFAULT_SWEEP` holds the budgets a sweep (``csgguard evaluate``) runs by default.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import CsgguardError

NORMS = ("linf", "l2")

DEFAULT_EPS: dict[str, dict[str, float]] = {
    "digits": {"linf": 0.1, "l2": 1.0},
    "mnist": {"linf": 0.1, "l2": 1.5},
    "cifar10": {"linf": 8 / 255, "l2": 0.5},
}


#: the budgets ``csgguard evaluate`` (and a supervised ``csgguard fit``) sweeps by default, per norm.
#: MNIST's range spans the informative small budgets up to the saturating 0.3; digits images are
#: 8x8, so their L2 budgets stay below MNIST's; CIFAR-10 follows the usual 2/255 .. 16/255.
DEFAULT_SWEEP: dict[str, dict[str, tuple[float, ...]]] = {
    "digits": {"linf": (0.05, 0.1, 0.2, 0.3), "l2": (0.5, 1.0, 1.5)},
    "mnist": {"linf": (0.05, 0.1, 0.2, 0.3), "l2": (0.5, 1.0, 2.0)},
    "cifar10": {"linf": (2 / 255, 4 / 255, 8 / 255, 16 / 255), "l2": (0.25, 0.5, 1.0)},
}


def dataset_family(dataset: str | None, shape: tuple[int, ...]) -> str:
    """The defaults table to use: the dataset's own name, else a guess from the image shape."""
    if dataset in DEFAULT_EPS:
        return dataset
    c, h = shape[-3], shape[-2]
    if c == 1:
        return "digits" if h <= 8 else "mnist"
    return "cifar10"


def default_eps(norm: str, dataset: str | None, shape: tuple[int, ...]) -> float:
    return DEFAULT_EPS[dataset_family(dataset, shape)][norm]


def default_sweep(norm: str, dataset: str | None, shape: tuple[int, ...]) -> tuple[float, ...]:
    return DEFAULT_SWEEP[dataset_family(dataset, shape)][norm]


def check_norm(norm: str, allowed: tuple[str, ...], attack: str) -> str:
    norm = str(norm).lower()
    norm = {"l_inf": "linf", "inf": "linf", "2": "l2"}.get(norm, norm)
    if norm not in allowed:
        raise CsgguardError(f"{attack} does not support norm {norm!r}; choose {' or '.join(allowed)}")
    return norm


def check_eps(eps: float, norm: str, shape: tuple[int, ...] | None = None) -> float:
    """Linf budgets live in (0, 1]; an L2 budget may exceed 1 but not the image's diameter."""
    try:
        eps = float(eps)
    except (TypeError, ValueError):
        raise CsgguardError(f"eps {eps!r} is not a number") from None
    if not math.isfinite(eps) or eps <= 0:
        raise CsgguardError(f"eps must be > 0 (pixel units in [0, 1]), got {eps:g}")
    if norm == "linf" and eps > 1:
        raise CsgguardError(f"eps {eps:g} is outside (0, 1]: Linf budgets are in [0, 1] pixel units "
                            "(write 8/255, not 8)")
    if norm == "l2" and shape is not None:
        limit = math.sqrt(float(np.prod(shape[-3:])))
        if eps > limit:
            raise CsgguardError(f"L2 eps {eps:g} exceeds the largest possible perturbation {limit:.3g} "
                                f"for {'x'.join(map(str, shape[-3:]))} images in [0, 1]")
    return eps


def perturbation_norms(x: np.ndarray, x_adv: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample L2 and Linf norms of ``x_adv - x`` (float64, so the sums are exact enough)."""
    d = (x_adv.astype(np.float64) - x.astype(np.float64)).reshape(len(x), int(np.prod(x.shape[1:])))
    return {"l2": np.sqrt((d * d).sum(axis=1)), "linf": np.abs(d).max(axis=1)}


def norm_stats(norms: dict[str, np.ndarray], norm: str) -> dict[str, float | None]:
    """Median and max in the attack's norm and in L2 / Linf (``None`` when nothing succeeded)."""
    def stat(fn, v):
        return float(fn(v)) if len(v) else None

    out: dict[str, float | None] = {"norm": norm,  # type: ignore[dict-item]
                                    "median": stat(np.median, norms[norm]), "max": stat(np.max, norms[norm]),
                                    "mean": stat(np.mean, norms[norm])}
    for n in NORMS:
        out[f"{n}_median"] = stat(np.median, norms[n])
        out[f"{n}_max"] = stat(np.max, norms[n])
    return out

"""Budget sweeps: attack names x budgets -> the cells that ``evaluate`` and ``fit`` run.

Sweep names (what ``--attacks`` accepts):

==========  ==========  =========  ====================================================
name        attack      norm       budgets
==========  ==========  =========  ====================================================
fgsm        fgsm        linf       every Linf budget (``--eps``)
pgd         pgd         linf       every Linf budget
bim         bim         linf       every Linf budget
pgd-l2      pgd         l2         every L2 budget (``--l2-eps``)
bim-l2      bim         l2         every L2 budget
cw          cw          (L2 min)   one cell: minimum-norm, no budget
deepfool    deepfool    (min)      one cell: minimum-norm, no budget
==========  ==========  =========  ====================================================

A cell is one attack at one budget; its id is ``pgd@0.1``, ``pgd-l2@1.5``,
``fgsm@8/255`` or plain ``cw``. Budgets are pixel units in [0, 1] (8/255 is not
8/256); Linf budgets must lie in (0, 1], L2 budgets must be > 0 (and, once the image
shape is known, at most the image's diameter). Everything here is pure Python, so the
CLI can check a request before importing torch or loading anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import CsgguardError

#: sweep name -> (csgguard.attacks name, norm; None for minimum-norm attacks)
SWEEP_ATTACKS: dict[str, tuple[str, str | None]] = {
    "fgsm": ("fgsm", "linf"),
    "pgd": ("pgd", "linf"),
    "bim": ("bim", "linf"),
    "pgd-l2": ("pgd", "l2"),
    "bim-l2": ("bim", "l2"),
    "cw": ("cw", None),
    "deepfool": ("deepfool", None),
}
#: the option that sets each norm's budgets, for error messages
BUDGET_OPTION = {"linf": "--eps", "l2": "--l2-eps"}


def parse_fraction(value: str | float, name: str = "value", *, example: str = "8/255") -> float:
    """'8/255' -> 0.03137..., '0.1' -> 0.1; a clear error otherwise (``example`` shows a valid fraction)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(float(value)):
            raise CsgguardError(f"{name} {value!r} is not a finite number")
        return float(value)
    text = str(value).strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            out = float(num) / float(den)
        else:
            out = float(text)
    except (ValueError, ZeroDivisionError):
        raise CsgguardError(f"{name} {value!r} is not a number or fraction like {example}") from None
    if not math.isfinite(out):
        raise CsgguardError(f"{name} {value!r} is not a finite number")
    return out


def parse_budget_list(value: str | float | Sequence[str | float] | None, name: str) -> tuple[float, ...] | None:
    """'0.05,0.1,8/255' (or a number, or a sequence of either) -> floats; None stays None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else (
        [value] if isinstance(value, (int, float)) else list(value))
    items = [i for i in items if str(i).strip()]
    if not items:
        raise CsgguardError(f"{name} is empty; give comma-separated budgets such as 0.05,0.1 or 2/255,8/255")
    return tuple(parse_fraction(i, name) for i in items)


def format_eps(eps: float) -> str:
    """0.1 -> '0.1', 8/255 -> '8/255', 1.5/255 -> '1.5/255', 0.2 -> '0.2' (short decimals win over
    /255; half steps of 1/255 read as they were typed, and parse back through parse_fraction)."""
    if abs(eps - round(eps, 3)) < 1e-9:
        return f"{round(eps, 3):g}"
    k = eps * 255
    if abs(2 * k - round(2 * k)) < 1e-6:
        return f"{round(2 * k) / 2:g}/255"
    return f"{eps:.4g}"


def check_budgets(values: Iterable[float], norm: str, name: str | None = None,
                  shape: tuple[int, ...] | None = None) -> tuple[float, ...]:
    """Sorted unique budgets, each in (0, 1] (Linf) or > 0 and within the image diameter (L2)."""
    name = name or BUDGET_OPTION[norm]
    out = []
    for v in values:
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise CsgguardError(f"{name} {v!r} is not a number") from None
        if not math.isfinite(v) or v <= 0 or (norm == "linf" and v > 1):
            if norm == "linf":
                raise CsgguardError(f"{name} {v:g} is outside (0, 1]: Linf budgets are in [0, 1] pixel units "
                                    "(write 8/255, not 8)")
            raise CsgguardError(f"{name} {v:g} must be > 0: an L2 budget is a positive length in [0, 1] pixel units")
        if norm == "l2" and shape is not None:
            limit = math.sqrt(float(math.prod(shape[-3:])))
            if v > limit:
                raise CsgguardError(f"{name} {v:g} exceeds the largest possible L2 perturbation {limit:.3g} of "
                                    f"{'x'.join(map(str, shape[-3:]))} images in [0, 1]")
        out.append(v)
    if not out:
        raise CsgguardError(f"{name} is empty")
    return tuple(sorted(set(out)))


def check_attack_names(names: Iterable[str], what: str = "attack") -> tuple[str, ...]:
    names = tuple(str(n).strip().lower() for n in names if str(n).strip())
    if not names:
        raise CsgguardError(f"give at least one {what}")
    for n in names:
        base = n.split("@", 1)[0]
        if base not in SWEEP_ATTACKS:
            raise CsgguardError(f"unknown {what} {base!r}; choose from {', '.join(SWEEP_ATTACKS)}")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class Cell:
    """One attack at one budget (``eps`` None for a minimum-norm attack)."""

    attack: str
    eps: float | None = None

    @property
    def method(self) -> str:
        return SWEEP_ATTACKS[self.attack][0]

    @property
    def norm(self) -> str | None:
        return SWEEP_ATTACKS[self.attack][1]

    @property
    def id(self) -> str:
        return self.attack if self.eps is None else f"{self.attack}@{format_eps(self.eps)}"

    def __str__(self) -> str:
        return self.id


def build_cells(attacks: Iterable[str], linf: Sequence[float], l2: Sequence[float]) -> list[Cell]:
    """Every attack at every budget of its norm (``pgd@0.1``) or a given one; minimum-norm attacks once."""
    cells: list[Cell] = []
    for name in check_attack_names(attacks):
        base, _, budget = name.partition("@")
        norm = SWEEP_ATTACKS[base][1]
        if norm is None:
            if budget:
                raise CsgguardError(f"{base} is a minimum-norm attack: it takes no budget ({name!r})")
            cells.append(Cell(base))
        elif budget:
            (eps,) = check_budgets([parse_fraction(budget, f"budget of {base}")], norm, f"budget of {base}")
            cells.append(Cell(base, eps))
        else:
            cells += [Cell(base, e) for e in (linf if norm == "linf" else l2)]
    return list(dict.fromkeys(cells))


def resolve_budgets(eps: Sequence[float] | None, norm: str, dataset: str | None,
                    shape: tuple[int, ...]) -> tuple[float, ...]:
    """The given budgets (checked against the image shape) or the dataset's default sweep."""
    if eps is None:
        from .attacks.defaults import default_sweep

        return tuple(default_sweep(norm, dataset, shape))
    return check_budgets(eps, norm, shape=shape)

"""The gate-pattern detection statistics, written once, in torch.

Everything that scores an input with the ``csg-clean`` / ``csg-supervised`` statistics
calls this module: the detectors (numpy in, numpy out, through :func:`score_numpy`),
the adaptive attack (which differentiates the very same function), and every study
script. There is no second copy to drift out of step.

Precision: the arithmetic runs in the dtype of the fitted arrays handed in. Fitting
(covariances, their inverses, the out-of-fold units) and the adaptive attack's
gradients use float64; screening uses :data:`SCREEN_DTYPE` (float32), the precision of
the features themselves (the network computes them in float32 or bf16), which halves
the cost of the two matrix products that dominate a score (benchmarks/detector_cost.py).
The two agree to float32 rounding (up to about 1.5e-4 relative on far-off scores; tests/test_detectors.py).

The statistics of one forward pass (``logits``, ``pooled`` gated-layer activations,
``taps`` = channel means of earlier layers), each a *component*:

``tap<i>``   log class-conditional Mahalanobis distance of tap i to the predicted
             class's clean mean (tied Ledoit-Wolf covariance; Lee et al. 2018's
             feature ensemble). Shallow layers see the perturbation itself, so they
             keep seeing it as the budget grows.
``taps-joint`` the same over all taps' channel means at once (one column instead of
             one per tap: where the earlier layers carry nothing, as on natural
             images at small budgets, they add one noise column to a sum, not several).
``votes``    which class the earlier layers vote for: the log-odds against the predicted
             class, ``log sum_{c != pred} p(c | taps) / p(pred | taps)``, under Gaussian
             classes with the taps-joint means and tied covariance (equal priors), i.e.
             how much nearer another class's clean mean the earlier layers sit than the
             predicted one's. An input pushed from class y into c keeps y's evidence
             before the decision: where the earlier layers are not unusual in absolute
             terms (class means close together, natural images at small budgets) they
             still lean towards y (docs/detectors.md, "the sixth question").
``pattern``  log Mahalanobis distance of the pooled gated-layer activations to the
             predicted class's clean pattern: is this the way class c's filters fire?
             ``covariance="class"`` fits one covariance per class, ``"tied"`` one
             shared by all classes (Lee et al. 2018's form; steadier on natural images).
``mismatch`` share of activation mass on filters whose gate is closed for the
             predicted class (a pseudo-gate from class means on a STD model).
``margin``   log of the top-1 minus top-2 logit: small on a decision boundary (where
             minimum-norm attacks stop), large for an over-confident input.
``norm``     log L2 norm of the pooled activations.

``margin``, ``norm`` and ``mismatch`` are read two-sided: an input can be atypical in
either direction (a strong attack makes the pattern *more* concentrated on the
predicted class than a clean input's, so "more mismatch = adversarial" points the
wrong way). The distances are one-sided: only a large distance is atypical.

Combining: each component is standardised per predicted class with clean means and
standard deviations measured *out of fold* (statistics fitted on one half of the clean
fit images, components read on the other, and vice versa), so a held-out clean input
gets z-scores near N(0, 1) even where in-sample distances would be optimistic.
The z-scores of different components have very different tails (a log margin has a
long one: clean inputs near a boundary), so they are then put on one scale, the clean
*surprise* ``s = -log P_clean(Z >= z)``, read off out-of-fold clean quantiles
(piecewise linear in z, extended linearly past the last quantile, so it stays
monotone, unbounded and differentiable almost everywhere). Combiners:

``max``      the largest surprise (the most atypical component decides);
``sum``      the summed surprises (Fisher's method: weak evidence from several adds up);
``zmax``     the largest z-score, without the common scale;
``density``  the Mahalanobis distance of the component vector to the predicted
             class's clean mean (Ledoit-Wolf).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .errors import CsgguardError

#: the component families, in the order a vector of them is laid out (taps expand to tap0, tap1, ...)
COMPONENTS = ("taps", "taps-joint", "votes", "pattern", "mismatch", "margin", "norm")
#: how ``pattern`` reads the gated layer: one covariance per predicted class, or one tied covariance
COVARIANCES = ("class", "tied")
#: components atypical in both directions
TWO_SIDED = ("mismatch", "margin", "norm")
COMBINERS = ("max", "sum", "zmax", "density")
#: surprise levels of the stored clean quantiles: s = -log(1 - level), 0 .. log(n) in this many steps
TAIL_LEVELS = 48
#: above this many filters one tied covariance replaces the per-class ones (memory: C * K * K floats)
PER_CLASS_MAX_K = 512
#: the arithmetic of every screening score (fitting and gradients stay float64; module docstring)
SCREEN_DTYPE = torch.float32
_EPS = 1e-12
_MARGIN_FLOOR = 1e-6
_VOTES_FLOOR = -1e4


def parse_choices(value: str | Sequence[str], choices: Sequence[str], param: str, what: str) -> tuple[str, ...]:
    """``"a,b"`` or a list of names -> the names, checked against ``choices`` and returned in their
    order (so two spellings of one set are one set); errors name the parameter and what a name is."""
    if not isinstance(value, (str, list, tuple)):
        raise CsgguardError(f"{param} must be comma-separated names or a list of them, got {value!r}; "
                            f"choose from {', '.join(choices)}")
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else map(str, value))]
    names = [n for n in names if n]
    bad = [n for n in names if n not in choices]
    if bad or not names:
        raise CsgguardError(f"unknown {what} {bad[0] if bad else '(none)'!r}; choose from {', '.join(choices)}")
    return tuple(c for c in choices if c in names)


def parse_components(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"taps,pattern"`` or a sequence -> a validated tuple of component families, in canonical order."""
    return parse_choices(value, COMPONENTS, "components", "detector component")


def check_covariance(value: str) -> str:
    if value not in COVARIANCES:
        raise CsgguardError(f"covariance must be one of {', '.join(COVARIANCES)}, not {value!r}")
    return value


def uses_taps(components: Sequence[str]) -> bool:
    return "taps" in components or "taps-joint" in components or "votes" in components


def expand(components: Sequence[str], n_taps: int) -> list[str]:
    """Component families -> the names of the vector's columns (``taps`` -> tap0 .. tap{n-1})."""
    out: list[str] = []
    for c in components:
        out += [f"tap{i}" for i in range(n_taps)] if c == "taps" else [c]
    return out


# ----------------------------------------------------------------------------- torch maths

def quad(r: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Row-wise ``r P r^T``. A lone row is computed inside a two-row product, so that a
    score never depends on how many other inputs share its batch (gemv vs gemm order)."""
    if r.shape[0] == 1:
        return quad(torch.cat([r, r]), precision)[:1]
    return ((r @ precision) * r).sum(1).clamp_min(0.0)  # >= 0 in exact arithmetic; rounding may dip under


def class_quad(r: torch.Tensor, pred: torch.Tensor, precisions: torch.Tensor) -> torch.Tensor:
    """``quad`` with the predicted class's own precision (``precisions``: (C, K, K), or (1, K, K) tied)."""
    if precisions.shape[0] == 1:
        return quad(r, precisions[0])
    if torch.compiler.is_compiling():
        # torch.compile (``screen --compile``) needs shapes that do not hang on the predictions: every
        # row through every class's precision, the predicted one kept (C times the flops of a (K, K)
        # product per row, small beside the network; the same numbers up to float rounding)
        rp = torch.einsum("nk,ckl->cnl", r, precisions)
        rp = rp.gather(0, pred[None, :, None].expand(1, *r.shape))[0]
        return (rp * r).sum(1).clamp_min(0.0)
    # rows grouped by class once (one gather, one scatter back) rather than masked per class
    order = torch.argsort(pred, stable=True)
    counts = torch.bincount(pred, minlength=precisions.shape[0]).tolist()
    grouped, parts, start = r[order], [], 0
    for c, n in enumerate(counts):
        if n:
            parts.append(quad(grouped[start:start + n], precisions[c]))
            start += n
    if not parts:
        return r.new_zeros(0)
    return torch.empty(len(r), dtype=r.dtype, device=r.device).index_put((order,), torch.cat(parts))


def layer_vote_logodds(t: torch.Tensor, pred: torch.Tensor, means: torch.Tensor,
                       precision: torch.Tensor) -> torch.Tensor:
    """The log-odds against the predicted class, ``log sum_{c != pred} p(c | t) / p(pred | t)``, for
    Gaussian classes with ``means`` (C, D) and one shared ``precision`` (equal priors); the vote
    surprise ``-log p(pred | t)`` is its softplus. Very negative when ``t`` sits far nearer the
    predicted class than any other, near or above 0 when another class explains it as well.

    Only the differences ``d_c - d_pred = |m_c - m_pred|_P^2 - 2 (r P) . (m_c - m_pred)`` enter
    (``r`` the residual to the predicted mean), never the distances themselves: an input far from
    every class (large, nearly equal distances) would otherwise lose the answer to cancellation in
    float32; and the log-odds keep their resolution where ``-log p`` rounds to 0."""
    r = t - means[pred]                                   # (N, D)
    rp = r @ precision                                    # (N, D)
    # only differences of means enter: centre them first, so that their common offset (channel
    # means of ReLU maps are all positive) does not cancel in float32
    means = means - means.mean(0, keepdim=True)
    g = (means @ precision) @ means.t()                   # (C, C): m_a P m_b
    cross = rp @ means.t()                                # (N, C): r P m_c
    cross = cross - cross.gather(1, pred[:, None])        # r P (m_c - m_pred)
    gd = g.diagonal()
    delta = gd[None, :] - 2 * g[pred] + gd[pred][:, None]  # |m_c - m_pred|_P^2
    logit = -0.5 * (delta - 2 * cross)                    # log p(c | t) / p(pred | t); 0 at pred
    own = torch.zeros_like(logit, dtype=torch.bool).scatter_(1, pred[:, None], True)
    return torch.logsumexp(logit.masked_fill(own, float("-inf")), 1)


def component_matrix(arrays: dict[str, torch.Tensor], components: Sequence[str], logits: torch.Tensor,
                     pooled: torch.Tensor, taps: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, M) raw component values (before standardisation), in the arrays' dtype, differentiable."""
    dt = arrays["means_"].dtype
    logits, pooled = logits.to(dt), pooled.to(dt)
    pred = logits.argmax(1)
    cols: list[torch.Tensor] = []
    joint: list[torch.Tensor] = []  # the taps side by side, made once for taps-joint and votes

    def joint_taps() -> torch.Tensor:
        if not joint:
            joint.append(torch.cat([t.to(dt) for t in taps[:n_taps]], 1))
        return joint[0]

    for c in components:
        if c in ("taps", "taps-joint", "votes"):
            n_taps = tap_count(arrays)
            if len(taps) < n_taps:
                raise CsgguardError(f"the detector reads {n_taps} taps but the features carry {len(taps)} "
                                    "(features from an older csgguard or another model?)")
        if c == "taps":
            for i in range(n_taps):
                r = taps[i].to(dt) - arrays[f"tap_means_{i}"][pred]
                cols.append(torch.log(quad(r, arrays[f"tap_precision_{i}"]) + _EPS))
        elif c == "taps-joint":
            r = joint_taps() - arrays["tapj_means"][pred]
            cols.append(torch.log(quad(r, arrays["tapj_precision"]) + _EPS))
        elif c == "votes":
            # floored only so that a model with one class (no other vote: -inf) gives a finite column
            odds = layer_vote_logodds(joint_taps(), pred, arrays["tapj_means"], arrays["tapj_precision"])
            cols.append(odds.clamp_min(_VOTES_FLOOR))
        elif c == "pattern":
            r = pooled - arrays["means_"][pred]
            cols.append(torch.log(class_quad(r, pred, arrays["class_precision_"]) + _EPS))
        elif c == "mismatch":
            a = pooled.abs()
            closed = 1.0 - arrays["gate_"].t()[pred]
            cols.append((a * closed).sum(1) / a.sum(1).clamp_min(_EPS))
        elif c == "margin":
            if logits.shape[1] < 2:
                cols.append(torch.zeros(len(logits), dtype=logits.dtype, device=logits.device))
            else:
                top2 = logits.topk(2, dim=1).values
                cols.append(torch.log(top2[:, 0] - top2[:, 1] + _MARGIN_FLOOR))
        elif c == "norm":
            cols.append(torch.log(pooled.norm(dim=1) + _EPS))
        else:  # parse_components guards every public entry
            raise CsgguardError(f"unknown detector component {c!r}")
    return torch.stack(cols, 1)


def standardised(arrays: dict[str, torch.Tensor], names: Sequence[str], v: torch.Tensor,
                 pred: torch.Tensor) -> torch.Tensor:
    """Per-class clean z-scores, two-sided columns folded to |z|."""
    z = (v - arrays["comp_mean_"][pred]) / arrays["comp_std_"][pred]
    two = torch.tensor([n in TWO_SIDED for n in names], device=z.device)
    return torch.where(two, z.abs(), z)


def score(arrays: dict[str, torch.Tensor], components: Sequence[str], combine: str, logits: torch.Tensor,
          pooled: torch.Tensor, taps: Sequence[torch.Tensor] = ()) -> torch.Tensor:
    """The ``csg-clean`` score (higher = more adversarial), in the arrays' dtype, differentiable in the inputs."""
    v = component_matrix(arrays, components, logits, pooled, taps)
    pred = logits.argmax(1)
    names = expand(components, tap_count(arrays) if "taps" in components else 0)
    if combine == "zmax":
        return standardised(arrays, names, v, pred).max(1).values
    if combine in ("max", "sum"):
        s = surprise(arrays, standardised(arrays, names, v, pred))
        return s.max(1).values if combine == "max" else s.sum(1)
    if combine == "density":
        return quad(v - arrays["comp_mean_"][pred], arrays["comp_precision_"])
    raise CsgguardError(f"unknown combine {combine!r}; choose from {', '.join(COMBINERS)}")


def surprise(arrays: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """(N, M) clean surprise ``-log P(Z >= z)`` per column, from the stored quantiles ``tail_q_`` (M, L)."""
    q, levels = arrays["tail_q_"], arrays["tail_s_"]                 # (M, L), (L,)
    # segment [hi-1, hi] with q[hi-1] < z <= q[hi], ends extended: searchsorted's index, counted by
    # comparison so that a compiled score fuses it (L is small) and no transposed copy is needed
    hi = (q < z.detach()[..., None]).sum(-1).clamp(1, q.shape[1] - 1)  # (N, M)
    cols = torch.arange(q.shape[0], device=z.device)
    q0, q1 = q[cols, hi - 1], q[cols, hi]
    s0, s1 = levels[hi - 1], levels[hi]
    return (s0 + (z - q0) * (s1 - s0) / (q1 - q0)).clamp_min(0.0)


def tail_table(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles of each column of ``u`` at evenly spaced surprise levels (strictly increasing)."""
    n = len(u)
    s = np.linspace(0.0, np.log(max(n, 2)), TAIL_LEVELS)
    q = np.ascontiguousarray(np.quantile(u, 1.0 - np.exp(-s), axis=0).T)  # (M, L)
    for j in range(1, q.shape[1]):                                   # ties would make a flat, gradient-free step
        q[:, j] = np.maximum(q[:, j], q[:, j - 1] + 1e-6)
    return q, s


# ----------------------------------------------------------------------------- numpy glue + fitting

def to_torch(arrays: dict[str, np.ndarray], device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """The fitted arrays as tensors; their ``dtype`` is the arithmetic every score made from them runs in
    (fitted in float64, cast once: the precision matrices are inverted before any rounding to float32).
    Counts (:data:`COUNTS`) become Python ints: they decide loops, and a compiled score must not
    read a tensor's value to know its own shape."""
    return {k: int(np.asarray(v).item()) if k in COUNTS else
            torch.as_tensor(np.ascontiguousarray(v, dtype=np.float64), device=device).to(dtype)
            for k, v in arrays.items()}


COUNTS = ("n_taps",)


def tap_count(arrays: dict) -> int:
    """How many taps the fitted arrays read (numpy arrays, or :func:`to_torch`'s dict)."""
    return int(np.asarray(arrays["n_taps"]).item()) if not isinstance(arrays["n_taps"], int) else arrays["n_taps"]


def as_tensors(features, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``(logits, pooled, taps)`` of a :class:`~csgguard.features.Features` as CPU tensors of ``dtype``."""
    def t(a):
        return torch.from_numpy(np.asarray(a)).to(dtype)
    return t(features.logits), t(features.pooled), [t(x) for x in features.taps]


@torch.no_grad()
def components_numpy(arrays_t: dict[str, torch.Tensor], components: Sequence[str], features) -> np.ndarray:
    """Raw component values of ``features`` (N, M) as float64, computed in the arrays' dtype."""
    logits, pooled, taps = as_tensors(features, arrays_t["means_"].dtype)
    return component_matrix(arrays_t, components, logits, pooled, taps).double().numpy()


@torch.no_grad()
def score_numpy(arrays_t: dict[str, torch.Tensor], components: Sequence[str], combine: str, features) -> np.ndarray:
    """The score of ``features`` (N,) as float64, computed in the arrays' dtype."""
    logits, pooled, taps = as_tensors(features, arrays_t["means_"].dtype)
    return score(arrays_t, components, combine, logits, pooled, taps).double().numpy()


def shrunk_precision(residuals: np.ndarray) -> np.ndarray:
    """Ledoit-Wolf shrunk inverse covariance: stable with fewer samples than dimensions."""
    from sklearn.covariance import LedoitWolf

    if len(residuals) < 2:
        return np.eye(residuals.shape[1])
    return LedoitWolf(assume_centered=True).fit(residuals).precision_


def class_means(x: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, D) mean per predicted class (the overall mean for a class with no sample)."""
    return np.stack([x[pred == c].mean(0) if np.any(pred == c) else x.mean(0) for c in range(num_classes)])


def pseudo_gate(pooled: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """A gate for a model without one: per-class mean |activation|, each filter's row max-normalised
    (the normalisation the CSG gate receives after every step), so ``mismatch`` means the same on both."""
    means = class_means(np.abs(np.asarray(pooled, dtype=np.float64)), pred, num_classes).T  # (K, C)
    return np.clip(means / np.maximum(means.max(1, keepdims=True), _EPS), 0.0, 1.0)


def fit_statistics(features, gate: np.ndarray, covariance: str = "class") -> dict[str, np.ndarray]:
    """Per-class clean statistics of the pattern and the taps (everything but the combiner)."""
    pred, c_num = features.pred, features.num_classes
    a = np.asarray(features.pooled, dtype=np.float64)
    means = class_means(a, pred, c_num)
    r = a - means[pred]
    if check_covariance(covariance) == "class" and a.shape[1] <= PER_CLASS_MAX_K:
        tied = shrunk_precision(r)
        prec = np.stack([shrunk_precision(r[pred == c]) if np.sum(pred == c) > 2 else tied for c in range(c_num)])
    else:
        prec = shrunk_precision(r)[None]
    out = {"gate_": np.asarray(gate, dtype=np.float64), "means_": means, "class_precision_": prec,
           "n_taps": np.asarray(len(features.taps), dtype=np.float64)}
    for i, t in enumerate(features.taps):
        t = np.asarray(t, dtype=np.float64)
        m = class_means(t, pred, c_num)
        out[f"tap_means_{i}"] = m
        out[f"tap_precision_{i}"] = shrunk_precision(t - m[pred])
    if features.taps:
        t = np.concatenate([np.asarray(t, dtype=np.float64) for t in features.taps], 1)
        m = class_means(t, pred, c_num)
        out["tapj_means"], out["tapj_precision"] = m, shrunk_precision(t - m[pred])
    return out


def fit_profile(features, gate: np.ndarray, components: Sequence[str], *, covariance: str = "class",
                seed: int = 0) -> dict[str, np.ndarray]:
    """Fit every array :func:`score` needs, from clean features (see the module docstring).

    The combiner's per-class means / standard deviations (and the density's covariance)
    are measured out of fold: two halves, statistics from one, components on the other.
    """
    n = len(features)
    if n < 4:
        raise CsgguardError(f"{n} clean images are too few to fit the detector (need at least 4)")
    pred, c_num = features.pred, features.num_classes
    arrays = fit_statistics(features, gate, covariance)
    order = np.random.default_rng(seed).permutation(n)
    halves = (order[: n // 2], order[n // 2:])
    v = np.empty((n, len(expand(components, len(features.taps)))), dtype=np.float64)
    for fit_rows, read_rows in (halves, halves[::-1]):
        part = to_torch(fit_statistics(features.subset(fit_rows), gate, covariance))
        v[read_rows] = components_numpy(part, components, features.subset(read_rows))
    return {**arrays, **_unit_arrays(v, pred, c_num, expand(components, len(features.taps)))}


def anchor_units(arrays: dict[str, np.ndarray], components: Sequence[str], features) -> dict[str, np.ndarray]:
    """``arrays`` with the combiner's units re-measured on other clean images (``features``).

    The class statistics stay as fitted; the components of ``features`` are read through them
    (all of them: these images took no part in the statistics, so no folds are needed), and the
    per-class means / standard deviations, the density's covariance and the surprise tables are
    taken from those values. Meant for clean images the *network* has not seen either, whose
    components are not as tight as its training images' (docs/detectors.md, the third question).
    """
    if len(features) < 2:
        raise CsgguardError(f"{len(features)} clean images are too few to measure the detector's units on")
    v = components_numpy(to_torch(arrays), components, features)
    names = expand(components, tap_count(arrays) if "taps" in components else 0)
    return {**arrays, **_unit_arrays(v, features.pred, len(arrays["means_"]), names)}


def _unit_arrays(v: np.ndarray, pred: np.ndarray, c_num: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The combiner's units from clean component values ``v`` (N, M): per-class mean / std, the
    density's precision, and the surprise table of the standardised values."""
    mean = class_means(v, pred, c_num)
    std = np.stack([v[pred == c].std(0) if np.sum(pred == c) > 1 else v.std(0) for c in range(c_num)])
    out = {"comp_mean_": mean, "comp_std_": np.maximum(std, 1e-6), "comp_precision_": shrunk_precision(v - mean[pred])}
    u = standardised(to_torch(out), names, torch.from_numpy(v), torch.from_numpy(np.asarray(pred))).numpy()
    out["tail_q_"], out["tail_s_"] = tail_table(u)
    return out

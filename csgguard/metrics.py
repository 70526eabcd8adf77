"""Accuracy, gate density, mutual-information score, and detection metrics."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CsgguardError


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(logits).argmax(1) == np.asarray(labels)).mean()) if len(labels) else float("nan")


def mutual_information_score(pooled: np.ndarray, labels: np.ndarray, num_classes: int,
                             max_samples: int = 2000, seed: int = 0) -> float:
    """MIS (docs/method.md section 2): mean over filters of the max over classes of MI(a_k; [y == c]).

    The estimator is scikit-learn's ``mutual_info_classif`` (Ross 2014, k = 3 neighbours, its
    scaling and its 1e-10 tie-breaking noise from ``seed``), computed by
    :func:`_mi_continuous_binary` with the one-dimensional neighbour search done by sorting:
    the same numbers (identical on every run measured, whenever each class has at least 8
    samples, where scikit-learn's own neighbour search is exact), ~8.7x faster
    (``benchmarks/mis_speed.py``), which every ``csgguard train`` and ``inspect`` pays. At most
    ``max_samples`` held-out samples are used (a fixed random subset).
    """
    from sklearn.preprocessing import scale

    pooled = np.asarray(pooled, dtype=np.float64)
    labels = np.asarray(labels)
    if len(labels) > max_samples:
        idx = np.random.default_rng(seed).choice(len(labels), max_samples, replace=False)
        pooled, labels = pooled[idx], labels[idx]
    # scikit-learn's preprocessing of continuous features: unit variance, then tiny noise against ties
    x = scale(pooled.copy(), with_mean=False, copy=False)
    x += 1e-10 * np.maximum(1, np.mean(np.abs(x), axis=0)) * np.random.RandomState(seed).standard_normal(x.shape)
    mi = np.array([[_mi_continuous_binary(x[:, k], labels == c) for c in range(num_classes)]
                   for k in range(x.shape[1])])  # (K, C)
    return float(mi.max(axis=1).mean())


def _kth_gap(sorted_values: np.ndarray, k: int) -> np.ndarray:
    """Distance from each sorted value to its k-th nearest other value: in 1-D they lie within k places."""
    n = len(sorted_values)
    candidates = np.full((n, 2 * k), np.inf)
    for off in range(1, k + 1):
        gap = sorted_values[off:] - sorted_values[:-off]
        candidates[off:, 2 * off - 2] = gap    # the value off places below
        candidates[:-off, 2 * off - 1] = gap   # the value off places above
    candidates.sort(axis=1)
    d = candidates[:, k - 1]
    return np.sqrt(d * d)  # as a KD-tree computes a 1-D Euclidean distance


def _count_within(sorted_values: np.ndarray, centre: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """How many values v have (v - centre)^2 <= radius^2 (a KD-tree's radius test), the centre included."""
    r2, n = radius * radius, len(sorted_values)
    lo = np.searchsorted(sorted_values, centre - radius, "left")
    hi = np.searchsorted(sorted_values, centre + radius, "right")
    for _ in range(4):  # rounding can put the exact boundary a place or two off the searchsorted bounds
        lo -= (lo > 0) & ((sorted_values[np.maximum(lo - 1, 0)] - centre) ** 2 <= r2)
        lo += (lo < hi) & ((sorted_values[np.minimum(lo, n - 1)] - centre) ** 2 > r2)
        hi += (hi < n) & ((sorted_values[np.minimum(hi, n - 1)] - centre) ** 2 <= r2)
        hi -= (hi > lo) & ((sorted_values[np.maximum(hi - 1, 0)] - centre) ** 2 > r2)
    return hi - lo


def _mi_continuous_binary(c: np.ndarray, d: np.ndarray, k: int = 3) -> float:
    """Ross's (2014) k-NN estimate of MI between a continuous and a discrete variable, in nats, >= 0."""
    from scipy.special import digamma

    radius, label_counts, k_all = np.empty(len(c)), np.empty(len(c)), np.empty(len(c))
    for label in np.unique(d):
        idx = np.flatnonzero(d == label)
        if len(idx) > 1:
            kk = min(k, len(idx) - 1)
            order = np.argsort(c[idx], kind="stable")
            r = np.empty(len(idx))
            r[order] = _kth_gap(c[idx][order], kk)
            radius[idx] = np.nextafter(r, 0)
            k_all[idx] = kk
        label_counts[idx] = len(idx)
    keep = label_counts > 1  # a label seen once has no neighbour
    c, radius, label_counts, k_all = c[keep], radius[keep], label_counts[keep], k_all[keep]
    within = _count_within(np.sort(c), c, radius)
    mi = digamma(len(c)) + np.mean(digamma(k_all)) - np.mean(digamma(label_counts)) - np.mean(digamma(within))
    return max(0.0, float(mi))


def auroc(clean_scores: np.ndarray, adv_scores: np.ndarray) -> float:
    """Area under the ROC curve with adversarial as the positive class (higher score = more adversarial)."""
    from sklearn.metrics import roc_auc_score

    clean_scores, adv_scores = np.asarray(clean_scores), np.asarray(adv_scores)
    if len(clean_scores) == 0 or len(adv_scores) == 0:
        return float("nan")
    y = np.r_[np.zeros(len(clean_scores)), np.ones(len(adv_scores))]
    return float(roc_auc_score(y, np.r_[clean_scores, adv_scores]))


def threshold_at_fpr(clean_scores: np.ndarray, fpr: float) -> float:
    """Smallest threshold whose false-positive rate on ``clean_scores`` is at most ``fpr``.

    An input is flagged when ``score > threshold``; the threshold is the (1 - fpr)
    empirical quantile of the clean scores, taken conservatively ("higher").
    """
    s = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if len(s) == 0:
        raise ValueError("no clean scores to calibrate on")
    k = int(np.ceil((1.0 - fpr) * len(s))) - 1
    return float(s[min(max(k, 0), len(s) - 1)])


def check_calibration_size(n: int, fpr: float, what: str, hint: str = "") -> None:
    """A threshold at ``fpr`` needs at least ``1 / fpr`` clean images to sit on: one rule for
    ``Detector.calibrate``, ``csgguard fit`` (checked before any feature is extracted) and
    ``csgguard evaluate``'s splits. ``what`` names the images, ``hint`` what to change."""
    if n * fpr < 1:
        raise CsgguardError(f"{n} {what} are too few for a {fpr:g} false-positive rate "
                            f"(need at least {int(np.ceil(1 / fpr))}{'; ' + hint if hint else ''})")


def tpr_at_threshold(adv_scores: np.ndarray, threshold: float) -> float:
    a = np.asarray(adv_scores)
    return float((a > threshold).mean()) if len(a) else float("nan")


def roc_points(clean_scores: np.ndarray, adv_scores: np.ndarray, max_points: int = 200) -> dict[str, list[float]]:
    from sklearn.metrics import roc_curve

    y = np.r_[np.zeros(len(clean_scores)), np.ones(len(adv_scores))]
    fpr, tpr, _ = roc_curve(y, np.r_[clean_scores, adv_scores])
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [float(v) for v in fpr], "tpr": [float(v) for v in tpr]}


def metrics_row(clean: np.ndarray, adv: np.ndarray, thresholds: dict[str, float | None]) -> dict[str, Any]:
    """The numbers of one detector x attack cell, at thresholds fixed on calibration data.

    ``thresholds`` maps ``"target"`` (the detector's ``threshold_``), ``"0.05"`` and
    ``"0.01"`` to thresholds; ``None`` marks an operating point the calibration set was
    too small for. ``clean`` are the scores of the clean evaluation images, ``adv`` those
    of the successful adversarial ones.
    """
    def at(key, scores):
        t = thresholds.get(key)
        return None if t is None or len(scores) == 0 else tpr_at_threshold(scores, t)

    return {
        "auroc": auroc(clean, adv) if len(adv) else None,
        "tpr_at_target_fpr": at("target", adv),
        "tpr_at_5pct_fpr": at("0.05", adv),
        "tpr_at_1pct_fpr": at("0.01", adv),
        "realised_fpr": at("target", clean),
        "realised_fpr_1pct": at("0.01", clean),
        "threshold": thresholds["target"],
        "n_clean_eval": int(len(clean)),
        "n_adv_eval": int(len(adv)),
        "roc": roc_points(clean, adv) if len(adv) else None,
    }


def monotonicity_violations(curve: list[tuple[float, float | None]], tol: float = 0.03
                            ) -> list[dict[str, float]]:
    """Pairs of budgets where the detection rate at the larger one is lower by more than ``tol``.

    ``curve`` is ``[(budget, rate), ...]``; ``None`` rates (nothing to detect) are skipped.
    """
    pts = sorted((b, r) for b, r in curve if r is not None)
    out = []
    for i, (small, r_small) in enumerate(pts):
        for large, r_large in pts[i + 1:]:
            if r_large < r_small - tol:
                out.append({"smaller": small, "larger": large, "rate_smaller": r_small, "rate_larger": r_large,
                            "drop": r_small - r_large})
    return out


def evaluate_model(loaded, dataset=None, split: str = "test", *, batch_size: int = 1024) -> dict[str, Any]:
    """Accuracy, gate density and MIS of a loaded model on one split of its data.

    ``dataset`` defaults to the run's own splits (:func:`csgguard.runs.load_run_dataset`).
    """
    if dataset is None:
        from .runs import load_run_dataset

        dataset = load_run_dataset(loaded)
    feats, labels = split_features(loaded, dataset, split, batch_size=batch_size)
    return split_metrics(loaded, feats, labels, dataset.num_classes, split)


def split_features(loaded, dataset, split: str = "test", *, batch_size: int = 1024):
    """The one forward pass over a split: ``(features, labels)``.

    Kept apart from :func:`split_metrics` so a caller that needs the features too
    (``inspect`` on a STD model reads the pooled activations) runs the pass once.
    """
    from .features import extract_features

    s = dataset.split(split)
    feats = extract_features(loaded.model, s.x(), batch_size=batch_size).require_finite(str(loaded.run_dir))
    return feats, s.labels.numpy()


def split_metrics(loaded, feats, labels: np.ndarray, num_classes: int, split: str) -> dict[str, Any]:
    """Accuracy, gate density and MIS from features already extracted (:func:`split_features`)."""
    gate = loaded.model.gate
    return {
        "accuracy": accuracy(feats.logits, labels),
        "gate_density": None if gate is None else float(gate.density()),
        "mis": mutual_information_score(feats.pooled, labels, num_classes),
        "split": split,
        "images": len(labels),
    }

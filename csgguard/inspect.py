"""What ``inspect`` reports about a run: accuracy, density, MIS, filter-class map, heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .models.store import load_model
from .runs import load_run_dataset
from .train import evaluate_model


def filters_per_class(gate: np.ndarray, classes: list[str], threshold: float = 0.5) -> dict[str, list[int]]:
    """Filters whose gate entry for a class is at least ``threshold`` (G is K x C)."""
    return {c: [int(k) for k in np.flatnonzero(gate[:, j] >= threshold)] for j, c in enumerate(classes)}


def write_heatmap(gate: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .artifacts import atomic_write_bytes

    order = np.lexsort((-gate.max(1), gate.argmax(1)))  # group filters by their main class
    fig, ax = plt.subplots(figsize=(min(16, 2 + gate.shape[0] / 10), 0.4 * len(classes) + 1.5))
    im = ax.imshow(gate[order].T, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("filter (sorted by main class)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def inspect_run(run_dir: str | Path, *, data_root: str | None = None, split: str = "test",
                heatmap: Path | None = None) -> dict[str, Any]:
    loaded = load_model(run_dir)
    ds = load_run_dataset(loaded, data_root=data_root)
    ev = evaluate_model(loaded, ds, split)
    classes = loaded.classes
    model = loaded.model
    report: dict[str, Any] = {"run": str(run_dir), "arch": loaded.config.arch, "gated": model.has_gate,
                              "num_filters": model.num_filters, "dataset": ds.name, **ev}
    if model.gate is not None:
        gate = model.gate.weight.detach().cpu().numpy()
        report["filters_per_class"] = filters_per_class(gate, classes)
        report["filters_shared"] = int(((gate >= 0.5).sum(1) > 1).sum())
        path = heatmap or Path(run_dir) / "gate_heatmap.png"
        report["heatmap"] = str(write_heatmap(gate, classes, path, f"CSG gate ({loaded.config.arch}, "
                                              f"density {ev['gate_density']:.3f})"))
    else:
        from .features import extract_features

        s = ds.split(split)
        feats = extract_features(model, s.x())
        means = np.stack([feats.pooled[s.labels.numpy() == c].mean(0) for c in range(len(classes))], 1)
        owner = means.argmax(1)
        report["filters_per_class"] = {c: [int(k) for k in np.flatnonzero(owner == j)] for j, c in enumerate(classes)}
        report["heatmap"] = None
    return report

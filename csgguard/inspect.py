"""What ``inspect`` reports about a run: accuracy, density, MIS, filter-class map, heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import check_output_file
from .metrics import split_features, split_metrics
from .models.store import load_model
from .report import write_heatmap
from .runs import load_run_dataset
from .shipped import shipped_name


def filters_per_class(gate: np.ndarray, classes: list[str], threshold: float = 0.5) -> dict[str, list[int]]:
    """Filters whose gate entry for a class is at least ``threshold`` (G is K x C)."""
    return {c: [int(k) for k in np.flatnonzero(gate[:, j] >= threshold)] for j, c in enumerate(classes)}


def inspect_run(run_dir: str | Path, *, data_root: str | None = None, split: str = "test",
                heatmap: Path | None = None, device: str = "auto") -> dict[str, Any]:
    from .devices import select_device

    where = select_device(device)  # an absent accelerator is an error before anything is read
    loaded = load_model(run_dir)
    given, run_dir = run_dir, loaded.run_dir  # a shipped run's name resolved to its folder
    heatmap_path = None
    if loaded.model.gate is not None:
        # a shipped run already holds its heatmap, and its folder is part of the package: not rewritten
        heatmap_path = heatmap or (None if shipped_name(run_dir) else Path(run_dir) / "gate_heatmap.png")
        if heatmap_path is not None:  # writable, before the forward pass
            check_output_file(heatmap_path, "--heatmap" if heatmap else "the heatmap (RUN/gate_heatmap.png)")
    loaded.model.to(where)  # the one forward pass over the split runs where the user says
    ds = load_run_dataset(loaded, data_root=data_root)
    feats, labels = split_features(loaded, ds, split)  # the one forward pass
    ev = split_metrics(loaded, feats, labels, ds.num_classes, split)
    classes = loaded.classes
    model = loaded.model
    report: dict[str, Any] = {"run": str(given), "arch": loaded.config.arch, "gated": model.has_gate,
                              "num_filters": model.num_filters, "dataset": ds.name, **ev}
    if model.gate is not None:
        gate = model.gate.weight.detach().cpu().numpy()
        report["filters_per_class"] = filters_per_class(gate, classes)
        report["filters_shared"] = int(((gate >= 0.5).sum(1) > 1).sum())
        if heatmap_path is not None:
            report["heatmap"] = str(write_heatmap(gate, classes, heatmap_path, f"CSG gate ({loaded.config.arch}, "
                                                  f"density {ev['gate_density']:.3f})"))
        else:
            shipped = Path(run_dir) / "gate_heatmap.png"
            report["heatmap"] = str(shipped) if shipped.is_file() else None
    else:
        means = np.stack([feats.pooled[labels == c].mean(0) for c in range(len(classes))], 1)
        owner = means.argmax(1)
        report["filters_per_class"] = {c: [int(k) for k in np.flatnonzero(owner == j)] for j, c in enumerate(classes)}
        report["heatmap"] = None
    return report

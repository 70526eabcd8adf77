"""``csgguard inspect``: accuracy, gate density, MIS, filters per class, and a gate heatmap."""

from __future__ import annotations

from pathlib import Path

import click

from ..progress import log
from . import main
from .common import device_option, emit_mapping, emit_rows, format_option, run_option


@main.command("inspect")
@run_option
@click.option("--data-root", type=click.Path(), default=None,
              help="Dataset root, when the run was trained on mnist/cifar10.")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True)
@click.option("--heatmap", type=click.Path(dir_okay=False), default=None,
              help="Where to write the gate heatmap PNG (default RUN/gate_heatmap.png; a shipped run "
                   "keeps the one it ships with unless this is given).")
@device_option
@format_option()
def inspect_command(run_dir, data_root, split, heatmap, device, fmt):
    """Show how class-specific a trained model's filters are.

    Reports accuracy, the gate's L1-density, the mutual-information score (MIS) on
    held-out data, and which filters each class owns (gate entries >= 0.5); writes
    a classes x filters heatmap of the gate. STD models have no gate: their filters
    are listed by the class whose mean activation is highest.

    \b
    Examples:
      csgguard inspect                                 # runs/default: table + RUN/gate_heatmap.png
      csgguard inspect --run runs/std --format json    # a STD twin: filters by mean activation
      csgguard inspect --run cifar10-resnet20-csg --data-root DIR   # a shipped run (its heatmap as shipped)
      csgguard inspect --run runs/mnist --data-root DIR --split val --heatmap mnist_gate.png --format csv
    """
    from ..inspect import inspect_run

    report = inspect_run(run_dir, data_root=data_root, split=split,
                         heatmap=Path(heatmap) if heatmap else None, device=device)
    if report.get("heatmap"):
        log(f"gate heatmap: {report['heatmap']}")
    if fmt == "json":
        emit_mapping(report, "json")
        return
    if fmt == "csv":  # one row per class: its filters, beside the run's figures
        flat = {k: v for k, v in report.items() if not isinstance(v, (dict, list))}
        rows = [{**flat, "class": c, "filters": len(f), "filter_ids": " ".join(map(str, f))}
                for c, f in report["filters_per_class"].items()]
        emit_rows(rows, [*flat, "class", "filters", "filter_ids"], "csv")
        return
    emit_mapping(report, "table", title=f"inspect {run_dir}")
    rows = [{"class": c, "filters": len(f), "filter_ids": " ".join(map(str, f[:24])) + (" ..." if len(f) > 24 else "")}
            for c, f in report["filters_per_class"].items()]
    emit_rows(rows, ["class", "filters", "filter_ids"], "table", title="filters assigned to each class")

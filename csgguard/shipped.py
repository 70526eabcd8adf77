"""Runs shipped inside the package, reachable by name from every command and from the Python API.

``--run cifar10-resnet20-csg`` (or ``pretrained/cifar10-resnet20-csg``) opens
``csgguard/pretrained/cifar10-resnet20-csg`` when no folder of that name exists where
the user is: a folder of the user's always wins. Shipped runs are ordinary run
directories, hash-checked like any other. Torch-free, so the CLI can resolve names
while it parses options.
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_FILE = "model.json"
#: runs shipped inside the package (``--run cifar10-resnet20-csg`` or ``--run pretrained/cifar10-resnet20-csg``)
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def pretrained_runs() -> list[str]:
    """Names of the runs shipped with csgguard."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / MANIFEST_FILE).is_file())


def resolve_run(run_dir: str | Path) -> Path:
    """A run directory as given, or, when no such folder exists, the shipped run of that name
    (``NAME`` or ``pretrained/NAME``). A folder of the user's always wins over a shipped name."""
    path = Path(run_dir)
    if path.is_dir():
        return path
    parts = path.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "pretrained"):
        shipped = PRETRAINED_DIR / parts[-1]
        if parts[-1] in pretrained_runs():
            return shipped
    return path

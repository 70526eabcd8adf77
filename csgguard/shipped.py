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


def shipped_name(run_dir: str | Path) -> str | None:
    """The name of the shipped run ``run_dir`` is (its folder inside the package), else ``None``.

    Commands whose default output goes inside the run (``fit``'s detector, ``attack``'s sets,
    ``evaluate``'s report, ``inspect``'s heatmap) ask this first: a shipped run's folder is part
    of the installed package, and a detector written there would silently become what every later
    ``screen --run NAME`` uses."""
    path = Path(run_dir).resolve()
    if path.parent == PRETRAINED_DIR and not path.name.startswith("."):  # ".NAME.*": ship_run's work copy
        return path.name
    return None


def refuse_shipped_output(run_dir: str | Path, option: str) -> None:
    """A clear error when a command would write its default output into a shipped run."""
    from .errors import CsgguardError

    name = shipped_name(run_dir)
    if name is not None:
        raise CsgguardError(f"{name} is a run shipped inside csgguard, and its folder is part of the installed "
                            f"package: pass {option} to write elsewhere")

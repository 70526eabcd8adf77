"""csgguard: flag adversarial images from the gate patterns of a Class-Specific Gate CNN.

The Python API mirrors the CLI, one call per command::

    from csgguard import TrainConfig, train, load_model
    result = train(TrainConfig(data="digits"), "runs/default")
    loaded = load_model("runs/default")

The names below are imported on first use (PEP 562), so ``import csgguard`` (and
``csgguard --help``) does not load torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("csgguard")  # written once, in pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

_API = {
    "Dataset": "data", "Split": "data", "load_dataset": "data",
    "ArtifactError": "errors", "CsgguardError": "errors", "DataError": "errors",
    "Features": "features", "extract_features": "features",
    "ClassSpecificGate": "models", "CSGNet": "models", "ModelConfig": "models",
    "LoadedModel": "models.store", "load_model": "models.store", "save_model": "models.store",
    "load_run_dataset": "runs",
    "TrainConfig": "train", "TrainResult": "train", "train": "train",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """``csgguard.train`` is the function ``train()``, as it always was, not the submodule of that name.

    Importing the submodule makes the import system bind it on the package; the
    setter below ignores that, so the name keeps meaning the function
    (``importlib.import_module("csgguard.train")`` gives the module).
    """

    @property
    def train(self):
        from .train import train

        return train

    @train.setter
    def train(self, _module) -> None:
        pass


sys.modules[__name__].__class__ = _Package

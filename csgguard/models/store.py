"""Saving and loading a trained model: ``model.safetensors`` + ``model.json`` in a run directory.

``model.json`` records the architecture, classes, input format, training config,
library versions, metrics and the sha256 of the weights file. Loading checks the
hash before safetensors reads a byte of it, and builds the architecture from the
registry by name, so nothing in the files can execute code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import library_versions, load_tensors, read_json, save_tensors, write_json
from ..errors import ArtifactError, CsgguardError
from .csg import CSGNet, ModelConfig

MODEL_FORMAT = "csgguard.model"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "model.json"


@dataclass
class LoadedModel:
    """A model with its manifest: what every command after ``train`` starts from."""

    model: CSGNet
    manifest: dict[str, Any]
    run_dir: Path

    @property
    def sha256(self) -> str:
        return self.manifest["weights"]["sha256"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def input_spec(self) -> dict[str, Any]:
        return self.manifest["input"]


def input_spec_for(config: ModelConfig) -> dict[str, Any]:
    return {
        "channels": config.in_channels,
        "height": config.input_size,
        "width": config.input_size,
        "color_mode": "L" if config.in_channels == 1 else "RGB",
        "pixel_range": [0.0, 1.0],
        "mean": config.mean,
        "std": config.std,
        "resize": "bilinear",
    }


def save_model(model: CSGNet, run_dir: str | Path, *, classes: list[str], dataset: dict[str, Any] | None = None,
               training: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights then manifest (both atomically); return the manifest path."""
    run_dir = Path(run_dir)
    state = state_dict if state_dict is not None else model.state_dict()
    digest = save_tensors(run_dir / WEIGHTS_FILE, state, metadata={"format": MODEL_FORMAT})
    manifest = {
        "format": MODEL_FORMAT,
        "format_version": 1,
        "model": model.config.to_dict(),
        "classes": list(classes),
        "input": input_spec_for(model.config),
        "num_filters": model.num_filters,
        "dataset": dataset or {},
        "training": training or {},
        "metrics": metrics or {},
        "versions": library_versions(),
        "weights": {"file": WEIGHTS_FILE, "sha256": digest},
    }
    return write_json(run_dir / MANIFEST_FILE, manifest)


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir}: run directory not found (train one with `csgguard train --out {run_dir}`)")
    path = run_dir / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"{run_dir}: no {MANIFEST_FILE} here (not a csgguard run directory, or training did not finish)")
    manifest = read_json(path, "model manifest")
    if manifest.get("format") != MODEL_FORMAT:
        raise ArtifactError(f"{path}: not a csgguard model manifest (format={manifest.get('format')!r})")
    for key in ("model", "classes", "weights"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest lacks {key!r}")
    return manifest


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network named in ``model.json`` and load its hash-checked weights."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    path = run_dir / MANIFEST_FILE
    try:
        config = ModelConfig.from_dict(manifest["model"])
        model = CSGNet(config)
    except CsgguardError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{path}: invalid model section ({exc})") from None
    weights = manifest["weights"]
    tensors = load_tensors(run_dir / weights.get("file", WEIGHTS_FILE), weights.get("sha256") or "missing")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"{run_dir / WEIGHTS_FILE}: weights do not fit the architecture ({first})") from None
    model.to(device).eval()
    return LoadedModel(model, manifest, run_dir)

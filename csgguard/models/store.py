"""Saving and loading a trained model: ``model.safetensors`` + ``model.json`` in a run directory.

``model.json`` records the architecture, classes, input format, training config,
library versions, metrics and the sha256 of the weights file. Loading checks the
hash before safetensors reads a byte of it, and builds the architecture from the
registry by name, so nothing in the files can execute code.

``model.json`` may come from a stranger, so loading trusts none of it:

1. every field is validated (types, finite numbers, ranges, classes vs num_classes,
   ``input`` vs ``model``, ``std > 0``) -- :func:`validate_manifest`;
2. the weights' sha256 is checked, then the ``model`` / ``classes`` / ``input``
   sections are compared with the copy kept inside the weights file's metadata
   (format version 2), which the hash covers: editing model.json alone is refused;
3. the network is built on PyTorch's ``meta`` device (no memory) and every tensor
   shape is compared with the weights file; only then is it built for real. A
   manifest claiming ``num_classes: 10**9`` therefore costs nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..artifacts import (
    canonical_json,
    check_finite,
    check_format_version,
    library_versions,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
)
from ..errors import ArtifactError, CsgguardError
from ..shipped import resolve_run
from .csg import CSGNet, ModelConfig

MODEL_FORMAT = "csgguard.model"
FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "model.json"
COVERED = ("model", "classes", "input")   # the manifest sections the weights file's hash also covers
LIMITS = {"num_classes": 100_000, "input_size": 4096, "width": 65_536}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
    covered = {"model": model.config.to_dict(), "classes": list(classes), "input": input_spec_for(model.config)}
    digest = save_tensors(run_dir / WEIGHTS_FILE, state,
                          metadata={"format": MODEL_FORMAT, "manifest": canonical_json(covered)})
    manifest = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        **covered,
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
    check_format_version(manifest, path, FORMAT_VERSION)
    validate_manifest(manifest, path)
    return manifest


def _int(section: dict, key: str, low: int, high: int, where: str) -> int:
    v = section.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise ArtifactError(f"{where}: {key} must be an integer in [{low}, {high}], got {v!r}")
    return v


def _floats(section: dict, key: str, n: int, where: str, *, positive: bool = False) -> list[float]:
    v = section.get(key)
    if not isinstance(v, list) or len(v) not in (1, n) or \
            not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
        raise ArtifactError(f"{where}: {key} must be a list of 1 or {n} finite numbers, got {v!r}")
    if positive and not all(x >= 1e-6 for x in v):
        raise ArtifactError(f"{where}: {key} must be positive (>= 1e-6), got {v!r}")
    if not positive and not all(-1e3 <= x <= 1e3 for x in v):
        raise ArtifactError(f"{where}: {key} must be within [-1000, 1000], got {v!r}")
    return [float(x) for x in v]


def validate_manifest(manifest: dict[str, Any], path: str | Path = MANIFEST_FILE) -> None:
    """Refuse any model.json value that is missing, of the wrong type, not finite or out of range."""
    from .backbones import BACKBONES

    where = str(path)
    for key in ("model", "classes", "input", "weights"):
        if key not in manifest:
            raise ArtifactError(f"{where}: manifest lacks {key!r}")
    m, inp, weights, classes = manifest["model"], manifest["input"], manifest["weights"], manifest["classes"]
    for key, v in (("model", m), ("input", inp), ("weights", weights)):
        if not isinstance(v, dict):
            raise ArtifactError(f"{where}: {key!r} must be a JSON object, got {type(v).__name__}")
    arch = m.get("arch")
    if not isinstance(arch, str) or arch not in BACKBONES:
        raise ArtifactError(f"{where}: unknown architecture {arch!r}; known: {', '.join(sorted(BACKBONES))}")
    n = _int(m, "num_classes", 2, LIMITS["num_classes"], where)
    c = m.get("in_channels")
    if c not in (1, 3) or isinstance(c, bool):
        raise ArtifactError(f"{where}: in_channels must be 1 or 3, got {c!r}")
    size = _int(m, "input_size", 1, LIMITS["input_size"], where)
    if not isinstance(m.get("gate", True), bool):
        raise ArtifactError(f"{where}: gate must be true or false, got {m.get('gate')!r}")
    if m.get("width") is not None:
        _int(m, "width", 1, LIMITS["width"], where)
    _floats(m, "mean", c, where)
    _floats(m, "std", c, where, positive=True)
    if not isinstance(classes, list) or len(classes) != n or not all(isinstance(x, str) and x for x in classes) \
            or len(set(classes)) != n:
        shown = classes if not isinstance(classes, list) or len(classes) <= 12 else f"{len(classes)} entries"
        raise ArtifactError(f"{where}: classes must be {n} distinct non-empty names (num_classes), got {shown!r}")
    if (inp.get("channels"), inp.get("height"), inp.get("width")) != (c, size, size):
        raise ArtifactError(f"{where}: input section {inp.get('channels')!r}x{inp.get('height')!r}x"
                            f"{inp.get('width')!r} does not match the model ({c}x{size}x{size})")
    if inp.get("resize", "bilinear") not in ("bilinear", "nearest"):
        raise ArtifactError(f"{where}: input resize must be bilinear or nearest, got {inp.get('resize')!r}")
    file, sha = weights.get("file", WEIGHTS_FILE), weights.get("sha256")
    if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
        raise ArtifactError(f"{where}: weights file must be a plain file name beside model.json, got {file!r}")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise ArtifactError(f"{where}: weights sha256 is missing or malformed; refusing to load")


def _check_shapes(config: ModelConfig, tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Build the network on the meta device (no memory) and compare every shape with the weights file."""
    with torch.device("meta"):
        skeleton = CSGNet(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise ArtifactError(f"{where}: weights do not fit the architecture (missing {missing[:3]}, "
                            f"unexpected {extra[:3]})")
    for k, shape in expected.items():
        if got[k] != shape:
            raise ArtifactError(f"{where}: weights do not fit the architecture ({k} is {list(got[k])} in the file, "
                                f"model.json implies {list(shape)})")


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network named in ``model.json`` and load its hash-checked weights (see the module doc).

    ``run_dir`` may also name a shipped pretrained run (:func:`resolve_run`)."""
    run_dir = resolve_run(run_dir)
    manifest = read_manifest(run_dir)  # validated
    path = run_dir / MANIFEST_FILE
    weights = manifest["weights"]
    weights_path = run_dir / weights.get("file", WEIGHTS_FILE)
    tensors, meta = load_tensors(weights_path, weights["sha256"], with_metadata=True)
    if "manifest" in meta:
        if canonical_json({k: manifest[k] for k in COVERED}) != meta["manifest"]:
            raise ArtifactError(f"{path}: its model / classes / input sections differ from the copy the weights' "
                                "hash covers (model.json edited?); refusing to load")
    elif manifest.get("format_version", 1) >= 2:
        raise ArtifactError(f"{weights_path}: lacks the manifest copy a version-2 model.json requires")
    try:
        config = ModelConfig.from_dict(manifest["model"])
        _check_shapes(config, tensors, weights_path)
        check_finite(tensors, weights_path)
        model = CSGNet(config)
    except ArtifactError:
        raise
    except CsgguardError as exc:
        raise ArtifactError(f"{path}: {exc}") from None
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: invalid model section ({exc.__class__.__name__}: {exc})") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ArtifactError(f"{weights_path}: weights do not fit the architecture ({first})") from None
    model.to(device).eval()
    return LoadedModel(model, manifest, run_dir)

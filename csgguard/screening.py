"""``csgguard screen`` as Python: image files -> one row each (prediction, score, flag, error).

One forward pass per batch gives the prediction and the detector's features; the
detector's calibrated threshold (or an explicit one) decides the flag. Rows come out
as a generator in file order, so a million-image folder streams with constant
memory; :class:`Screener` keeps the running summary.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .devices import select_device
from .errors import CsgguardError
from .features import features_from_outputs
from .images import InputSpec, image_loader, list_images, printable_path, shard_files
from .models.store import LoadedModel, load_model

ROW_FIELDS = ("path", "predicted_class", "confidence", "score", "flagged", "error", "converted")


class Screener:
    """A model and its detector, ready to score batches of files.

    Parameters
    ----------
    run_dir : run directory holding the model (and, by default, ``detector.json``).
    detector : a detector file (``.json``) or folder; default ``run_dir``.
    threshold : flag when ``score > threshold``; default the detector's calibrated ``threshold_``.
    """

    def __init__(self, run_dir: str | os.PathLike = "runs/default", *, detector: str | os.PathLike | None = None,
                 threshold: float | None = None, device: str | torch.device = "auto") -> None:
        from .detectors.store import load_detector

        self.device = select_device(device)
        self.loaded: LoadedModel = load_model(run_dir, self.device)
        self.detector = load_detector(detector if detector is not None else self.loaded.run_dir,
                                      model_sha256=self.loaded.sha256)
        if threshold is None and not hasattr(self.detector, "threshold_"):
            raise CsgguardError("the detector has no calibrated threshold; pass --threshold or refit it")
        self.threshold = float(threshold if threshold is not None else self.detector.threshold_)
        self.spec = InputSpec.from_manifest(self.loaded.input_spec)
        self.classes = self.loaded.classes
        self.reset()

    def reset(self) -> None:
        self.summary: dict[str, Any] = {"images": 0, "scored": 0, "flagged": 0, "errors": 0, "converted": 0}

    @torch.no_grad()
    def score_batch(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(predicted index, softmax confidence, score) for a [0, 1] batch: one forward pass."""
        model = self.loaded.model
        out = model.forward_signals(x.to(self.device, non_blocking=True))
        feats = features_from_outputs(model, out.logits, out.pooled, out.taps)
        inputs = x if self.detector.needs_inputs else None
        scores = self.detector.score_samples(feats, inputs=inputs)
        prob = torch.softmax(out.logits.float(), 1).max(1)
        return prob.indices.cpu().numpy(), prob.values.cpu().numpy(), scores

    def rows(self, files: Sequence[str], *, batch_size: int = 64, workers: int = 0,
             progress: bool | None = None) -> Iterator[dict[str, Any]]:
        """One row per file, in order; updates :attr:`summary` as it goes."""
        from .progress import make_progress

        loader = image_loader(files, self.spec, batch_size=batch_size, workers=workers,
                              pin_memory=self.device.type == "cuda")
        start = time.perf_counter()
        with make_progress(progress) as bar:
            task = bar.add_task("screen", total=len(files), info="")
            for pos, x, errors, conversions in loader:
                ok = [i for i, e in enumerate(errors) if e is None]
                pred = conf = score = None
                if ok:
                    pred, conf, score = self.score_batch(x[ok])
                at = {j: n for n, j in enumerate(ok)}
                for j, p in enumerate(pos):
                    row = {"path": printable_path(files[p]), "predicted_class": None, "confidence": None,
                           "score": None, "flagged": None, "error": errors[j], "converted": conversions[j]}
                    if j in at:
                        n = at[j]
                        row.update(predicted_class=self.classes[int(pred[n])], confidence=float(conf[n]),
                                   score=float(score[n]), flagged=bool(score[n] > self.threshold))
                    self._count(row)
                    yield row
                bar.advance(task, len(pos))
                bar.update(task, info=f"flagged {self.summary['flagged']}, errors {self.summary['errors']}")
        self.summary["seconds"] = round(time.perf_counter() - start, 3)
        self.summary["threshold"] = self.threshold

    def _count(self, row: dict[str, Any]) -> None:
        s = self.summary
        s["images"] += 1
        s["errors"] += row["error"] is not None
        s["scored"] += row["error"] is None
        s["flagged"] += bool(row["flagged"])
        s["converted"] += row["converted"] is not None


def screen(paths: Iterable[str | os.PathLike], run_dir: str | os.PathLike = "runs/default", *,
           detector: str | os.PathLike | None = None, threshold: float | None = None, recursive: bool = False,
           batch_size: int = 64, workers: int = 0, shard: tuple[int, int] | None = None,
           device: str = "auto", progress: bool | None = None) -> tuple[Screener, Iterator[dict[str, Any]]]:
    """List, shard and screen ``paths``; return the screener (for its summary) and the row generator.

    The generator is lazy: iterate it to do the work; ``screener.summary`` is final
    once it is exhausted.
    """
    screener = Screener(run_dir, detector=detector, threshold=threshold, device=device)
    files = shard_files(list_images(paths, recursive=recursive), shard, batch_size)
    screener.summary["shard"] = None if shard is None else f"{shard[0]}/{shard[1]}"
    return screener, screener.rows(files, batch_size=batch_size, workers=workers, progress=progress)


__all__ = ["ROW_FIELDS", "Screener", "screen"]

"""``csgguard screen`` as Python: image files -> one row each (prediction, score, flag, error).

One forward pass per batch gives the prediction and the detector's features; the
detector's calibrated threshold (or an explicit one) decides the flag. Rows come out
as a generator in file order, so a million-image folder streams with constant
memory; :class:`Screener` keeps the running summary.

Files are listed by :func:`csgguard.listing.list_inputs`, where hostile folders are
met (its docstring states the symlink policy); a file it refuses, or one that cannot be
decoded, becomes an error row and the batch goes on. A folder with no images at its top
level but sub-folders is a usage error that suggests ``-r``. Rows hold the raw path
(``os.fsdecode`` text: open() takes it back); every output format shows it through
:func:`csgguard.safetext.visible` (control bytes, backslashes and non-UTF-8 bytes escaped),
so no two files print the same.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .compiling import FixedBatch, compile_errors, compile_module
from .devices import select_device
from .errors import CsgguardError
from .features import features_from_outputs
from .images import ImageFiles, InputSpec, check_shard, shard_files
from .listing import Listing, list_inputs
from .models.store import LoadedModel, load_model

#: torch.compile modes a :class:`Screener` accepts by name
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

ROW_FIELDS = ("path", "predicted_class", "confidence", "score", "flagged", "error", "converted")


class Screener:
    """A model and its detector, ready to score batches of files.

    Parameters
    ----------
    run_dir : run directory holding the model (and, by default, ``detector.json``).
    detector : a detector file (``.json``) or folder; default ``run_dir``.
    threshold : flag when ``score > threshold``; default the detector's calibrated ``threshold_``.
    device : ``auto``, ``cpu``, ``cuda[:N]`` or ``mps``.
    compile : run the forward pass, and a device-scored detector's score with it, through
        ``torch.compile`` at one batch size (about a minute of compiling first; the same
        predictions and scores up to float rounding, so an image whose score sits within
        rounding of the threshold may flag differently). For large folders. A string names
        torch.compile's mode instead (``default``, ``reduce-overhead``: CUDA graphs on a GPU).
    """

    def __init__(self, run_dir: str | os.PathLike = "runs/default", *, detector: str | os.PathLike | None = None,
                 threshold: float | None = None, device: str | torch.device = "auto", compile: bool | str = False) -> None:
        from .detectors.base import Detector
        from .detectors.store import load_detector

        self.device = select_device(device)
        self.loaded: LoadedModel = load_model(run_dir, self.device)
        self.detector = load_detector(detector if detector is not None else self.loaded.run_dir,
                                      model_sha256=self.loaded.sha256)
        if self.detector.needs_inputs:  # feature squeezing (alone or in a union) runs the model again
            self.detector.bind_model(self.loaded.model)
        if threshold is None and not hasattr(self.detector, "threshold_"):
            raise CsgguardError("the detector has no calibrated threshold; pass --threshold or refit it")
        self.threshold = check_threshold(threshold if threshold is not None else self.detector.threshold_,
                                         "--threshold" if threshold is not None else "the detector's threshold")
        self.spec = InputSpec.from_manifest(self.loaded.input_spec)
        self.classes = self.loaded.classes
        # a detector that scores the forward pass's tensors where they are is scored in the same pass
        direct = not self.detector.needs_inputs and type(self.detector).score_signals is not Detector.score_signals
        self.passes = _ScoredPass(self.loaded.model, self.detector if direct else None)
        self.compile = check_compile_mode(compile)
        self._compiled: FixedBatch | None = None
        self.reset()

    def reset(self) -> None:
        self.summary: dict[str, Any] = {"images": 0, "scored": 0, "flagged": 0, "errors": 0, "converted": 0}

    @torch.no_grad()
    def score_batch(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(predicted index, softmax confidence, score) for a [0, 1] batch: one forward pass.

        A detector that scores the forward pass's tensors where they are
        (:meth:`~csgguard.detectors.base.Detector.score_signals`) is scored on the device and
        the three columns come back in one copy; any other goes through host features. With
        ``compile``, the pass (and that score) runs compiled at one batch size (the first
        batch's, or :meth:`rows`' ``batch_size``).
        """
        x = x.to(self.device, non_blocking=True)
        if self.compile and self._compiled is None:
            self._compile_for(len(x))
        with compile_errors("the screening pass"):
            out = (self._compiled or self.passes)(x)
        if self.passes.detector is not None:
            block = out.cpu().numpy()  # float64 holds every class index exactly; one copy per batch
            return block[:, 0].astype(np.int64), block[:, 1].astype(np.float32), block[:, 2]
        logits, pooled, *taps = out
        prob = torch.softmax(logits.float(), 1).max(1)
        feats = features_from_outputs(self.loaded.model, logits, pooled, tuple(taps))
        inputs = x if self.detector.needs_inputs else None
        scores = self.detector.score_samples(feats, inputs=inputs)
        return prob.indices.cpu().numpy(), prob.values.cpu().numpy(), scores

    def _compile_for(self, batch_size: int) -> None:
        """Compile the pass for batches of ``batch_size`` rows (shorter ones are padded to it).

        One eager call first: whatever the pass builds on first use (the detector's arrays on the
        device) then exists before tracing, so the compiled graph is one graph, not one per branch."""
        from .progress import log

        with torch.no_grad():
            self.passes(torch.zeros(1, self.spec.channels, self.spec.height, self.spec.width, device=self.device))
        mode = None if self.compile in (True, "default") else self.compile
        log(f"--compile: the screening pass compiles for batches of {batch_size} on the first batch "
            "(about a minute the first time, seconds once torch's cache holds it)")
        self._compiled = FixedBatch(compile_module(self.passes, self.device, mode=mode), batch_size)

    def rows(self, files: Sequence[str | tuple[str, str | None]], *, batch_size: int = 64, workers: int = 0,
             progress: bool | None = None) -> Iterator[dict[str, Any]]:
        """One row per file, in order; updates :attr:`summary` as it goes.

        ``files`` holds paths, or ``(path, error)`` pairs from :func:`list_inputs`: an
        entry with an error is reported as it is and never opened.
        """
        from .progress import make_progress

        entries = [(f, None) if isinstance(f, (str, bytes, os.PathLike)) else (f[0], f[1]) for f in files]
        if batch_size < 1:
            raise CsgguardError(f"--batch-size must be >= 1, got {batch_size}")
        if workers < 0:
            raise CsgguardError(f"--workers must be >= 0, got {workers}")
        if self.compile and self._compiled is None:
            self._compile_for(batch_size)  # every shard of a sharded run gets the same graph
        loader = torch.utils.data.DataLoader(
            _ListedImages(entries, self.spec), batch_size=batch_size, shuffle=False, num_workers=workers,
            collate_fn=_collate, pin_memory=self.device.type == "cuda",
            worker_init_fn=_one_thread if workers else None, prefetch_factor=2 if workers else None)
        start = time.perf_counter()
        with make_progress(progress) as bar:
            task = bar.add_task("screen", total=len(entries), info="")
            for pos, x, errors, conversions in loader:
                ok = [i for i, e in enumerate(errors) if e is None]
                pred = conf = score = None
                if ok:
                    pred, conf, score = self.score_batch(x[ok])
                at = {j: n for n, j in enumerate(ok)}
                for j, p in enumerate(pos):
                    row = {"path": entries[p][0], "predicted_class": None, "confidence": None,
                           "score": None, "flagged": None, "error": errors[j], "converted": conversions[j]}
                    if j in at and (np.isnan(score[at[j]]) or np.isnan(conf[at[j]])):
                        # a NaN score compares False with any threshold: never report it as "not flagged"
                        row["error"] = "the model or detector gave NaN for this image (damaged run or detector?)"
                    elif j in at:
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


class _ScoredPass(torch.nn.Module):
    """One screening pass as one module, so that ``torch.compile`` can take it whole.

    With a ``detector`` that scores on the device: an (N, 3) float64 block of predicted index,
    softmax confidence and score (on a GPU the score's ~90 small operations cost a batch of 256
    more than the network itself when run one by one; compiled, they fuse). Without one: the
    forward pass's tensors ``(logits, pooled, *taps)`` for the host features.
    """

    def __init__(self, model: torch.nn.Module, detector=None) -> None:
        super().__init__()
        self.model = model
        self.detector = detector  # not a module: its arrays are constants of the pass

    def forward(self, x: torch.Tensor):
        out = self.model.forward_signals(x)
        if self.detector is None:
            return (out.logits, out.pooled, *out.taps)
        prob = torch.softmax(out.logits.float(), 1).max(1)
        score = self.detector.score_signals(out.logits, out.pooled, out.taps)
        return torch.stack([prob.indices.double(), prob.values.double(), score.double()], 1)


class _ListedImages(torch.utils.data.Dataset):
    """:class:`~csgguard.images.ImageFiles` over listed entries; an entry the listing refused is not opened."""

    def __init__(self, entries: Sequence[tuple[str, str | None]], spec: InputSpec) -> None:
        self.entries = list(entries)
        self.files = ImageFiles([path for path, _ in self.entries], spec)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        error = self.entries[i][1]
        if error is not None:
            return i, torch.zeros(self.spec.channels, self.spec.height, self.spec.width), error, None
        return self.files[i]


def _collate(items):
    return [it[0] for it in items], torch.stack([it[1] for it in items]), [it[2] for it in items], \
        [it[3] for it in items]


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def check_threshold(value: Any, name: str = "--threshold") -> float:
    """A finite threshold with ``|t| <= 1e12`` (a NaN or 1e308 threshold would silently flag nothing)."""
    import math

    try:
        t = float(value)
    except (TypeError, ValueError):
        raise CsgguardError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(t) or abs(t) > MAX_THRESHOLD:
        raise CsgguardError(f"{name} {t!r} is not a finite number within +-{MAX_THRESHOLD:g}")
    return t


MAX_THRESHOLD = 1e12


def check_compile_mode(compile: bool | str) -> bool | str:
    """``compile`` as :class:`Screener` takes it: a bool, or one of :data:`COMPILE_MODES` by name."""
    if isinstance(compile, str) and compile not in COMPILE_MODES:
        raise CsgguardError(f"unknown compile mode {compile!r}; choose from {', '.join(COMPILE_MODES)}")
    return compile


def screen(paths: Iterable[str | os.PathLike] | str | os.PathLike, run_dir: str | os.PathLike = "runs/default", *,
           detector: str | os.PathLike | None = None, threshold: float | None = None, recursive: bool = False,
           follow_symlinks: bool = False, batch_size: int = 64, workers: int = 0,
           shard: tuple[int, int] | None = None, device: str = "auto", progress: bool | None = None,
           compile: bool | str = False) -> tuple[Screener, Iterator[dict[str, Any]]]:
    """List, shard and screen ``paths``; return the screener (for its summary) and the row generator.

    Everything that can be checked is checked before the model is loaded: the paths
    exist, something was found (a folder whose images all sit in sub-folders, without
    ``recursive``, is an error that suggests ``-r``), the threshold is finite. The
    generator is lazy: iterate it to do the work; ``screener.summary`` is final once
    it is exhausted.
    """
    # one path given as text is that path, not its characters
    paths = [paths] if isinstance(paths, (str, bytes, os.PathLike)) else list(paths)
    if threshold is not None:
        check_threshold(threshold)
    if batch_size < 1:
        raise CsgguardError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise CsgguardError(f"--workers must be >= 0, got {workers}")
    check_compile_mode(compile)
    if shard is not None:  # a malformed shard is refused before anything is listed or loaded
        check_shard(shard)
    listing = list_inputs(paths, recursive=recursive, follow_symlinks=follow_symlinks)
    if not listing.entries and listing.skipped_subfolders:
        names = ", ".join(os.fspath(p) if isinstance(os.fspath(p), str) else os.fsdecode(p) for p in paths)
        raise CsgguardError(f"{names}: no image files at the top level; {listing.skipped_subfolders} sub-folder(s) "
                            "not searched (pass -r / --recursive to descend)")
    screener = Screener(run_dir, detector=detector, threshold=threshold, device=device, compile=compile)
    entries = shard_files(listing.entries, shard, batch_size)
    screener.summary["shard"] = None if shard is None else f"{shard[0]}/{shard[1]}"
    screener.summary["skipped_subfolders"] = listing.skipped_subfolders
    return screener, screener.rows(entries, batch_size=batch_size, workers=workers, progress=progress)


__all__ = ["ROW_FIELDS", "Listing", "Screener", "check_threshold", "list_inputs", "screen"]

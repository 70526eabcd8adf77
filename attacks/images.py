"""Successful adversarial images as 8-bit PNG files, and whether they survive the rounding.

PNG stores 256 grey levels: a perturbation smaller than half a level (1/510) in
every pixel is undone by the round trip (DeepFool and C&W stop just across the
boundary, so most of theirs are). :func:`save_adversarial_images` re-predicts the
quantised images and writes only those that still fool the model, so a folder of
"adversarial" PNGs holds nothing but adversarial images; the rest are counted as
dropped.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch

from ..artifacts import StagedWrites
from ..images import encode_png, to_uint8
from .advset import AdversarialSet


def png_name(index: int, true: int, adv: int) -> str:
    """``<dataset index>_true<label>_adv<predicted>.png``: label and origin are recoverable from the name."""
    return f"{int(index)}_true{int(true)}_adv{int(adv)}.png"


def quantised_predictions(model: torch.nn.Module, q: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The model's predictions for uint8 images ``q`` (what a PNG reader hands it)."""
    if not len(q):
        return np.zeros(0, dtype=np.int64)
    device = next(iter(model.parameters())).device
    xq = torch.from_numpy(q).float().div_(255.0)
    with torch.no_grad():
        return torch.cat([model(xq[s:s + batch_size].to(device)).argmax(1).cpu()
                          for s in range(0, len(xq), batch_size)]).numpy()


def adversarial_pngs(advset: AdversarialSet, model: torch.nn.Module, *, batch_size: int = 256
                     ) -> tuple[dict[str, bytes], int]:
    """Each successful ``x_adv`` that still fools ``model`` after 8-bit rounding, encoded as a PNG.

    Returns ``{file name: PNG bytes}`` (the name carries the prediction of the *rounded* image) and
    how many successes rounding undid. Nothing is written: :func:`save_adversarial_images` does that.
    """
    ok = advset.successful()
    q = to_uint8(ok.x_adv)
    pred = quantised_predictions(model, q, batch_size)
    keep = np.flatnonzero(pred != ok.y)
    return {png_name(ok.index[j], ok.y[j], pred[j]): encode_png(q[j]) for j in keep}, int(len(ok) - len(keep))


def save_adversarial_images(advset: AdversarialSet, out_dir: str | os.PathLike, model: torch.nn.Module,
                            *, batch_size: int = 256, stage: StagedWrites | None = None) -> dict[str, int]:
    """Write each successful ``x_adv`` that still fools ``model`` after 8-bit rounding as a PNG, all or
    none (a failure part-way leaves no PNG of this call behind).

    ``stage`` joins the PNGs to the caller's :class:`~csgguard.artifacts.StagedWrites` (``csgguard
    attack`` stages them with the set they were cut from). Returns ``png_written`` and
    ``png_dropped`` (successes that rounding undid).
    """
    files, dropped = adversarial_pngs(advset, model, batch_size=batch_size)
    with contextlib.nullcontext(stage) if stage is not None else StagedWrites() as staged:
        for name, data in files.items():
            staged.add(Path(out_dir) / name, data)
    return {"png_written": len(files), "png_dropped": dropped}

"""Successful adversarial images as 8-bit PNG files, and whether they survive the rounding.

PNG stores 256 grey levels: a perturbation smaller than half a level (1/510) in
every pixel is undone by the round trip. :func:`save_adversarial_images` writes
the files and re-predicts the quantised images, so the report says how many of
the PNGs still fool the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..artifacts import atomic_write_bytes
from ..images import encode_png, to_uint8
from .advset import AdversarialSet


def png_name(index: int, true: int, adv: int) -> str:
    """``<dataset index>_true<label>_adv<predicted>.png``: label and origin are recoverable from the name."""
    return f"{int(index)}_true{int(true)}_adv{int(adv)}.png"


def save_adversarial_images(advset: AdversarialSet, out_dir: str | os.PathLike, model: torch.nn.Module | None = None,
                            *, batch_size: int = 256) -> dict[str, int | None]:
    """Write each successful ``x_adv`` as a PNG; with ``model``, count those still adversarial after 8 bits."""
    out_dir = Path(out_dir)
    ok = advset.successful()
    q = to_uint8(ok.x_adv)
    for img, i, t, a in zip(q, ok.index, ok.y, ok.pred_adv, strict=True):
        atomic_write_bytes(out_dir / png_name(i, t, a), encode_png(img))
    still = None
    if model is not None and len(ok):
        device = next(iter(model.parameters())).device
        xq = torch.from_numpy(q).float().div_(255.0)
        with torch.no_grad():
            pred = torch.cat([model(xq[s:s + batch_size].to(device)).argmax(1).cpu()
                              for s in range(0, len(xq), batch_size)]).numpy()
        still = int((pred != ok.y).sum())
    elif model is not None:
        still = 0
    return {"png_written": len(ok), "png_still_adversarial": still}

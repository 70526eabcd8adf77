"""Feature squeezing baseline (Xu, Evans & Qi, NDSS 2018).

Score = max over squeezers of the L1 distance between the model's softmax on the
original input and on the squeezed input. Squeezers: colour bit-depth reduction
(default 1 bit for grey images, 5 bits for colour, the paper's choices for MNIST /
CIFAR-10; ``bits=0`` leaves it out) and median smoothing over 2x2 and 3x3 windows.
Unsupervised: nothing is learnt; the threshold comes from clean calibration data
(``calibrate``). It needs the model and the [0, 1] inputs: one extra forward pass per
squeezer.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils._param_validation import Interval

from ..errors import CsgguardError
from ..features import Features
from .base import Detector


def reduce_bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2 ** bits - 1
    return torch.round(x * levels) / levels


def median_smooth(x: torch.Tensor, size: int) -> torch.Tensor:
    """Median over a ``size`` x ``size`` window (reflect padding; even sizes average the two middles)."""
    lo, hi = (size - 1) // 2, size // 2
    xp = F.pad(x, (lo, hi, lo, hi), mode="reflect")
    n, c, h, w = x.shape
    patches = F.unfold(xp, size).reshape(n, c, size * size, h * w)
    srt = patches.sort(dim=2).values
    m = size * size
    med = srt[:, :, m // 2] if m % 2 else 0.5 * (srt[:, :, m // 2 - 1] + srt[:, :, m // 2])
    return med.reshape(n, c, h, w)


class FeatureSqueezingDetector(Detector):
    name = "feature-squeezing"
    supervised = False
    needs_inputs = True
    _parameter_constraints = {
        **Detector._parameter_constraints,
        "bits": [None, Interval(Integral, 0, 8, closed="both")],
        "median": ["array-like"],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, *, fpr: float = 0.05, bits: int | None = None, median: tuple[int, ...] = (2, 3),
                 batch_size: int = 256) -> None:
        super().__init__(fpr=fpr)
        self.bits = bits
        self.median = median
        self.batch_size = batch_size

    def squeezers(self, channels: int) -> list[tuple[str, Any]]:
        """The squeezers in use: bit depth (``bits``; None: the paper's 1 for grey, 5 for colour; 0: none)
        and a median filter per size in ``median``. Each costs one extra forward pass."""
        bits = self.bits if self.bits is not None else (1 if channels == 1 else 5)
        out = [(f"bits{bits}", lambda x: reduce_bit_depth(x, bits))] if bits else []
        out += [(f"median{k}x{k}", lambda x, k=k: median_smooth(x, k)) for k in self.median]
        return out

    def validate_params(self) -> None:
        super().validate_params()
        if any(isinstance(k, bool) or not isinstance(k, Integral) or k < 2 for k in self.median):
            raise CsgguardError(f"feature-squeezing median sizes must be integers >= 2, got {self.median!r}")
        if self.bits == 0 and not len(self.median):
            raise CsgguardError("feature-squeezing needs a squeezer: bits=0 and no median size leave none")

    def _fit(self, clean: Features, adversarial, *, inputs=None, adversarial_inputs=None) -> None:
        self.validate_params()
        if inputs is not None:
            self._check_window(np.shape(inputs))
        self.num_classes_ = clean.num_classes  # nothing to learn

    def _check_window(self, shape: tuple[int, ...]) -> None:
        """A median window fits the images (its reflect padding needs them wider than half of it)."""
        h, w = shape[-2:]
        if len(self.median) and max(self.median) > min(h, w):
            raise CsgguardError(f"feature-squeezing median size {max(self.median)} is larger than the "
                                f"{h}x{w} images; choose sizes up to {min(h, w)}")

    @torch.no_grad()
    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        model = self._bound_model(inputs, "feature-squeezing")
        device = next(model.parameters()).device
        x_all = torch.as_tensor(inputs)
        self._check_window(tuple(x_all.shape))
        squeezers = self.squeezers(int(x_all.shape[1]))
        out = []
        for s in range(0, len(x_all), self.batch_size):
            x = x_all[s:s + self.batch_size].to(device).float()
            p0 = torch.softmax(torch.as_tensor(features.logits[s:s + len(x)], device=device).float(), 1)
            d = torch.stack([(torch.softmax(model(sq(x)).float(), 1) - p0).abs().sum(1) for _, sq in squeezers], 1)
            out.append(d.max(1).values.double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return {}, {"num_classes_": int(self.num_classes_)}

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        self.validate_params()  # a file's squeezers are checked as a user's would be
        self.num_classes_ = int(extra.get("num_classes_", 0))

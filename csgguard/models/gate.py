"""The Class-Specific Gate (Liang et al., ECCV 2020).

A learnable K x C matrix ``G`` with entries in [0, 1]. On the CSG training path a
sample of class ``y`` has filter ``k``'s whole feature map multiplied by
``G[k, y]``; a sparsity hinge pushes the L1-density of ``G`` below a target, and
after every CSG step each row is divided by its maximum over classes and clamped,
so each filter stays fully open for at least one class. At inference the gate is
not applied (no label is known); it is read instead, to ask whether the filters
that fired belong to the predicted class.
"""

from __future__ import annotations

import torch
from torch import nn


class ClassSpecificGate(nn.Module):
    def __init__(self, num_filters: int, num_classes: int, init: float = 0.5) -> None:
        super().__init__()
        self.num_filters = num_filters
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.full((num_filters, num_classes), float(init)))

    def columns(self, y: torch.Tensor) -> torch.Tensor:
        """Gate columns for labels ``y``: shape (N, K)."""
        return self.weight.t()[y]

    def forward(self, features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gate a feature map (N, K, H, W) or pooled features (N, K) by class ``y``."""
        g = self.columns(y).to(features.dtype)
        if features.dim() == 4:
            g = g[:, :, None, None]
        return features * g

    def density(self) -> torch.Tensor:
        """L1-density ||G||_1 / (K*C); 1/C is the floor once every row has its maximum at 1."""
        return self.weight.detach().abs().mean()

    def penalty(self, target_density: float) -> torch.Tensor:
        """Hinge relu(||G||_1 - d*K*C): zero once the density is at or below ``target_density``."""
        total = self.weight.abs().sum()
        return torch.relu(total - target_density * self.weight.numel())

    @torch.no_grad()
    def normalize_(self) -> None:
        """Row-max normalise and clamp to [0, 1]; call after every CSG optimiser step."""
        w = self.weight.clamp_(min=0.0)
        row_max = w.amax(dim=1, keepdim=True).clamp_(min=1e-12)
        w.div_(row_max).clamp_(0.0, 1.0)

    def extra_repr(self) -> str:
        return f"num_filters={self.num_filters}, num_classes={self.num_classes}"

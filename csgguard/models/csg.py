"""The CSG network: normalisation -> backbone -> (gate) -> global average pool -> linear.

One forward pass gives everything the detectors read: the logits and the pooled
activations of the gated layer. Because global average pooling is linear, gating
the feature map by ``G[:, y]`` equals gating the pooled vector, so the CSG training
path costs no second backbone pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .backbones import build_backbone
from .gate import ClassSpecificGate


class ModelOutput(NamedTuple):
    logits: torch.Tensor        # (N, C), STD path (no gate): what the classifier predicts
    pooled: torch.Tensor        # (N, K), pooled activations of the gated layer
    taps: tuple[torch.Tensor, ...] = ()  # (N, C_l) channel means of earlier layers, shallow to deep


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in model.json."""

    arch: str
    num_classes: int
    in_channels: int
    input_size: int
    gate: bool = True
    width: int | None = None
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


class CSGNet(nn.Module):
    """A CNN whose last conv layer carries a Class-Specific Gate (or none: the STD baseline).

    ``model(x)`` returns logits, so foolbox and any PyTorch code can use it as a
    plain classifier on [0, 1] pixels; ``model.forward_signals(x)`` also returns
    the pooled activations and the earlier layers' taps (everything a detector reads,
    from the one pass that classifies; unlike timm's ``forward_features`` it returns no
    feature map); ``model.forward_csg(x, y)`` is the gated training path.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config.arch, in_channels=config.in_channels,
                                       input_size=config.input_size, width=config.width)
        k = self.backbone.out_channels
        self.num_filters = k
        self.num_classes = config.num_classes
        self.fc = nn.Linear(k, config.num_classes)
        self.gate = ClassSpecificGate(k, config.num_classes) if config.gate else None
        c = config.in_channels
        mean = torch.tensor(config.mean, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
        std = torch.tensor(config.std, dtype=torch.float32).reshape(1, -1, 1, 1).expand(1, c, 1, 1)
        self.register_buffer("mean", mean.clone(), persistent=False)
        self.register_buffer("std", std.clone(), persistent=False)

    @property
    def has_gate(self) -> bool:
        return self.gate is not None

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled activations (N, K) of the gated layer for [0, 1] inputs."""
        fmap = self.backbone((x - self.mean) / self.std)
        return fmap.mean(dim=(2, 3))

    def forward_signals(self, x: torch.Tensor) -> ModelOutput:
        """Logits, pooled gated-layer activations and the taps, from one backbone pass."""
        fmap, taps = self.backbone.forward_taps((x - self.mean) / self.std)
        a = fmap.mean(dim=(2, 3))
        return ModelOutput(self.fc(a), a, tuple(taps))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None):
        """Logits for ``x``; with labels ``y``, (STD logits, CSG logits) as :meth:`forward_both`.

        The two-argument form exists so a DistributedDataParallel wrapper sees the
        CSG path go through ``forward`` (DDP only syncs gradients of calls it wraps).
        """
        if y is not None:
            return self.forward_both(x, y)
        return self.fc(self.pooled(x))

    def forward_both(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """STD logits and CSG (gated by true class ``y``) logits from one backbone pass."""
        a = self.pooled(x)
        if self.gate is None:
            raise RuntimeError("forward_both needs a gated model")
        return self.fc(a), self.fc(self.gate(a, y))

    def forward_csg(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.forward_both(x, y)[1]

    def gated_logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """For each class c, the logit of c when only c's gate column is open: (N, C)."""
        if self.gate is None:
            raise RuntimeError("gated_logits needs a gated model")
        g = self.gate.weight  # (K, C)
        # z[n, c] = sum_k W[c, k] * G[k, c] * a[n, k] + b[c]
        return pooled @ (self.fc.weight.t() * g) + self.fc.bias


def build_model(config: ModelConfig) -> CSGNet:
    return CSGNet(config)

"""Features: what one forward pass yields for the detectors, as numpy arrays.

Detectors never see the model: they see a :class:`Features` (logits, pooled
gated-layer activations, and the model's gate and classifier, which are constants).
That keeps every detector fit/save/load/test-able on arrays alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .models.csg import CSGNet


@dataclass
class Features:
    logits: np.ndarray            # (N, C) STD-path logits: the prediction
    pooled: np.ndarray            # (N, K) pooled activations of the gated layer
    gate: np.ndarray | None       # (K, C) the learnt gate, or None for a STD model
    fc_weight: np.ndarray         # (C, K) classifier weights
    fc_bias: np.ndarray           # (C,)

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    @property
    def pred(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    @property
    def num_filters(self) -> int:
        return int(self.pooled.shape[1])

    def subset(self, idx) -> Features:
        return Features(self.logits[idx], self.pooled[idx], self.gate, self.fc_weight, self.fc_bias)

    @staticmethod
    def concat(parts: list[Features]) -> Features:
        p0 = parts[0]
        return Features(np.concatenate([p.logits for p in parts]), np.concatenate([p.pooled for p in parts]),
                        p0.gate, p0.fc_weight, p0.fc_bias)

    def gated_logits(self) -> np.ndarray:
        """z[n, c]: class c's logit when only c's gate column is open (needs a gate)."""
        if self.gate is None:
            raise ValueError("gated logits need a CSG model (this one has no gate)")
        return self.pooled @ (self.fc_weight.T * self.gate) + self.fc_bias


def model_constants(model: CSGNet) -> dict[str, np.ndarray | None]:
    return {
        "gate": None if model.gate is None else model.gate.weight.detach().float().cpu().numpy(),
        "fc_weight": model.fc.weight.detach().float().cpu().numpy(),
        "fc_bias": model.fc.bias.detach().float().cpu().numpy(),
    }


def features_from_outputs(model: CSGNet, logits: torch.Tensor, pooled: torch.Tensor) -> Features:
    return Features(logits.detach().float().cpu().numpy(), pooled.detach().float().cpu().numpy(),
                    **model_constants(model))


@torch.no_grad()
def extract_features(model: CSGNet, x: torch.Tensor | np.ndarray, *, batch_size: int = 512,
                     device: torch.device | str | None = None) -> Features:
    """One forward pass per batch over [0, 1] images ``x`` (N, C, H, W) -> :class:`Features`."""
    x = torch.as_tensor(x, dtype=torch.float32)
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    logits, pooled = [], []
    for start in range(0, len(x), batch_size):
        out = model.forward_features(x[start:start + batch_size].to(device, non_blocking=True))
        logits.append(out.logits.float().cpu())
        pooled.append(out.pooled.float().cpu())
    if not logits:
        k = model.num_filters
        return Features(np.zeros((0, model.num_classes), np.float32), np.zeros((0, k), np.float32),
                        **model_constants(model))
    return features_from_outputs(model, torch.cat(logits), torch.cat(pooled))

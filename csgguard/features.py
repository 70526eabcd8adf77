"""Features: what one forward pass yields for the detectors, as numpy arrays.

Detectors never see the model: they see a :class:`Features` (logits, pooled
gated-layer activations, the channel means of a few earlier layers ("taps"), and the
model's gate and classifier, which are constants).
That keeps every detector fit/save/load/test-able on arrays alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import CsgguardError
from .models.csg import CSGNet


@dataclass
class Features:
    logits: np.ndarray            # (N, C) STD-path logits: the prediction
    pooled: np.ndarray            # (N, K) pooled activations of the gated layer
    gate: np.ndarray | None       # (K, C) the learnt gate, or None for a STD model
    fc_weight: np.ndarray         # (C, K) classifier weights
    fc_bias: np.ndarray           # (C,)
    taps: tuple[np.ndarray, ...] = ()  # (N, C_l) channel means of earlier layers, shallow to deep

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
        return Features(self.logits[idx], self.pooled[idx], self.gate, self.fc_weight, self.fc_bias,
                        tuple(t[idx] for t in self.taps))

    @staticmethod
    def concat(parts: list[Features]) -> Features:
        p0 = parts[0]
        taps = tuple(np.concatenate([p.taps[i] for p in parts]) for i in range(len(p0.taps)))
        return Features(np.concatenate([p.logits for p in parts]), np.concatenate([p.pooled for p in parts]),
                        p0.gate, p0.fc_weight, p0.fc_bias, taps)

    def require_finite(self, where: str) -> Features:
        """Refuse NaN / inf features: a model whose weights are finite can still compute them (a forged
        negative BatchNorm variance), and every statistic downstream would silently go NaN."""
        bad = ~np.isfinite(self.logits).all(1) | ~np.isfinite(self.pooled).all(1)
        for t in self.taps:
            bad |= ~np.isfinite(t).all(1)
        if bad.any():
            from .errors import ArtifactError

            raise ArtifactError(f"{where}: the model computes NaN or inf for {int(bad.sum())} of {len(self)} images "
                                "(damaged or forged weights?)")
        return self

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


def features_from_outputs(model: CSGNet, logits: torch.Tensor, pooled: torch.Tensor,
                          taps: tuple[torch.Tensor, ...] = ()) -> Features:
    def arr(t):
        return t.detach().float().cpu().numpy()

    return Features(arr(logits), arr(pooled), **model_constants(model), taps=tuple(arr(t) for t in taps))


@torch.no_grad()
def extract_features(model: CSGNet, x: torch.Tensor | np.ndarray, *, batch_size: int = 512,
                     device: torch.device | str | None = None) -> Features:
    """One forward pass per batch over [0, 1] images ``x`` (N, C, H, W) -> :class:`Features`.

    ``model`` is a network or a :class:`~csgguard.LoadedModel`. Inputs outside [0, 1] (0-255 pixels,
    or already normalised) are refused: the network normalises inside, and would read them as noise."""
    model = getattr(model, "model", model)  # a LoadedModel's network
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "forward_signals"):
        raise CsgguardError(f"model must be a csgguard network or LoadedModel, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CsgguardError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.dim() != 4:
        raise CsgguardError(f"images must be a 4-d (N, C, H, W) array, got shape {tuple(x.shape)}")
    cfg = getattr(model, "config", None)
    if cfg is not None and tuple(x.shape[1:]) != (cfg.in_channels, cfg.input_size, cfg.input_size):
        raise CsgguardError(f"images of shape {tuple(x.shape[1:])} for a model that reads "
                            f"{(cfg.in_channels, cfg.input_size, cfg.input_size)}")
    if len(x) and (not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise CsgguardError("images must be finite floats in [0, 1] (normalisation belongs inside the model)")
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    outs = [model.forward_signals(x[start:start + batch_size].to(device, non_blocking=True))
            for start in range(0, max(len(x), 1), batch_size)]
    if not len(x):
        outs = [model.forward_signals(torch.zeros((1, *x.shape[1:]), device=device))]
        outs = [type(outs[0])(*(t[:0] for t in outs[0][:2]), tuple(t[:0] for t in outs[0].taps))]
    return features_from_outputs(model, torch.cat([o.logits.float().cpu() for o in outs]),
                                 torch.cat([o.pooled.float().cpu() for o in outs]),
                                 tuple(torch.cat([o.taps[i].float().cpu() for o in outs])
                                       for i in range(len(outs[0].taps))))

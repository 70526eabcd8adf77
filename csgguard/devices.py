"""Device choice: CUDA > MPS > CPU for ``auto``; never a silent fall-back."""

from __future__ import annotations

import torch

from .errors import CsgguardError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def select_device(spec: str | torch.device | None = "auto") -> torch.device:
    """Resolve ``auto``/``cpu``/``cuda[:N]``/``mps``; raise if an asked-for accelerator is absent."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CsgguardError(f"--device {spec} was asked for but CUDA is not available on this machine "
                                "(use --device cpu or auto)")
        return torch.device(spec)
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise CsgguardError("--device mps was asked for but MPS is not available on this machine")
        return torch.device("mps")
    if spec == "cpu":
        return torch.device("cpu")
    raise CsgguardError(f"unknown device {spec!r}; choose one of {', '.join(DEVICE_CHOICES)} or cuda:N")


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (no loss scaling needed); a no-op elsewhere."""
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")

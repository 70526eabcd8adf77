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


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matrix work natively: CUDA, or a CPU with AVX512-BF16 / AMX.

    On other CPUs bf16 is emulated and slower than fp32, so autocast stays off there.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast where the device runs bf16 natively (no loss scaling needed); else a no-op."""
    on = enabled and bf16_native(device)
    return torch.autocast(device_type=device.type if on else "cpu", dtype=torch.bfloat16, enabled=on)


def channels_last(device: torch.device, amp: bool) -> bool:
    """NHWC layout pays on CUDA and with bf16 oneDNN kernels on CPU (measured: benchmarks/train_speed.py)."""
    return device.type == "cuda" or (amp and bf16_native(device))

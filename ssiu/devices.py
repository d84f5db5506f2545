"""Which torch device a command runs on."""

from __future__ import annotations

import torch


class CudaUnavailableError(ValueError, RuntimeError):
    """CUDA asked for on a machine without it: an input error for the CLI (ValueError),
    a RuntimeError for code that caught the earlier type."""


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Map "auto" (or None) to cuda if available, else cpu; check a named CUDA device exists."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"invalid device {device!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CudaUnavailableError(
            f"device {device}: CUDA is not available on this machine (use --device cpu)"
        )
    return device

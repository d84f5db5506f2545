"""The training loss of the released SSIU: L1 + 0.01 * L1 between rfft2 spectra (SSIU.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FREQ_WEIGHT = 0.01


def _check(sr: torch.Tensor, hr: torch.Tensor) -> None:
    if sr.shape != hr.shape:
        raise ValueError(f"sr {tuple(sr.shape)} and hr {tuple(hr.shape)} must have one shape")
    if sr.ndim < 2:
        raise ValueError(f"expected images (..., H, W), got shape {tuple(sr.shape)}")


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def spectrum(x: torch.Tensor) -> torch.Tensor:
    """rfft2 over the last two dims (default "backward" norm: unscaled), real and imaginary
    parts stacked last: (..., H, W) -> (..., H, W // 2 + 1, 2), float32 (cuFFT in half
    precision only takes powers of two, so the FFT always runs in float32 or float64)."""
    return torch.view_as_real(torch.fft.rfft2(_wide(x)))


def frequency_l1(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the stacked real/imaginary rfft2 spectra."""
    _check(sr, hr)
    return F.l1_loss(spectrum(sr), spectrum(hr))


def ssiu_loss(sr: torch.Tensor, hr: torch.Tensor, freq_weight: float = FREQ_WEIGHT) -> torch.Tensor:
    """L1(sr, hr) + freq_weight * frequency_l1(sr, hr); sr, hr: (N, 3, H, W), mean reduction."""
    _check(sr, hr)
    pixel = F.l1_loss(_wide(sr), _wide(hr))
    if freq_weight == 0:
        return pixel
    return pixel + freq_weight * frequency_l1(sr, hr)


class SSIULoss(nn.Module):
    """`ssiu_loss` as a module."""

    def __init__(self, freq_weight: float = FREQ_WEIGHT):
        super().__init__()
        self.freq_weight = float(freq_weight)

    def forward(self, sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        return ssiu_loss(sr, hr, self.freq_weight)

    def extra_repr(self) -> str:
        return f"freq_weight={self.freq_weight}"

"""Per-pixel LayerNorm over channels (the step LN of SS-ReM)."""

from __future__ import annotations

import torch

from ssiu.ops.backend import fused, resolve
from ssiu.ops.checks import check_feature_map, check_param

EPS = 1e-6


def layer_norm2d_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """(x - mean_c) / sqrt(var_c + eps) * weight + bias, biased variance over C.

    x: (N, C, H, W); weight, bias: (C,).
    """
    mean = x.mean(1, keepdim=True)
    var = (x - mean).square().mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight[:, None, None] + bias[:, None, None]


def _fused():
    return fused("layer_norm")  # imports triton: only when the fused path is asked for


def layer_norm2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = EPS,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """Channel LayerNorm of x: (N, C, H, W) float; weight, bias: (C,)."""
    check_feature_map("x", x)
    channels = x.shape[1]
    check_param("weight", weight, x, (channels,))
    check_param("bias", bias, x, (channels,))
    if resolve(backend, x, lambda: _fused().layer_norm2d_unsupported(x)) == "triton":
        return _fused().layer_norm2d(x, weight, bias, eps)
    return layer_norm2d_reference(x, weight, bias, eps)

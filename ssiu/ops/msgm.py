"""MSGM, the mixed-scale gating module: out = 1x1_o(GELU(1x1_a(x)) * 1x1_d(dw3x3(1x1_c(x))))."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssiu.ops.backend import fused, resolve
from ssiu.ops.checks import check_feature_map, check_param


class MSGMParams(NamedTuple):
    """Weights of one MSGM, in Conv2d layouts (C = channels)."""

    gate_weight: torch.Tensor  # 1x1_a (C, C, 1, 1)
    gate_bias: torch.Tensor  # (C,)
    expand_weight: torch.Tensor  # 1x1_c (C, C, 1, 1)
    expand_bias: torch.Tensor
    depthwise_weight: torch.Tensor  # dw3x3 (C, 1, 3, 3), reflect padding
    depthwise_bias: torch.Tensor
    reduce_weight: torch.Tensor  # 1x1_d (C, C, 1, 1)
    reduce_bias: torch.Tensor
    out_weight: torch.Tensor  # 1x1_o (C, C, 1, 1)
    out_bias: torch.Tensor


def depthwise3x3_reflect(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Depthwise 3x3 convolution with reflect padding of 1, as every dw3x3 in SSIU."""
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias, groups=x.shape[1])


def msgm_reference(
    x: torch.Tensor, params: MSGMParams, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """The formula of SSIU.md, plus `residual` added to the output when given."""
    p = params
    gate = F.conv2d(x, p.gate_weight, p.gate_bias)
    value = F.conv2d(x, p.expand_weight, p.expand_bias)
    value = depthwise3x3_reflect(value, p.depthwise_weight, p.depthwise_bias)
    value = F.conv2d(value, p.reduce_weight, p.reduce_bias)
    out = F.conv2d(F.gelu(gate) * value, p.out_weight, p.out_bias)
    return out if residual is None else out + residual


def check_msgm_params(params: MSGMParams, x: torch.Tensor) -> None:
    c = x.shape[1]
    shapes = MSGMParams(
        (c, c, 1, 1), (c,), (c, c, 1, 1), (c,), (c, 1, 3, 3), (c,),
        (c, c, 1, 1), (c,), (c, c, 1, 1), (c,),
    )  # fmt: skip
    for name, tensor, shape in zip(MSGMParams._fields, params, shapes, strict=True):
        check_param(name, tensor, x, shape)


def _fused():
    return fused("msgm")  # imports triton: only when the fused path is asked for


def msgm(
    x: torch.Tensor,
    params: MSGMParams,
    residual: torch.Tensor | None = None,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """MSGM(x) (+ residual). x, residual: (N, C, H, W) float, H and W >= 2."""
    check_feature_map("x", x, min_size=2)
    check_msgm_params(params, x)
    if residual is not None:
        check_feature_map("residual", residual)
        check_param("residual", residual, x, tuple(x.shape))
    if resolve(backend, x, lambda: _fused().msgm_unsupported(x)) == "triton":
        return _fused().msgm(x, params, residual)
    return msgm_reference(x, params, residual)

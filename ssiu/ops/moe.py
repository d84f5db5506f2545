"""MoE-FS, the mixture-of-experts feature selector over the outputs of three steps."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssiu.ops.backend import fused, resolve
from ssiu.ops.checks import check_feature_map, check_param
from ssiu.ops.esam import topk_threshold_mask

NUM_EXPERTS = 3


class MoEParams(NamedTuple):
    gate_weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # 1x1_i, (C, C, 1, 1) each
    gate_biases: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (C,) each
    fuse_weight: torch.Tensor  # (C, C, 1, 1)
    fuse_bias: torch.Tensor  # (C,)


def moe_gate_weights(experts: tuple[torch.Tensor, ...], params: MoEParams) -> torch.Tensor:
    """p (3, N, C, H, W): softmax over the experts of the gate logits 1x1_i(e_i), for every
    channel and pixel (before any top-k)."""
    gates = zip(experts, params.gate_weights, params.gate_biases, strict=True)
    return torch.stack([F.conv2d(e, w, b) for e, w, b in gates]).softmax(0)


def moe_fs_reference(
    experts: tuple[torch.Tensor, ...],
    params: MoEParams,
    *,
    topk: int = NUM_EXPERTS,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """fuse(m) + m (+ residual), m = sum over kept experts of softmax_i(1x1_i(e_i)) * e_i.

    The softmax runs over the experts separately for every channel and pixel; with
    topk < 3 only the weights >= the k-th largest are kept (ties kept), not renormalised.
    """
    stacked = torch.stack(experts)  # (3, N, C, H, W)
    weights = moe_gate_weights(experts, params)
    if topk < NUM_EXPERTS:
        weights = weights * topk_threshold_mask(weights, topk, dim=0)
    mixed = (weights * stacked).sum(0)
    out = F.conv2d(mixed, params.fuse_weight, params.fuse_bias) + mixed
    return out if residual is None else out + residual


def _fused():
    return fused("moe")  # imports triton: only when the fused path is asked for


def moe_fs(
    experts: tuple[torch.Tensor, ...],
    params: MoEParams,
    *,
    topk: int = NUM_EXPERTS,
    residual: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Three expert maps (N, C, H, W) each -> selected features (N, C, H, W)."""
    if len(experts) != NUM_EXPERTS:
        raise ValueError(f"MoE-FS takes {NUM_EXPERTS} experts, got {len(experts)}")
    if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= NUM_EXPERTS:
        raise ValueError(f"moe_topk must be 1, 2 or 3, got {topk!r}")
    first = experts[0]
    check_feature_map("experts[0]", first)
    c = first.shape[1]
    for i, e in enumerate(experts[1:], 1):
        check_feature_map(f"experts[{i}]", e)
        check_param(f"experts[{i}]", e, first, tuple(first.shape))
    if residual is not None:
        check_feature_map("residual", residual)
        check_param("residual", residual, first, tuple(first.shape))
    for i in range(NUM_EXPERTS):
        check_param(f"gate_weights[{i}]", params.gate_weights[i], first, (c, c, 1, 1))
        check_param(f"gate_biases[{i}]", params.gate_biases[i], first, (c,))
    check_param("fuse_weight", params.fuse_weight, first, (c, c, 1, 1))
    check_param("fuse_bias", params.fuse_bias, first, (c,))
    if resolve(backend, first, lambda: _fused().unsupported(experts, residual)) == "triton":
        return _fused().moe_fs(experts, params, topk=topk, residual=residual)
    return moe_fs_reference(experts, params, topk=topk, residual=residual)

"""One SS-ReM unfolding step as one functional op (S1, S2, S3.a, S3.b and the FFN MSGM).

    a_n  = LayerNorm(a)
    u    = MSGM_z(a_n) + a_n + y          (S1, and the input of S3.a)
    beta = MSGM_beta(a_n)                 (S2)
    w    = ESAM(u) + u - beta             (S3.a)
    a'   = MSGM_refine(w) + beta          (S3.b)
    out  = MSGM_ffn(a') + a'

The reference is this composition of the reference ops (what `SSReMStep` computes with
backend "torch"); the fused path (`ssiu.ops.fused_step`) runs the same formula with the
additions and the subtraction folded into the kernels' prologues and epilogues, forward
and backward. `ssrem_body` runs all steps of a model (a_{t+1} = step_t(a_t, y), a_0 = y)
as one op; fused (`ssiu.ops.fused_body`) the gradient sums over the steps ride in the
kernels too.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ssiu.ops.backend import fused, resolve
from ssiu.ops.checks import check_feature_map, check_param
from ssiu.ops.esam import ESAMParams, check_esam_args, esam_reference
from ssiu.ops.layer_norm import EPS, layer_norm2d_reference
from ssiu.ops.msgm import MSGMParams, check_msgm_params, msgm_reference


class StepParams(NamedTuple):
    """Weights of one SS-ReM step (the `SSReMStep` submodules)."""

    norm_weight: torch.Tensor  # (C,)
    norm_bias: torch.Tensor  # (C,)
    z: MSGMParams  # S1
    beta: MSGMParams  # S2
    esam: ESAMParams  # S3.a
    refine: MSGMParams  # S3.b
    ffn: MSGMParams


class ESAMGeometry(NamedTuple):
    heads: int
    block: int
    halo: int
    topk: int | None


def ssrem_step_reference(
    a: torch.Tensor, y: torch.Tensor, params: StepParams, geometry: ESAMGeometry
) -> torch.Tensor:
    """The step as SSIU.md writes it, from the reference ops."""
    p = params
    a_n = layer_norm2d_reference(a, p.norm_weight, p.norm_bias, EPS)
    z = msgm_reference(a_n, p.z)
    beta = msgm_reference(a_n, p.beta)
    v = esam_reference(a_n + z + y, p.esam, **geometry._asdict())
    a = msgm_reference(v - beta, p.refine, residual=beta)
    return msgm_reference(a, p.ffn, residual=a)


def check_step_args(
    a: torch.Tensor, y: torch.Tensor, params: StepParams, geometry: ESAMGeometry
) -> None:
    check_feature_map("a", a, min_size=2)
    check_feature_map("y", y)
    if y.shape != a.shape or y.dtype != a.dtype or y.device != a.device:
        raise ValueError(
            f"y must match a: got {tuple(y.shape)} {y.dtype} on {y.device} for "
            f"a {tuple(a.shape)} {a.dtype} on {a.device}"
        )
    c = a.shape[1]
    check_param("norm_weight", params.norm_weight, a, (c,))
    check_param("norm_bias", params.norm_bias, a, (c,))
    for msgm_params in (params.z, params.beta, params.refine, params.ffn):
        check_msgm_params(msgm_params, a)
    check_esam_args(a, params.esam, *geometry)


def _fused():
    return fused("step")  # imports triton: only when the fused path is asked for


def ssrem_step(
    a: torch.Tensor,
    y: torch.Tensor,
    params: StepParams,
    geometry: ESAMGeometry,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """One SS-ReM step: a (the running features) and y (the shallow features), both
    (N, C, H, W) with H, W even -> the next a."""
    check_step_args(a, y, params, geometry)
    unsupported = lambda: _fused().unsupported(a, geometry)
    if resolve(backend, a, unsupported) == "triton":
        return _fused().ssrem_step(a, y, params, geometry)
    return ssrem_step_reference(a, y, params, geometry)


def ssrem_body_reference(
    y: torch.Tensor, params: list[StepParams], geometry: ESAMGeometry
) -> list[torch.Tensor]:
    """Every step's output, the steps run one after the other from a_0 = y."""
    outs, a = [], y
    for p in params:
        a = ssrem_step_reference(a, y, p, geometry)
        outs.append(a)
    return outs


def ssrem_body(
    y: torch.Tensor,
    params: list[StepParams],
    geometry: ESAMGeometry,
    *,
    backend: str = "torch",
) -> list[torch.Tensor]:
    """All SS-ReM steps of a model from the shallow features y (N, C, H, W), H, W even:
    a_{t+1} = step_t(a_t, y) with a_0 = y. Returns [a_1, ..., a_n]."""
    if not params:
        raise ValueError("ssrem_body needs at least one step's parameters")
    for p in params:
        check_step_args(y, y, p, geometry)
    unsupported = lambda: fused("body").unsupported(y, geometry)
    if resolve(backend, y, unsupported) == "triton":
        return fused("body").ssrem_body(y, params, geometry)
    return ssrem_body_reference(y, params, geometry)

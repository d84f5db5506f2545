"""The upsampling tail: (1x1 C -> C*r*r, PixelShuffle(r), GELU) per stage, 3x3 to RGB, + skip."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ssiu.ops.backend import fused, resolve
from ssiu.ops.checks import check_feature_map, check_param


class TailParams(NamedTuple):
    up_weights: tuple[torch.Tensor, ...]  # per stage (C*r*r, C, 1, 1)
    up_biases: tuple[torch.Tensor, ...]  # per stage (C*r*r,)
    rgb_weight: torch.Tensor  # (3, C, 3, 3), reflect padding
    rgb_bias: torch.Tensor  # (3,)


def tail_reference(
    f: torch.Tensor, params: TailParams, *, factors: tuple[int, ...], skip: torch.Tensor | None
) -> torch.Tensor:
    """f: (N, C, h, w) -> (N, 3, h*s, w*s) (+ skip, the upsampled input image)."""
    for w, b, r in zip(params.up_weights, params.up_biases, factors, strict=True):
        f = F.gelu(F.pixel_shuffle(F.conv2d(f, w, b), r))
    out = F.conv2d(F.pad(f, (1, 1, 1, 1), mode="reflect"), params.rgb_weight, params.rgb_bias)
    return out if skip is None else out + skip


def _fused():
    return fused("tail")  # imports triton: only when the fused path is asked for


def tail(
    f: torch.Tensor,
    params: TailParams,
    *,
    factors: tuple[int, ...],
    skip: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Upsample features f: (N, C, h, w) by prod(factors) to RGB, adding `skip` if given."""
    check_feature_map("f", f)
    c = f.shape[1]
    if len(params.up_weights) != len(factors) or len(params.up_biases) != len(factors):
        raise ValueError(f"tail has {len(factors)} stages but {len(params.up_weights)} weights")
    for i, r in enumerate(factors):
        check_param(f"up_weights[{i}]", params.up_weights[i], f, (c * r * r, c, 1, 1))
        check_param(f"up_biases[{i}]", params.up_biases[i], f, (c * r * r,))
    check_param("rgb_weight", params.rgb_weight, f, (3, c, 3, 3))
    check_param("rgb_bias", params.rgb_bias, f, (3,))
    if skip is not None:
        s = 1
        for r in factors:
            s *= r
        n, _, h, w = f.shape
        check_param("skip", skip, f, (n, 3, h * s, w * s))
    if resolve(backend, f, lambda: _fused().unsupported(f, factors)) == "triton":
        return _fused().tail(f, params, factors=factors, skip=skip)
    return tail_reference(f, params, factors=factors, skip=skip)

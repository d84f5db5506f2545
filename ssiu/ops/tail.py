"""The upsampling tail: (1x1 C -> C*r*r, PixelShuffle(r), GELU) per stage, 3x3 to RGB, + skip.

The skip is either a full-resolution map or the low-resolution image itself (`image`),
upsampled bilinearly (align_corners=False) by the tail's scale, as SSIU adds its input:
passing the image lets the fused kernels upsample it at each output pixel."""

from __future__ import annotations

import math
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


def upsample_image(image: torch.Tensor, scale: int) -> torch.Tensor:
    """SSIU's skip: the image upsampled bilinearly by `scale` (align_corners=False)."""
    return F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)


def tail_reference(
    f: torch.Tensor,
    params: TailParams,
    *,
    factors: tuple[int, ...],
    skip: torch.Tensor | None,
    image: torch.Tensor | None = None,
) -> torch.Tensor:
    """f: (N, C, h, w) -> (N, 3, h*s, w*s) (+ skip, or + the image (N, 3, h, w) upsampled)."""
    if image is not None:
        skip = upsample_image(image, math.prod(factors))
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
    image: torch.Tensor | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Upsample features f: (N, C, h, w) by s = prod(factors) to RGB, adding `skip` (N, 3,
    h*s, w*s) or the bilinear upsampling of `image` (N, 3, h, w) if given (not both)."""
    check_feature_map("f", f)
    c = f.shape[1]
    if len(params.up_weights) != len(factors) or len(params.up_biases) != len(factors):
        raise ValueError(f"tail has {len(factors)} stages but {len(params.up_weights)} weights")
    for i, r in enumerate(factors):
        check_param(f"up_weights[{i}]", params.up_weights[i], f, (c * r * r, c, 1, 1))
        check_param(f"up_biases[{i}]", params.up_biases[i], f, (c * r * r,))
    check_param("rgb_weight", params.rgb_weight, f, (3, c, 3, 3))
    check_param("rgb_bias", params.rgb_bias, f, (3,))
    n, _, h, w = f.shape
    s = math.prod(factors)
    if skip is not None and image is not None:
        raise ValueError("pass either skip (the upsampled image) or image, not both")
    for name, extra, size in (("skip", skip, (h * s, w * s)), ("image", image, (h, w))):
        if extra is not None:
            check_feature_map(name, extra, channels=3)
            check_param(name, extra, f, (n, 3, *size))
    if resolve(backend, f, lambda: _fused().unsupported(f, factors)) == "triton":
        return _fused().tail(f, params, factors=factors, skip=skip, image=image)
    return tail_reference(f, params, factors=factors, skip=skip, image=image)

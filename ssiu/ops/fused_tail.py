"""Fused upsampling tail (Triton): each 1x1 + PixelShuffle + GELU stage is one custom op.

| op | inputs -> outputs |
|---|---|
| `ssiu::upshuffle_fwd` | x, weight (C*r*r, C, 1, 1), bias, factor -> GELU(PixelShuffle_r(1x1(x))) |
| `ssiu::upshuffle_bwd` | dout, x, weight, bias, factor -> [dx, dparams (fp32, flat)] |

The kernel writes the stage's output directly in the shuffled (N, C, h*r, w*r) layout;
the backward recomputes the pre-activation from x (only the inputs are saved). x4 is two
x2 stages. Opaque `custom_op`s with fakes and a registered autograd formula, as in
`ssiu.ops.fused`.

The final reflect-padded 3x3 conv to RGB, its bias and the skip add are one more pair of
custom ops (`ssiu::tail_rgb_fwd` / `ssiu::tail_rgb_bwd`, `ssiu.kernels.tail_rgb`): the
forward reads the last stage's full-resolution map once (the PyTorch path padded a copy
of it and wrote the 3-channel output twice); the backward reads it once more for the
weight gradient and writes its gradient. The skip's gradient is dout. A skip of another
dtype than the features (autocast) is added after the kernel, in PyTorch.

Each backward returns its parameter gradients as one packed fp32 vector (one reduction
launch); `_backward` views it per parameter (a custom op's outputs may not alias).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssiu.kernels import tail as tail_kernels
from ssiu.kernels import tail_rgb as rgb_kernels
from ssiu.kernels.common import (
    SUPPORTED_CHANNELS,
    channels_supported,
    image_offsets_fit,
    on_tensor_device,
)
from ssiu.kernels.partials import split_flat
from ssiu.ops.tail import TailParams


@torch.library.custom_op("ssiu::upshuffle_fwd", mutates_args=())
@on_tensor_device
def _upshuffle_fwd(x: Tensor, weight: Tensor, bias: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """(out, w_lo): w_lo the weight in x's dtype, for the backward."""
    return tail_kernels.upshuffle_fwd(x, weight, bias, factor)


@_upshuffle_fwd.register_fake
def _upshuffle_fwd_fake(x, weight, bias, factor):
    n, c, h, w = x.shape
    return x.new_empty((n, c, h * factor, w * factor)), x.new_empty(weight.shape[:2])


@torch.library.custom_op("ssiu::upshuffle_bwd", mutates_args=())
@on_tensor_device
def _upshuffle_bwd(
    dout: Tensor, x: Tensor, w_lo: Tensor, bias: Tensor, factor: int
) -> list[Tensor]:
    return tail_kernels.upshuffle_bwd(dout, x, w_lo, bias, factor)


@_upshuffle_bwd.register_fake
def _upshuffle_bwd_fake(dout, x, w_lo, bias, factor):
    return [x.new_empty(x.shape), x.new_empty(w_lo.numel() + bias.numel(), dtype=torch.float32)]


def _setup(ctx, inputs, output):
    x, weight, bias, factor = inputs
    ctx.save_for_backward(x, output[1], weight, bias)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for w_lo
    ctx.factor = factor


def _backward(ctx, dout, _dw_lo):
    if dout is None:  # the output was not used
        return None, None, None, None
    x, w_lo, weight, bias = ctx.saved_tensors
    dx, dparams = _upshuffle_bwd(dout, x, w_lo, bias, ctx.factor)
    # One reduced buffer for both gradients (one reduction launch); views of it per
    # parameter, taken here because a custom op's outputs may not alias each other.
    dweight, dbias = split_flat(dparams, (weight, bias))
    return dx, dweight, dbias, None


_upshuffle_fwd.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("ssiu::tail_rgb_fwd", mutates_args=())
@on_tensor_device
def _tail_rgb_fwd(f: Tensor, weight: Tensor, bias: Tensor, skip: Tensor | None) -> Tensor:
    return rgb_kernels.tail_rgb_fwd(f, weight, bias, skip)


@_tail_rgb_fwd.register_fake
def _tail_rgb_fwd_fake(f, weight, bias, skip):
    n, _, h, w = f.shape
    return f.new_empty((n, 3, h, w))


@torch.library.custom_op("ssiu::tail_rgb_bwd", mutates_args=())
@on_tensor_device
def _tail_rgb_bwd(dout: Tensor, f: Tensor, weight: Tensor) -> list[Tensor]:
    return rgb_kernels.tail_rgb_bwd(dout, f, weight)


@_tail_rgb_bwd.register_fake
def _tail_rgb_bwd_fake(dout, f, weight):
    return [f.new_empty(f.shape), f.new_empty(weight.numel() + 3, dtype=torch.float32)]


def _rgb_setup(ctx, inputs, output):
    f, weight, bias, skip = inputs
    ctx.save_for_backward(f, weight, bias)
    ctx.skip_dtype = None if skip is None else skip.dtype


def _rgb_backward(ctx, dout):
    f, weight, bias = ctx.saved_tensors
    df, dparams = _tail_rgb_bwd(dout, f, weight)
    dweight, dbias = split_flat(dparams, (weight, bias))
    dskip = None if ctx.skip_dtype is None else dout.to(ctx.skip_dtype)
    return df, dweight, dbias, dskip


_tail_rgb_fwd.register_autograd(_rgb_backward, setup_context=_rgb_setup)


def _stage_error(dtype, c: int, h: int, w: int, factor: int, sized: bool, input_fits: bool):
    """Why the kernel cannot run one stage on an (N, c, h, w) input, or None.

    sized: check the int32 in-image addressing (not on the meta device).
    """
    if dtype not in tail_kernels.KERNEL_DTYPES:
        return TypeError(
            f"the fused tail runs {tail_kernels.KERNEL_DTYPES}, got {dtype}; use backend='torch'"
        )
    if not channels_supported(c, dtype):
        return ValueError(
            f"the fused tail needs a power-of-two C in {SUPPORTED_CHANNELS} (compile-checked), "
            f"got C={c}; use backend='torch'"
        )
    if factor not in tail_kernels.FACTORS:
        return ValueError(
            f"the fused tail runs PixelShuffle factors {tail_kernels.FACTORS}, got {factor}"
        )
    if sized and (not input_fits or c * h * w * factor * factor >= 2**31):
        return ValueError("the fused tail addresses one image with int32; an image is too large")
    return None


def stage_unsupported(x: Tensor, factor: int) -> Exception | None:
    """Why the kernel cannot run this upsampling stage (dtype, channels, factor, size)."""
    sized = x.device.type != "meta"
    fits = sized and image_offsets_fit(x)
    return _stage_error(x.dtype, *x.shape[1:], factor, sized, fits)


def unsupported(f: Tensor, factors: tuple[int, ...]) -> Exception | None:
    """Why the fused tail cannot run features f through `factors`, or None."""
    sized = f.device.type != "meta"
    fits = sized and image_offsets_fit(f)
    _, c, h, w = f.shape
    for r in factors:
        if (error := _stage_error(f.dtype, c, h, w, r, sized, fits)) is not None:
            return error
        # The next stage reads this stage's contiguous output, sized by the check above.
        h, w, fits = h * r, w * r, True
    if h < 2 or w < 2:
        return ValueError(f"the reflect-padded 3x3 needs a map of at least 2x2, got {h}x{w}")
    return None


def upshuffle_gelu(x: Tensor, weight: Tensor, bias: Tensor, factor: int) -> Tensor:
    """GELU(PixelShuffle_r(1x1(x))): x (N, C, h, w) -> (N, C, h*r, w*r), fused.

    x: float32/float16/bfloat16, C a power of two >= 16, any strides; r = 2 or 3.
    """
    if (error := stage_unsupported(x, factor)) is not None:
        raise error
    return _upshuffle_fwd(x, weight, bias, int(factor))[0]


def tail(f: Tensor, params: TailParams, *, factors: tuple[int, ...], skip: Tensor | None) -> Tensor:
    """f: (N, C, h, w) -> (N, 3, h*s, w*s) (+ skip): fused stages, then the fused 3x3 + skip."""
    for w, b, r in zip(params.up_weights, params.up_biases, factors, strict=True):
        f = upshuffle_gelu(f, w, b, r)
    fused_skip = skip is not None and skip.dtype == f.dtype and image_offsets_fit(skip)
    out = _tail_rgb_fwd(f, params.rgb_weight, params.rgb_bias, skip if fused_skip else None)
    return out if skip is None or fused_skip else out + skip

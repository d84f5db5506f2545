"""Fused upsampling tail (Triton): all its stages and the final 3x3 as one pair of custom ops.

| op | inputs -> outputs |
|---|---|
| `ssiu::tail_fwd` | f, params, skip, image, factors -> [out, stage outputs, cast 1x1 weights] |
| `ssiu::tail_bwd` | dout, [f, stage outputs, cast weights], params, factors -> [df, grads] |
| `ssiu::upshuffle_fwd` / `_bwd` | one stage alone (`upshuffle_gelu`) |

params: [up weights..., up biases..., rgb weight, rgb bias]; grads: every parameter's
gradient in fp32, packed flat (each stage's weight and bias, then the 3x3's).

A stage is 1x1 (C -> C*r*r) + PixelShuffle(r) + GELU (`ssiu.kernels.tail`); x4 is two x2
stages. Its kernel writes the output directly in the shuffled layout, and its backward
recomputes the pre-activation from the stage's input. The final reflect-padded 3x3 to
RGB, its bias and the skip add are `ssiu.kernels.tail_rgb`, run inside an x2 last
stage's kernels (`_rgb_in_last_stage`): its backward always, its forward in 16-bit, so
the last stage's full-resolution C-channel output is neither stored for the backward
nor its gradient written (after an x3 stage the 3x3 runs its own kernels on that map).

The forward runs the stage kernels and the 3x3 in sequence; what the backward reads is
returned as non-differentiable outputs and saved: each stage's input (f, then the
earlier stages' outputs), its weight cast to the activation dtype (written by the
forward kernel), and after an x3 stage the 3x3's input. The backward runs each stage's
dx and dW kernels in reverse (after an x3 stage the 3x3's backward kernel first); all of
them write their per-program fp32 weight-gradient partials for ONE `sum_partials`
launch, and the packed result is viewed per parameter outside the op (a custom op's
outputs may not alias).
The skip is a full-resolution map (skip) or the model's input image (image), whose
bilinear upsampling (align_corners=False) the RGB epilogue computes at each output pixel:
the upsampled map never exists. Either may be in the features' dtype or fp32 (autocast
hands an fp32 image to 16-bit features): the output then is fp32, the sum taken in fp32
as PyTorch's `bf16 + fp32` would, and the backward kernels read its fp32 gradient as it
is. The skip's gradient is dout; the image's, when it needs one, PyTorch's bilinear
adjoint of dout (outside the hot path: an input image needs none). Opaque `custom_op`s
with fakes and a registered autograd formula, as in `ssiu.ops.fused_step`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ssiu.kernels import tail as tail_kernels
from ssiu.kernels import tail_rgb as rgb_kernels
from ssiu.kernels.common import (
    SUPPORTED_CHANNELS,
    channels_supported,
    empty,
    image_offsets_fit,
    on_tensor_device,
)
from ssiu.kernels.partials import split_flat, sum_partials
from ssiu.ops.tail import TailParams, upsample_image


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


def _rgb_in_last_stage(factors) -> bool:
    """Whether the final 3x3's backward runs inside the last stage's backward kernels (an
    x2 last stage: `tail_kernels.upshuffle_bwd`'s rgb): then the last stage's output (C
    channels at full resolution) is not saved and its gradient never exists. In 16-bit
    the forward fuses them too (`tail_kernels.upshuffle_rgb_fwd`): that output never
    exists either."""
    return len(factors) > 0 and factors[-1] == 2


def _saved_maps(factors) -> int:
    """How many stage outputs the forward returns for the backward."""
    return len(factors) - _rgb_in_last_stage(factors)


def _split_params(params, k: int):
    """(up weights, up biases, rgb weight, rgb bias) from the flat [w_1..w_k, b_1..b_k,
    rgb_w, rgb_b] (the custom ops take a Tensor[])."""
    return params[:k], params[k : 2 * k], params[2 * k], params[2 * k + 1]


@torch.library.custom_op("ssiu::tail_fwd", mutates_args=())
@on_tensor_device
def _tail_fwd(f: Tensor, params: list[Tensor], skip: Tensor | None, image: Tensor | None,
              factors: list[int]) -> list[Tensor]:  # fmt: skip
    """[out, the stages' outputs the backward reads (all but an x2 last stage's:
    `_rgb_in_last_stage`), their cast weights]. At most one of skip, image."""
    weights, biases, rgb_w, rgb_b = _split_params(params, len(factors))
    fused = _rgb_in_last_stage(factors) and f.dtype != torch.float32
    maps, w_los = [], []
    for i, (w, b, r) in enumerate(zip(weights, biases, factors, strict=True)):
        if fused and i == len(factors) - 1:
            out, w_lo = tail_kernels.upshuffle_rgb_fwd(f, w, b, rgb_w, rgb_b, skip, image)
        else:
            f, w_lo = tail_kernels.upshuffle_fwd(f, w, b, r)
            maps.append(f)
        w_los.append(w_lo)
    if not fused:
        out = rgb_kernels.tail_rgb_fwd(f, rgb_w, rgb_b, skip, image)
    return [out, *maps[: _saved_maps(factors)], *w_los]


@_tail_fwd.register_fake
def _tail_fwd_fake(f, params, skip, image, factors):
    n, c, h, w = f.shape
    maps, w_los = [], []
    for r in factors:
        h, w = h * r, w * r
        maps.append(f.new_empty((n, c, h, w)))
        w_los.append(f.new_empty((c * r * r, c)))
    out = f.new_empty((n, 3, h, w), dtype=rgb_kernels.output_dtype(f, skip, image))
    return [out, *maps[: _saved_maps(factors)], *w_los]


def _gradient_sizes(c: int, factors) -> list[int]:
    """Floats of each stage's packed gradient, then the 3x3's."""
    return [tail_kernels.gradients_size(c, r) for r in factors] + [rgb_kernels.gradients_size(c)]


@torch.library.custom_op("ssiu::tail_bwd", mutates_args=())
@on_tensor_device
def _tail_bwd(dout: Tensor, saved: list[Tensor], params: list[Tensor], factors: list[int]
              ) -> list[Tensor]:  # fmt: skip
    """[df, the packed fp32 gradients of each stage (weight, bias) then of the 3x3 (weight,
    bias)]; saved: [f, the stage outputs `_tail_fwd` returns, their cast weights]."""
    k = len(factors)
    maps, w_los = saved[: _saved_maps(factors) + 1], saved[_saved_maps(factors) + 1 :]
    _, biases, rgb_w, _ = _split_params(params, k)
    f = saved[0]
    *sizes, rgb_size = _gradient_sizes(f.shape[1], factors)
    # The weight-gradient partials, reduced by one launch. Two blocks, as each persistent
    # kernel runs one wave of its own width: the stages' dW kernels chunks * r*r programs
    # (2 CTAs/SM in 16-bit on sm_90), all stages in one [chunks, sum(sizes)] block (one
    # chunk count: the largest r*r); the 3x3's either one per program of its own kernel
    # (1 CTA/SM) or, fused into an x2 last stage, one per program of that stage's dW
    # kernel. One shared row count would idle SMs or run kernels in two waves.
    fused = _rgb_in_last_stage(factors)  # False without stages
    if not fused:
        rgb_part = empty((rgb_kernels.partials_rows(f.device), rgb_size), dtype=torch.float32,
                         device=f.device)  # fmt: skip
        d = rgb_kernels.tail_rgb_bwd(dout, maps[-1], rgb_w, partials=rgb_part)[0]
        if k == 0:
            return [d, sum_partials(rgb_part)]
    else:  # the last stage's kernels take the 3x3's output gradient
        d = dout
    chunks = min(tail_kernels.partials_rows(f.device, f.dtype, r) for r in factors)
    part = empty((chunks, sum(sizes)), dtype=torch.float32, device=f.device)
    ends = [sum(sizes[: i + 1]) for i in range(k)]
    for i in reversed(range(k)):
        view = part[:, ends[i] - sizes[i] : ends[i]]
        rgb = None
        if fused and i == k - 1:
            rgb_part = empty((chunks * 4, rgb_size), dtype=torch.float32, device=f.device)
            rgb = (rgb_w, rgb_part)
        d = tail_kernels.upshuffle_bwd(d, maps[i], w_los[i], biases[i], factors[i], view,
                                       rgb)[0]  # fmt: skip
    return [d, sum_partials(part, rgb_part)]


@_tail_bwd.register_fake
def _tail_bwd_fake(dout, saved, params, factors):
    f = saved[0]
    total = sum(_gradient_sizes(f.shape[1], factors))
    return [f.new_empty(f.shape), f.new_empty((total,), dtype=torch.float32)]


def _tail_setup(ctx, inputs, output):
    f, params, skip, image, factors = inputs
    aux = output[1:]  # what the backward reads: each stage's output and cast weight
    ctx.save_for_backward(f, *aux, *params)
    ctx.mark_non_differentiable(*aux)
    ctx.set_materialize_grads(False)
    ctx.factors = factors
    ctx.skip_dtype = None if skip is None else skip.dtype
    ctx.image = None if image is None else (image.shape, image.dtype)


def _tail_backward(ctx, grads):
    dout = grads[0]  # the auxiliary outputs are not differentiable
    k = len(ctx.factors)
    # factors: None for a list of ints; [] has no leaves, so it takes [] (torch's pytree).
    dfactors = None if k else []
    if dout is None:  # the output was not used
        return None, None, None, None, dfactors
    n_saved = 1 + _saved_maps(ctx.factors) + k  # f, stage outputs, cast weights
    saved, params = ctx.saved_tensors[:n_saved], ctx.saved_tensors[n_saved:]
    df, packed = _tail_bwd(dout, list(saved), list(params), ctx.factors)
    weights, biases, rgb_w, rgb_b = _split_params(params, k)
    # Views of the one reduced vector per parameter, taken here because a custom op's
    # outputs may not alias each other.
    pieces = packed.split(_gradient_sizes(df.shape[1], ctx.factors))
    dweights, dbiases = [], []
    for g, w, b in zip(pieces[:k], weights, biases, strict=True):
        dw, db = split_flat(g, (w, b))
        dweights.append(dw)
        dbiases.append(db)
    dparams = [*dweights, *dbiases, *split_flat(pieces[k], (rgb_w, rgb_b))]
    dskip = None if ctx.skip_dtype is None else dout.to(ctx.skip_dtype)
    return df, dparams, dskip, _image_gradient(ctx, dout), dfactors


def _image_gradient(ctx, dout: Tensor) -> Tensor | None:
    """The bilinear skip's adjoint, for an image that needs a gradient (PyTorch's)."""
    if ctx.image is None or not ctx.needs_input_grad[3]:
        return None
    shape, dtype = ctx.image
    with torch.enable_grad():  # the upsampling's vector-Jacobian product, by autograd
        probe = dout.new_zeros(shape).requires_grad_()
        up = upsample_image(probe, math.prod(ctx.factors))
        return torch.autograd.grad(up, probe, dout)[0].to(dtype)


_tail_fwd.register_autograd(_tail_backward, setup_context=_tail_setup)


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


def _fusable(extra: Tensor | None, f: Tensor) -> bool:
    """Whether the kernels add this skip (or upsample this image) themselves: in f's dtype
    or fp32, with int32 offsets inside an image."""
    return (
        extra is not None and extra.dtype in (f.dtype, torch.float32) and image_offsets_fit(extra)
    )


def tail(f: Tensor, params: TailParams, *, factors: tuple[int, ...], skip: Tensor | None,
         image: Tensor | None = None) -> Tensor:  # fmt: skip
    """f: (N, C, h, w) -> (N, 3, h*s, w*s) + skip or + bilinear_upsample(image) (or
    neither): the fused stages, 3x3 and skip, one op. A skip or image the kernels do not
    take (another dtype) is upsampled and added in PyTorch."""
    if (error := unsupported(f, factors)) is not None:
        raise error
    if image is not None and not _fusable(image, f):
        skip, image = upsample_image(image, math.prod(factors)), None
    flat = [*params.up_weights, *params.up_biases, params.rgb_weight, params.rgb_bias]
    fused_skip = _fusable(skip, f)
    out = _tail_fwd(f, flat, skip if fused_skip else None, image, [int(r) for r in factors])[0]
    return out if skip is None or fused_skip else out + skip

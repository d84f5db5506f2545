"""Fused (Triton) implementations behind the ops, as `torch.library` custom ops.

Registered ops (namespace "ssiu"), each with a fake (meta) implementation:

| op | inputs -> outputs |
|---|---|
| `ssiu::layer_norm2d_fwd` | x, weight, bias, eps -> y |
| `ssiu::layer_norm2d_bwd` | dy, x, weight, eps -> dx, [dweight, dbias] packed flat, fp32 |
| `ssiu::msgm_fwd` | x, params (10, `MSGMParams` order), residual?, residual2? -> out, w_lo |
| `ssiu::msgm_bwd` | dout, x, params, w_lo, dout2?, dx_plus? -> [dx, dparams flat fp32] |

w_lo: the 1x1 weights in x's dtype (the backward's operands); the residuals' gradient is
dout; dout2 is subtracted from dout and dx_plus added to dx (the fused SS-ReM step).

Each forward op has its backward op registered as its autograd formula, so autograd and
`torch.compile(fullgraph=True)` see one opaque node per fused module, forward and
backward, with no graph break. Only the inputs are saved for backward; the kernels
recompute every intermediate from them. The ops are opaque `custom_op`s (not
`triton_op`): the same registration serves CUDA and the CPU Triton interpreter, which
Inductor cannot trace. Outputs are contiguous NCHW in x's dtype; parameter gradients come
back in each parameter's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssiu.kernels import layer_norm as ln_kernels
from ssiu.kernels import msgm as msgm_kernels
from ssiu.kernels.common import (
    KERNEL_DTYPES,
    SUPPORTED_CHANNELS,
    channels_supported,
    on_tensor_device,
)
from ssiu.kernels.partials import split_flat
from ssiu.ops.msgm import MSGMParams


def _unsupported(op: str, x: Tensor) -> Exception | None:
    """Why the kernels cannot run x beyond the public op's checks (dtype, channels), or None."""
    if x.dtype not in KERNEL_DTYPES:
        return TypeError(f"the fused {op} runs {KERNEL_DTYPES}, got {x.dtype}; use backend='torch'")
    if not channels_supported(x.shape[1], x.dtype):
        return ValueError(
            f"the fused {op} needs a power-of-two channel count in {SUPPORTED_CHANNELS} "
            f"(compile-checked), got C={x.shape[1]}; use backend='torch'"
        )
    return None


def layer_norm2d_unsupported(x: Tensor) -> Exception | None:
    return _unsupported("layer_norm2d", x)


def msgm_unsupported(x: Tensor) -> Exception | None:
    return _unsupported("msgm", x)


def _fused_op(name: str, fake):
    """torch.library.custom_op("ssiu::<name>") with `fake` as its fake implementation."""

    def wrap(fn):
        op = torch.library.custom_op(f"ssiu::{name}", mutates_args=())(on_tensor_device(fn))
        op.register_fake(fake)
        return op

    return wrap


def _like(t: Tensor) -> Tensor:
    """A fresh contiguous tensor with t's shape, dtype and device (what the kernels return)."""
    return t.new_empty(t.shape)


# ---- step LayerNorm --------------------------------------------------------------------


@_fused_op("layer_norm2d_fwd", lambda x, weight, bias, eps: _like(x))
def _layer_norm2d_fwd(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    return ln_kernels.layer_norm2d_fwd(x, weight, bias, eps)


def _layer_norm2d_bwd_fake(dy, x, weight, eps):
    return _like(x), x.new_empty((2 * weight.numel(),), dtype=torch.float32)


@_fused_op("layer_norm2d_bwd", _layer_norm2d_bwd_fake)
def _layer_norm2d_bwd(dy: Tensor, x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return ln_kernels.layer_norm2d_bwd(dy, x, weight, eps)


def _layer_norm2d_setup(ctx, inputs, output):
    x, weight, _, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _layer_norm2d_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, flat = _layer_norm2d_bwd(dy, x, weight, ctx.eps)
    dweight, dbias = split_flat(flat, (weight, weight))  # the bias is shaped like the weight
    return dx, dweight, dbias, None


_layer_norm2d_fwd.register_autograd(_layer_norm2d_backward, setup_context=_layer_norm2d_setup)


def layer_norm2d(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Fused channel LayerNorm; x: (N, C, H, W) float32/float16/bfloat16, weight, bias: (C,)."""
    if (error := layer_norm2d_unsupported(x)) is not None:
        raise error
    return _layer_norm2d_fwd(x, weight, bias, float(eps))


# ---- MSGM ------------------------------------------------------------------------------


def _msgm_fwd_fake(x, params, residual, residual2):
    return _like(x), x.new_empty((4, x.shape[1], x.shape[1]))


@_fused_op("msgm_fwd", _msgm_fwd_fake)
def _msgm_fwd(
    x: Tensor, params: list[Tensor], residual: Tensor | None, residual2: Tensor | None
) -> tuple[Tensor, Tensor]:
    return msgm_kernels.msgm_fwd(x, params, residual, residual2)


def _msgm_bwd_fake(dout, x, params, w_lo, dout2, dx_plus):
    flat = x.new_empty((msgm_kernels.gradients_size(x.shape[1]),), dtype=torch.float32)
    return [_like(x), flat]


@_fused_op("msgm_bwd", _msgm_bwd_fake)
def _msgm_bwd(
    dout: Tensor, x: Tensor, params: list[Tensor], w_lo: Tensor, dout2: Tensor | None,
    dx_plus: Tensor | None,
) -> list[Tensor]:  # fmt: skip
    return msgm_kernels.msgm_bwd(dout, x, params, w_lo, dout2, dx_plus)


def _msgm_setup(ctx, inputs, output):
    x, params, residual, residual2 = inputs
    ctx.save_for_backward(x, output[1], *params)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for w_lo
    ctx.residuals = residual is not None, residual2 is not None


def _msgm_backward(ctx, dout, _dw_lo):
    if dout is None:  # the output was not used
        return None, None, None, None
    x, w_lo, *params = ctx.saved_tensors
    dx, flat = _msgm_bwd(dout, x, params, w_lo, None, None)
    dparams = msgm_kernels.gradient_views(flat, params)
    return dx, dparams, *(dout if has else None for has in ctx.residuals)


_msgm_fwd.register_autograd(_msgm_backward, setup_context=_msgm_setup)


def msgm(x: Tensor, params: MSGMParams, residual: Tensor | None) -> Tensor:
    """Fused MSGM(x) (+ residual); x, residual: (N, C, H, W), C a power of two >= 16."""
    if (error := msgm_unsupported(x)) is not None:
        raise error
    return _msgm_fwd(x, list(params), residual, None)[0]

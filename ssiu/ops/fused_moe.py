"""Fused MoE-FS (Triton) as `torch.library` custom ops.

| op | inputs -> outputs |
|---|---|
| `ssiu::moe_fs_fwd` | experts (3), residual?, params (8, see `_flat`), topk -> out, w_lo, keep |
| `ssiu::moe_fs_bwd` | dout, experts, params, w_lo, keep, topk -> de1, de2, de3, dparams |

(dparams: fp32, flat; see `_backward`.)

The backward op is registered as the forward's autograd formula. Saved: the inputs, w_lo
(the 1x1 weights cast by the forward) and, for topk < 3, the forward's keep set (uint8
(N, C, H, W), one bit per expert; a 0-element tensor at topk = 3). The kernel recomputes
gate logits, softmax and the mix from the inputs but takes the selection from keep, so
the gradient is that of the experts the forward kept even where its recomputed p rounds
differently (another dot precision and tile shape) and a near tie would flip. The
residual's gradient is dout itself. Opaque `custom_op`s, as in `ssiu.ops.fused`: one
registration serves CUDA and the CPU Triton interpreter, and `torch.compile(fullgraph=True)`
sees one node forward and one backward. Outputs are contiguous NCHW in the experts' dtype;
parameter gradients come back in each parameter's dtype.

moe_topk semantics (DESIGN.md): p = softmax over the 3 experts, per channel and pixel;
keep every p_i >= the k-th largest (ties kept), zero the rest, no renormalisation:
m = sum over kept of p_i e_i. k = 3 is the released dense model, k = 1 switch-style
selection; gradient reaches the gates through the kept p_i and the softmax normaliser.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssiu.kernels import moe as moe_kernels
from ssiu.kernels.common import (
    SUPPORTED_CHANNELS,
    channels_supported,
    image_offsets_fit,
    on_tensor_device,
)
from ssiu.kernels.partials import split_flat
from ssiu.ops.moe import MoEParams

# Flat parameter order of the custom ops: gate weights, gate biases, fuse weight, fuse bias.


def _flat(params: MoEParams) -> list[Tensor]:
    return [*params.gate_weights, *params.gate_biases, params.fuse_weight, params.fuse_bias]


def _launch_args(params: list[Tensor]):
    gate_weights, gate_biases = params[0:3], params[3:6]
    return gate_weights, gate_biases, params[6], params[7]


@torch.library.custom_op("ssiu::moe_fs_fwd", mutates_args=())
@on_tensor_device
def _moe_fs_fwd(
    experts: list[Tensor], residual: Tensor | None, params: list[Tensor], topk: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, w_lo, keep): w_lo the 1x1 weights in the experts' dtype, keep the keep set
    (uint8 bits; 0 elements at topk = 3), both for the backward."""
    return moe_kernels.moe_fs_fwd(experts, *_launch_args(params), topk=topk, residual=residual)


@_moe_fs_fwd.register_fake
def _moe_fs_fwd_fake(experts, residual, params, topk):
    e = experts[0]
    keep_shape = e.shape if topk < moe_kernels.NUM_EXPERTS else (0,)
    return (
        e.new_empty(e.shape),
        e.new_empty((4, e.shape[1], e.shape[1])),
        e.new_empty(keep_shape, dtype=torch.uint8),
    )


@torch.library.custom_op("ssiu::moe_fs_bwd", mutates_args=())
@on_tensor_device
def _moe_fs_bwd(
    dout: Tensor,
    experts: list[Tensor],
    params: list[Tensor],
    w_lo: Tensor,
    keep: Tensor,
    topk: int,
) -> list[Tensor]:
    launch = _launch_args(params)
    return moe_kernels.moe_fs_bwd(dout, experts, *launch, topk=topk, w_lo=w_lo, keep=keep)


@_moe_fs_bwd.register_fake
def _moe_fs_bwd_fake(dout, experts, params, w_lo, keep, topk):
    total = sum(p.numel() for p in params)
    return [e.new_empty(experts[0].shape) for e in experts] + [
        dout.new_empty(total, dtype=torch.float32)
    ]


def _setup(ctx, inputs, output):
    experts, residual, params, topk = inputs
    ctx.save_for_backward(*experts, output[1], output[2], *params)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for w_lo, keep
    ctx.topk = topk
    ctx.residual_dtype = None if residual is None else residual.dtype


def _backward(ctx, dout, _dw_lo, _dkeep):
    if dout is None:  # the output was not used
        return None, None, None, None
    saved = ctx.saved_tensors
    experts, w_lo, keep, params = list(saved[:3]), saved[3], saved[4], list(saved[5:])
    de1, de2, de3, flat = _moe_fs_bwd(dout, experts, params, w_lo, keep, ctx.topk)
    # One reduced buffer for all eight parameter gradients (one reduction launch); views
    # of it per parameter, here because a custom op's outputs may not alias each other.
    pieces = split_flat(flat, [params[i] for i in moe_kernels.PACKED_ORDER])
    dparams = [pieces[moe_kernels.PACKED_ORDER.index(i)] for i in range(len(params))]
    dres = None if ctx.residual_dtype is None else dout.to(ctx.residual_dtype)
    return [de1, de2, de3], dres, dparams, None


_moe_fs_fwd.register_autograd(_backward, setup_context=_setup)


def unsupported(experts, residual) -> Exception | None:
    """Why the kernels cannot run these inputs (dtype, channels, size), or None."""
    first = experts[0]
    if first.dtype not in moe_kernels.KERNEL_DTYPES:
        return TypeError(
            f"the fused moe_fs runs {moe_kernels.KERNEL_DTYPES}, got {first.dtype}; "
            "use backend='torch'"
        )
    if any(e.dtype != first.dtype for e in experts):
        return TypeError(
            f"the fused moe_fs needs experts of one dtype, got {[e.dtype for e in experts]}"
        )
    if not channels_supported(first.shape[1], first.dtype):
        return ValueError(
            f"the fused moe_fs needs a power-of-two C in {SUPPORTED_CHANNELS} (compile-checked), "
            f"got C={first.shape[1]}; use backend='torch'"
        )
    if first.device.type != "meta" and not all(
        image_offsets_fit(t) for t in (*experts, *(() if residual is None else (residual,)))
    ):
        return ValueError("the fused moe_fs addresses one image with int32; an image is too large")
    return None


def moe_fs(
    experts: tuple[Tensor, ...], params: MoEParams, *, topk: int, residual: Tensor | None
) -> Tensor:
    """Fused fuse(m) + m (+ residual) over three experts (N, C, H, W) of one dtype.

    experts: float32/float16/bfloat16, C a power of two >= 16 (tl.dot tiles), any strides;
    topk: 1, 2 or 3 (see the module doc). Validated by `ssiu.ops.moe.moe_fs`.
    """
    if (error := unsupported(experts, residual)) is not None:
        raise error
    return _moe_fs_fwd(list(experts), residual, _flat(params), int(topk))[0]

"""The fused SS-ReM body (Triton): every unfolding step in one pair of torch.library ops.

Why a body op: y, the shallow features, is read by every step, and an expert (a step's
output that MoE-FS selects) by the next step too. Step by step, autograd sums those
gradients with separate adds: at the released 9 steps 12 launches that read two maps
and write one. Over the whole body the sums ride in the steps' MSGM dx kernels
(`fused_step.backward`): each step's d y is added into one running sum in place in
MSGM_beta's dx epilogue (d y enters it anyway), an output's gradient from outside (an
expert's) is added to the next step's input gradient in MSGM_z's LayerNorm epilogue,
and the first step's LayerNorm epilogue adds the running sum: d y leaves the op once,
as the first step's input gradient (its input is y).

`ssiu::ssrem_body_fwd` returns every step's output (a_1 .. a_n; the model picks its
experts) and each step's saved tensors; `ssiu::ssrem_body_bwd` runs the steps' backwards
in reverse. Both are `fused_step`'s forward and backward in a loop: the same kernels,
and the same results up to the order of the d y sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssiu.kernels.common import on_tensor_device
from ssiu.ops import fused_esam, fused_step
from ssiu.ops.step import ESAMGeometry, StepParams


def _per_step(params: list[Tensor], steps: int) -> list[StepParams]:
    per = len(params) // steps
    return [fused_step.unflatten(params[s * per : (s + 1) * per]) for s in range(steps)]


@torch.library.custom_op("ssiu::ssrem_body_fwd", mutates_args=())
@on_tensor_device
def body_fwd(
    y: Tensor, params: list[Tensor], steps: int, heads: int, block: int, halo: int, topk: int
) -> list[Tensor]:
    """[a_1 .. a_n, then each step's saved tensors (`fused_step.forward`'s but its output),
    step after step]; params: the steps' flat parameter lists, concatenated."""
    a, outs, saved = y, [], []
    for p in _per_step(params, steps):
        a, *keep = fused_step.forward(a, y, p, heads, block, halo, topk)
        outs.append(a)
        saved += keep
    return outs + saved


@body_fwd.register_fake
def _body_fwd_fake(y, params, steps, heads, block, halo, topk):
    per_step = [fused_step.forward_fake(y, p, heads, block, halo, topk)
                for p in _per_step(params, steps)]  # fmt: skip
    return [out for out, *_ in per_step] + [t for _, *keep in per_step for t in keep]


@torch.library.custom_op("ssiu::ssrem_body_bwd", mutates_args=())
@on_tensor_device
def body_bwd(
    grads: list[Tensor | None], saved: list[Tensor], params: list[Tensor], steps: int,
    heads: int, block: int, halo: int, topk: int,
) -> list[Tensor]:  # fmt: skip
    """[dy, then each step's packed parameter gradients]; grads: the gradients of a_1 ..
    a_n (None where unused); saved: [y, a_1 .. a_{n-1}, each step's saved tensors]."""
    inputs, kept = saved[:steps], saved[steps:]
    da = grads[-1] if grads[-1] is not None else torch.zeros_like(inputs[0])
    dy_sum, packed = None, [None] * steps
    for s, p in reversed(list(enumerate(_per_step(params, steps)))):
        step_saved = [inputs[s], *kept[s * fused_step.KEPT : (s + 1) * fused_step.KEPT]]
        da_plus = grads[s - 1].contiguous() if s > 0 and grads[s - 1] is not None else None
        da, dy_sum, packed[s] = fused_step.backward(
            da, step_saved, p, heads, block, halo, topk,
            dy_sum=dy_sum, da_plus=da_plus, da_plus_dy_sum=s == 0,
        )  # fmt: skip
    return [da, *packed]


@body_bwd.register_fake
def _body_bwd_fake(grads, saved, params, steps, heads, block, halo, topk):
    y = saved[0]
    size = fused_step.packed_size(y.shape[1], _per_step(params, steps)[0])
    flat = [y.new_empty((size,), dtype=torch.float32) for _ in range(steps)]
    return [y.new_empty(y.shape), *flat]


def _setup_context(ctx, inputs, output):
    y, params, steps, *geometry = inputs
    outs, kept = output[:steps], output[steps:]
    ctx.save_for_backward(y, *outs[:-1], *kept, *params)
    ctx.mark_non_differentiable(*kept)
    ctx.set_materialize_grads(False)
    ctx.steps, ctx.geometry = steps, geometry


def _backward(ctx, grads):
    steps = ctx.steps
    grads = list(grads[:steps])  # the saved tensors are not differentiable
    if all(g is None for g in grads):
        return (None,) * 7
    tensors = ctx.saved_tensors
    split = steps + fused_step.KEPT * steps
    saved, params = list(tensors[:split]), list(tensors[split:])
    dy, *packed = body_bwd(grads, saved, params, steps, *ctx.geometry)
    dparams = [
        g for flat, p in zip(packed, _per_step(params, steps), strict=True)
        for g in fused_step.gradient_views(flat, p)
    ]  # fmt: skip
    return dy, dparams, None, None, None, None, None


body_fwd.register_autograd(_backward, setup_context=_setup_context)


def unsupported(y: Tensor, geometry: ESAMGeometry) -> Exception | None:
    """Why the kernels cannot run the body (those of its steps), or None."""
    return fused_step.unsupported(y, geometry)


def ssrem_body(y: Tensor, params: list[StepParams], geometry: ESAMGeometry) -> list[Tensor]:
    """Every step's output, fused; arguments validated by `ssiu.ops.ssrem_body`."""
    if (error := unsupported(y, geometry)) is not None:
        raise error
    topk = fused_esam.dense_topk(geometry.topk, geometry.block, geometry.halo)
    flat = [t for p in params for t in fused_step.flatten(p)]
    steps = len(params)
    return body_fwd(y, flat, steps, geometry.heads, geometry.block, geometry.halo, topk)[:steps]

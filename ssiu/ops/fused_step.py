"""The fused SS-ReM step (Triton), forward and backward, as two torch.library custom ops.

`ssiu::ssrem_step_fwd` runs the step of `ssiu.ops.step` with the kernels of each module and
no elementwise pass of its own: the additions ride in the kernels' epilogues
(u = MSGM_z(a_n) + a_n + y with a second residual, in one launch with beta = MSGM_beta(a_n),
which reads the same a_n: `msgm_fwd_pair`; w = ESAM(u) + u - beta in the
LocalProp kernel; a' = MSGM_refine(w) + beta; out = MSGM_ffn(a') + a'). It returns,
besides the output, what the backward keeps: a_n, u, w, a' (each written once anyway),
ESAM's o, lse and q, k, v, and the four MSGMs' 1x1 weights in the activation dtype (cast
once, by their forward kernels).

`ssiu::ssrem_step_bwd` runs the adjoint with the sums folded into the MSGM backward
kernels: d a' = MSGM_ffn^T(dout) + dout (dx_plus), d beta = d a' - d w (dout2 of
MSGM_beta's backward), d a_n = MSGM_z^T(du) + MSGM_beta^T(d beta) + du (dx_plus chained
through both), and d a = LN^T(d a_n) in the epilogue of MSGM_z's dx kernel (d a_n never
stored); dy = du. The weight-gradient partials of the LayerNorm, the four MSGMs and
ESAM share one buffer (one row per SM), reduced by one deterministic launch; they leave the
op packed and are viewed per parameter outside it.

`forward` and `backward` are the step's kernels as plain functions: the step ops call them
once, `ssiu.ops.fused_body`'s ops once per step (with the sums over the steps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssiu.kernels import layer_norm as ln_kernels
from ssiu.kernels import msgm as msgm_kernels
from ssiu.kernels.common import empty, on_tensor_device
from ssiu.kernels.partials import split_flat, sum_partials
from ssiu.ops import fused_esam
from ssiu.ops.esam import ESAMParams
from ssiu.ops.fused import msgm_unsupported
from ssiu.ops.layer_norm import EPS
from ssiu.ops.msgm import MSGMParams
from ssiu.ops.step import ESAMGeometry, StepParams

_MSGM, _ESAM = len(MSGMParams._fields), len(ESAMParams._fields)
# Tensors `forward` returns besides the step's output (a_n .. wf), kept for `backward`.
KEPT = 11


def flatten(params: StepParams) -> list[Tensor]:
    p = params
    return [p.norm_weight, p.norm_bias, *p.z, *p.beta, *p.esam, *p.refine, *p.ffn]


def unflatten(flat) -> StepParams:
    """StepParams from the flat list (the custom ops take a Tensor[])."""
    flat = list(flat)
    take = lambda n: [flat.pop(0) for _ in range(n)]
    ln_w, ln_b = take(2)
    z, beta, esam = MSGMParams(*take(_MSGM)), MSGMParams(*take(_MSGM)), ESAMParams(*take(_ESAM))
    return StepParams(ln_w, ln_b, z, beta, esam, MSGMParams(*take(_MSGM)), MSGMParams(*take(_MSGM)))


def forward(a: Tensor, y: Tensor, p: StepParams, heads: int, block: int, halo: int,
            topk: int) -> list[Tensor]:  # fmt: skip
    """[out, a_n, u, w, a', o, lse, qkv, wz, wb, wr, wf] (see the module docstring)."""
    a_n = ln_kernels.layer_norm2d_fwd(a, p.norm_weight, p.norm_bias, EPS)
    u, w_z, beta, w_b = msgm_kernels.msgm_fwd_pair(a_n, p.z, p.beta, y)
    w, o, lse, qkv = fused_esam.forward(u, p.esam, heads, block, halo, topk, True, sub=beta)
    a1, w_r = msgm_kernels.msgm_fwd(w, p.refine, beta)
    out, w_f = msgm_kernels.msgm_fwd(a1, p.ffn, a1)
    return [out, a_n, u, w, a1, o, lse, qkv, w_z, w_b, w_r, w_f]


@torch.library.custom_op("ssiu::ssrem_step_fwd", mutates_args=())
@on_tensor_device
def step_fwd(
    a: Tensor, y: Tensor, params: list[Tensor], heads: int, block: int, halo: int, topk: int
) -> list[Tensor]:
    """[out, a_n, u, w, a', o, lse, qkv, wz, wb, wr, wf] (see the module docstring)."""
    return forward(a, y, unflatten(params), heads, block, halo, topk)


def forward_fake(a: Tensor, p: StepParams, heads: int, block: int, halo: int,
                 topk: int) -> list[Tensor]:  # fmt: skip
    """`forward`'s outputs, empty (the custom ops' fake implementations)."""
    maps = [a.new_empty(a.shape) for _ in range(5)]
    _, o, lse, qkv = fused_esam.esam_fwd_fake(a, *p.esam, heads, block, halo, topk, True)
    c = a.shape[1]
    return maps + [o, lse, qkv] + [a.new_empty((4, c, c)) for _ in range(4)]


@step_fwd.register_fake
def _step_fwd_fake(a, y, params, heads, block, halo, topk):
    return forward_fake(a, unflatten(params), heads, block, halo, topk)


def packed_size(c: int, params: StepParams) -> int:
    """Elements of a step's packed parameter gradients: the four MSGMs, the LayerNorm, ESAM."""
    return 4 * msgm_kernels.gradients_size(c) + 2 * c + fused_esam.packed_size(c, params.esam.rel_h)


def backward(
    dout: Tensor, saved: list[Tensor], p: StepParams, heads: int, block: int, halo: int,
    topk: int, dy_sum: Tensor | None = None, da_plus: Tensor | None = None,
    da_plus_dy_sum: bool = False,
) -> list[Tensor]:  # fmt: skip
    """[da, dy_sum, packed grads] of the step (`step_bwd`'s order); saved: [a, a_n, u, w,
    a', o, lse, qkv, wz, wb, wr, wf].

    For a body of steps (`fused_body`) the sums ride in MSGM dx epilogues: the step's
    d y (= du) is added into dy_sum in place (dy_sum None: du starts the sum and is
    returned as it), and da_plus, or with da_plus_dy_sum the updated dy_sum, is added to
    da in the LayerNorm epilogue.
    """
    a, a_n, u, w, a1, o, lse, qkv, w_z, w_b, w_r, w_f = saved
    # The weight-gradient partials of the four MSGMs (z, beta, refine, ffn), the LayerNorm
    # and ESAM side by side in one buffer, one row per program, reduced by one launch.
    c = a.shape[1]
    size = msgm_kernels.gradients_size(c)
    rows = msgm_kernels.partials_rows(a.device)
    packed = empty((rows, packed_size(c, p)), dtype=torch.float32, device=a.device)

    def msgm_bwd(i, *args, **kwargs):
        part = packed[:, i * size : (i + 1) * size]
        return msgm_kernels.msgm_bwd(*args, partials=part, **kwargs)[0]

    da1 = msgm_bwd(3, dout, a1, p.ffn, w_f, None, dout)
    dw = msgm_bwd(2, da1, w, p.refine, w_r)
    du = fused_esam.backward(dw, u, p.esam, o, lse, qkv, heads, block, halo, topk, True,
                             packed[:, 4 * size + 2 * c :])  # fmt: skip
    dbeta_plus_du = msgm_bwd(1, da1, a_n, p.beta, w_b, dw, du, plus_sum=dy_sum)
    dy_sum = du if dy_sum is None else dy_sum
    # d a_n goes on through the LayerNorm in the same kernel's epilogue: d a directly.
    plus = dy_sum if da_plus_dy_sum else da_plus
    ln = (a, p.norm_weight, EPS, packed[:, 4 * size : 4 * size + 2 * c], plus)
    da = msgm_bwd(0, du, a_n, p.z, w_z, None, dbeta_plus_du, layer_norm=ln)
    return [da, dy_sum, sum_partials(packed)]


@torch.library.custom_op("ssiu::ssrem_step_bwd", mutates_args=())
@on_tensor_device
def step_bwd(
    dout: Tensor, saved: list[Tensor], params: list[Tensor], heads: int, block: int, halo: int,
    topk: int,
) -> list[Tensor]:  # fmt: skip
    """[da, dy, the packed grads of MSGM_z, _beta, _refine, _ffn and the LayerNorm in that
    order, then ESAM's (one vector)]; saved: [a, a_n, u, w, a', o, lse, qkv, wz, wb, wr, wf]."""
    return backward(dout, saved, unflatten(params), heads, block, halo, topk)


@step_bwd.register_fake
def _step_bwd_fake(dout, saved, params, heads, block, halo, topk):
    a = saved[0]
    size = packed_size(a.shape[1], unflatten(params))
    return [a.new_empty(a.shape), a.new_empty(a.shape), a.new_empty((size,), dtype=torch.float32)]


def _setup_context(ctx, inputs, output):
    a, _, params, *geometry = inputs
    aux = output[1:]
    ctx.save_for_backward(a, *aux, *params)
    ctx.mark_non_differentiable(*aux)
    ctx.set_materialize_grads(False)
    ctx.geometry = geometry


def _backward(ctx, grads):
    dout = grads[0]  # the auxiliary outputs are not differentiable
    if dout is None:  # the output was not used
        return (None,) * 7
    a, *rest = ctx.saved_tensors
    saved, params = [a, *rest[:KEPT]], rest[KEPT:]
    da, dy, g_packed = step_bwd(dout, saved, params, *ctx.geometry)
    return da, dy, gradient_views(g_packed, unflatten(params)), None, None, None, None


def gradient_views(g_packed: Tensor, p: StepParams) -> list[Tensor]:
    """A step's packed gradients (`backward`) as views shaped like its parameters, in
    `flatten`'s order. Outside the custom ops, whose outputs may not alias each other."""
    c = p.norm_weight.shape[0]
    size = msgm_kernels.gradients_size(c)
    esam_size = fused_esam.packed_size(c, p.esam.rel_h)
    g_z, g_beta, g_refine, g_ffn, g_norm, g_esam = g_packed.split([size] * 4 + [2 * c, esam_size])
    views = lambda g, like: msgm_kernels.gradient_views(g, like)
    return [
        *split_flat(g_norm, (p.norm_weight, p.norm_bias)),
        *views(g_z, p.z), *views(g_beta, p.beta),
        *fused_esam.gradient_views(g_esam, p.esam), *views(g_refine, p.refine),
        *views(g_ffn, p.ffn),
    ]  # fmt: skip


step_fwd.register_autograd(_backward, setup_context=_setup_context)


def unsupported(a: Tensor, geometry: ESAMGeometry) -> Exception | None:
    """Why the kernels cannot run the step on a (dtype, channels, ESAM geometry), or None."""
    error = msgm_unsupported(a)
    if error is None:
        error = fused_esam.unsupported(a, geometry.heads, geometry.block, geometry.halo)
    return error


def ssrem_step(a: Tensor, y: Tensor, params: StepParams, geometry: ESAMGeometry) -> Tensor:
    """The fused step; arguments validated by `ssiu.ops.ssrem_step`."""
    if (error := unsupported(a, geometry)) is not None:
        raise error
    topk = fused_esam.dense_topk(geometry.topk, geometry.block, geometry.halo)
    heads, block, halo = geometry.heads, geometry.block, geometry.halo
    return step_fwd(a, y, flatten(params), heads, block, halo, topk)[0]

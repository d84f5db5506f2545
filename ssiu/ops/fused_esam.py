"""Fused ESAM (Triton), forward and backward, as two torch.library custom ops.

`ssiu::esam_fwd` runs the whole module in three kernels (`ssiu.kernels.esam`):

1. max-pool 2x2 + reflect pad to whole blocks + qkv 1x1  -> q, k, v (quarter resolution)
2. halo-block attention with relative position, top-k, softmax, P V -> o, lse
3. LocalProp (dw3x3 reflect + bilinear x2, align_corners=True) + crop + residual -> out

and returns (out, o, lse, qkv); o (N, C, Hp, Wp), the per-query log-sum-exp lse
(N, heads, Hp * Wp, fp32; with top-k (N, heads, 2 Hp * Wp), each query's threshold, the
k-th largest score, after the log-sum-exps) and q, k, v (N, 3C, Hp, Wp) are what the backward keeps
besides the inputs (q, k, v at quarter resolution: 1.5x o; keeping them saves the
backward a qkv launch and makes its top-k selection the forward's by construction).

`ssiu::esam_bwd` is wholly in Triton (`ssiu.kernels.esam_bwd`, `ssiu.kernels.esam`):
- LocalProp backward: the bilinear (align_corners=True) adjoint of the cropped dout, then
  the reflect-padded dw3x3 adjoint -> dO (fp32), with d prop weight / bias as fp32
  per-program partials;
- on the forward's q, k, v (so the scores, and hence the top-k selection, are the same
  bit for bit), the attention backward
  (`esam_attn_bwd_kernel`): scores recomputed, kept by the forward's thresholds,
  probabilities from lse, gradients through the kept entries only -> dq, dK / dV
  windows, d rel_h, d rel_w;
- in one kernel (`esam_qkv_bwd_kernel`), per tile of the sampled grid: the fold of the
  overlapping dK / dV windows and the reflect-pad adjoint, as a gather onto the real
  sampled pixels -> g (3C channels, fp32, in registers only); g W_qkv and the max-pool
  adjoint (the gradient goes to the first maximum of each 2x2 window in row-major order,
  as PyTorch's max_pool2d backward) + dout -> dv; g^T u -> d W_qkv (fp32 partials).
Every adjoint is a gather and every weight gradient a fixed-order sum of per-program
partials: no atomics, the gradients are bit-identical from run to run.

attn_topk (`topk` here): every key whose score is >= the k-th largest score of its query
is kept (all ties at the threshold kept), the rest get probability 0; None or
k >= window^2 is the dense softmax of the released model. The kernels find the k-th
largest score exactly on the fp32 scores' int32 keys (a sort on a GPU, a bisection under
the interpreter; see `ssiu.kernels.esam`).

Shapes the kernels do not cover (float64, or C, head_dim, block^2 not powers of two
>= 16) raise with a message pointing to backend='torch' (as the other fused ops do); the
public `ssiu.ops.esam` has already validated the arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssiu.kernels import esam as K
from ssiu.kernels import esam_bwd as KB
from ssiu.kernels.common import SUPPORTED_CHANNELS, empty, on_tensor_device
from ssiu.kernels.partials import persistent_programs, split_flat, sum_partials
from ssiu.ops.esam import ESAMParams


@torch.library.custom_op("ssiu::esam_fwd", mutates_args=())
@on_tensor_device
def esam_fwd(
    v: Tensor, qkv_weight: Tensor, rel_h: Tensor, rel_w: Tensor, prop_weight: Tensor,
    prop_bias: Tensor, heads: int, block: int, halo: int, topk: int, add_input: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(out, o, lse, qkv) of ESAM at v (N, C, H, W); topk = 0 for dense, else
    1..window^2 - 1."""
    params = ESAMParams(qkv_weight, rel_h, rel_w, prop_weight, prop_bias)
    return forward(v, params, heads, block, halo, topk, add_input)


def forward(v, params: ESAMParams, heads: int, block: int, halo: int, topk: int,
            add_input: bool, sub: Tensor | None = None):  # fmt: skip
    """The three forward kernels: (ESAM(v) (+ v) (- sub), o, lse, qkv)."""
    qkv = K.qkv_fwd(v, params.qkv_weight, block)
    o, lse = K.attn_fwd(qkv, params.rel_h, params.rel_w, heads=heads, block=block, halo=halo,
                        topk=topk)  # fmt: skip
    out = K.prop_fwd(o, params.prop_weight, params.prop_bias, v, add_input=add_input, sub=sub)
    return out, o, lse, qkv


def esam_fwd_fake(v, qkv_weight, rel_h, rel_w, prop_weight, prop_bias, heads, block, halo,
                   topk, add_input):  # fmt: skip
    n, c, h, w = v.shape
    hp = (h // 2 + block - 1) // block * block
    wp = (w // 2 + block - 1) // block * block
    return (
        v.new_empty((n, c, h, w)),
        v.new_empty((n, c, hp, wp)),
        v.new_empty(K.lse_shape(n, heads, hp, wp, topk), dtype=torch.float32),
        v.new_empty((n, 3 * c, hp, wp)),
    )


esam_fwd.register_fake(esam_fwd_fake)


@torch.library.custom_op("ssiu::esam_bwd", mutates_args=())
@on_tensor_device
def esam_bwd(
    dout: Tensor, v: Tensor, qkv_weight: Tensor, rel_h: Tensor, rel_w: Tensor,
    prop_weight: Tensor, prop_bias: Tensor, o: Tensor, lse: Tensor, qkv: Tensor,
    heads: int, block: int, halo: int, topk: int, add_input: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(dv, the parameter gradients packed flat in fp32: `gradient_views` shapes them)."""
    params = ESAMParams(qkv_weight, rel_h, rel_w, prop_weight, prop_bias)
    part = empty((partials_rows(v.device), packed_size(v.shape[1], rel_h)), dtype=torch.float32,
                 device=v.device)  # fmt: skip
    dv = backward(dout, v, params, o, lse, qkv, heads, block, halo, topk, add_input, part)
    return dv, sum_partials(part)


def backward(dout, v, params: ESAMParams, o, lse, qkv, heads: int, block: int, halo: int,
             topk: int, add_input: bool, part: Tensor) -> Tensor:  # fmt: skip
    """dv; the weight-gradient partials of the LocalProp, attention and qkv backward kernels
    go side by side to part, a [rows, packed_size] fp32 view (`PACKED_ORDER`, each in its
    parameter's layout; rows: `partials_rows`, one program per row and SM)."""
    p = params
    cols = _columns(v.shape[1], p.rel_h)
    d_o = KB.prop_bwd(dout, o, p.prop_weight, part[:, cols["prop"]])  # LocalProp adjoint
    # Attention (Triton), on the forward's q, k, v.
    dq, dkvw = K.attn_bwd(
        d_o, qkv, p.rel_h, p.rel_w, o, lse, part[:, cols["rel"]], heads=heads, block=block,
        halo=halo, topk=topk,
    )  # fmt: skip
    return KB.qkv_bwd(dq, dkvw, v, p.qkv_weight, dout if add_input else None,
                      part[:, cols["qkv"]], block=block, halo=halo)  # fmt: skip


# The packed gradient: LocalProp weight (C, 1, 3, 3) and bias, rel_h and rel_w (win, D/2),
# W_qkv (3C, C, 1, 1).
PACKED_ORDER = ("prop_weight", "prop_bias", "rel_h", "rel_w", "qkv_weight")


def partials_rows(device: torch.device) -> int:
    """Rows of the weight-gradient partials: one program per SM for the LocalProp `dt`
    and attention backward kernels (one CTA of either fits an SM), three (q, k, v) for the
    qkv one."""
    return persistent_programs(device, 1)


def packed_size(c: int, rel_h: Tensor) -> int:
    return 10 * c + 2 * rel_h.numel() + 3 * c * c


def _columns(c: int, rel_h: Tensor) -> dict[str, slice]:
    """Column blocks of the partials buffer per kernel."""
    rel = 2 * rel_h.numel()
    return {"prop": slice(0, 10 * c), "rel": slice(10 * c, 10 * c + rel),
            "qkv": slice(10 * c + rel, 10 * c + rel + 3 * c * c)}  # fmt: skip


def gradient_views(flat: Tensor, params: ESAMParams) -> list[Tensor]:
    """The packed gradient as views shaped like (qkv_weight, rel_h, rel_w, prop_weight,
    prop_bias) (cast only if a parameter is not fp32)."""
    by_name = dict(zip(ESAMParams._fields, params, strict=True))
    like = [by_name[name] for name in PACKED_ORDER]
    views = dict(zip(PACKED_ORDER, split_flat(flat, like), strict=True))
    return [views[name] for name in ESAMParams._fields]


@esam_bwd.register_fake
def _esam_bwd_fake(dout, v, qkv_weight, rel_h, rel_w, prop_weight, prop_bias, o, lse, qkv, heads,
                   block, halo, topk, add_input):  # fmt: skip
    size = packed_size(v.shape[1], rel_h)
    return v.new_empty(v.shape), v.new_empty((size,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    v, qkv_weight, rel_h, rel_w, prop_weight, prop_bias, *attrs = inputs
    _, o, lse, qkv = output
    ctx.save_for_backward(v, qkv_weight, rel_h, rel_w, prop_weight, prop_bias, o, lse, qkv)
    ctx.attrs = attrs
    ctx.mark_non_differentiable(o, lse, qkv)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for o, lse, qkv


def _backward(ctx, dout, _do, _dlse, _dqkv):
    if dout is None:  # the output was not used
        return (None,) * 11
    saved = ctx.saved_tensors
    dv, flat = esam_bwd(dout, *saved, *ctx.attrs)
    return (dv, *gradient_views(flat, ESAMParams(*saved[1:6])), None, None, None, None, None)


esam_fwd.register_autograd(_backward, setup_context=_setup_context)


def dense_topk(topk: int | None, block: int, halo: int) -> int:
    """The kernels' topk argument: 0 for dense (None or k >= window^2), else k."""
    return 0 if topk is None or topk >= (block + 2 * halo) ** 2 else topk


def unsupported(v: Tensor, heads: int, block: int, halo: int) -> Exception | None:
    """Why the kernels cannot run v with this geometry (dtype, tile sizes), or None."""
    c = v.shape[1]
    if v.dtype not in K.KERNEL_DTYPES:
        return TypeError(
            f"the fused esam runs {K.KERNEL_DTYPES}, got {v.dtype}; use backend='torch'"
        )
    if c not in SUPPORTED_CHANNELS or not K.supported(c, heads, block, halo, v.dtype):
        return ValueError(
            f"the fused esam needs C in {SUPPORTED_CHANNELS} (compile-checked), "
            f"head_dim = C/heads and block^2 powers of two >= 16 (tl.dot tiles), and a "
            f"window of at most 256 keys; got C={c}, "
            f"heads={heads}, block={block}, halo={halo}; use backend='torch'"
        )
    return None


def esam(
    v: Tensor, params: ESAMParams, *, heads: int, block: int, halo: int, topk: int | None,
    add_input: bool = True,
) -> Tensor:  # fmt: skip
    """ESAM(v) (+ v) through the fused kernels; arguments validated by `ssiu.ops.esam`."""
    if (error := unsupported(v, heads, block, halo)) is not None:
        raise error
    out, *_ = esam_fwd(v, *params, heads, block, halo, dense_topk(topk, block, halo),
                         add_input)  # fmt: skip
    return out

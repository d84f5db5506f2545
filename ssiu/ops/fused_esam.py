"""Fused ESAM (Triton), forward and backward, as two torch.library custom ops.

`ssiu::esam_fwd` runs the whole module in three kernels (`ssiu.kernels.esam`):

1. max-pool 2x2 + reflect pad to whole blocks + qkv 1x1  -> q, k, v (quarter resolution)
2. halo-block attention with relative position, top-k, softmax, P V -> o, lse
3. LocalProp (dw3x3 reflect + bilinear x2, align_corners=True) + crop + residual -> out

and returns (out, o, lse); o (N, C, Hp, Wp) and the per-query log-sum-exp lse
(N, heads, Hp * Wp, fp32) are what the backward keeps besides the inputs.

`ssiu::esam_bwd` recomputes q, k, v with kernel 1 (bit-identical to the forward's, so the
scores, and hence the top-k selection, are the same), then:
- LocalProp backward (torch: the adjoints of crop, bilinear upsampling, reflect pad and
  the depthwise conv, via aten's own backward ops) -> dO, d prop weight, d prop bias;
- the attention backward as a Triton kernel (`esam_attn_bwd_kernel`): scores and the
  top-k mask recomputed, probabilities recomputed from lse, gradients through the kept
  entries only -> dq, dK / dV windows (summed over overlapping windows with `F.fold`),
  d rel_h, d rel_w (fp32 per-program partials);
- qkv 1x1, reflect pad and max-pool backward (torch: `aten.convolution_backward`,
  `aten.reflection_pad2d_backward`, `aten.max_pool2d_with_indices_backward` with the
  indices of `aten.max_pool2d_with_indices`, so ties in a 2x2 window send the gradient
  to the first maximum in row-major order, exactly as PyTorch's max_pool2d backward).
The torch glue is cheap memory-bound work at quarter resolution (plus the full
resolution scatter of the max-pool backward); the expensive part, the 64 x 100 score
and probability matrices of every block and head, only ever lives in the kernels.

attn_topk (`topk` here): every key whose score is >= the k-th largest score of its query
is kept (all ties at the threshold kept), the rest get probability 0; None or
k >= window^2 is the dense softmax of the released model. The kernels select by an exact
bisection on the fp32 scores' integer keys (see `ssiu.kernels.esam`), no sort.

Shapes the kernels do not cover (float64, or C, head_dim, block^2 not powers of two
>= 16) raise with a message pointing to backend='torch' (as the other fused ops do); the
public `ssiu.ops.esam` has already validated the arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssiu.kernels import esam as K
from ssiu.kernels.common import SUPPORTED_CHANNELS, on_tensor_device
from ssiu.ops.esam import ESAMParams

POOL = [2, 2]


@torch.library.custom_op("ssiu::esam_fwd", mutates_args=())
@on_tensor_device
def esam_fwd(
    v: Tensor, qkv_weight: Tensor, rel_h: Tensor, rel_w: Tensor, prop_weight: Tensor,
    prop_bias: Tensor, heads: int, block: int, halo: int, topk: int, add_input: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(out, o, lse) of ESAM at v (N, C, H, W); topk = 0 for dense, else 1..window^2 - 1."""
    qkv = K.qkv_fwd(v, qkv_weight, block)
    o, lse = K.attn_fwd(qkv, rel_h, rel_w, heads=heads, block=block, halo=halo, topk=topk)
    out = K.prop_fwd(o, prop_weight, prop_bias, v, add_input=add_input)
    return out, o, lse


@esam_fwd.register_fake
def _esam_fwd_fake(v, qkv_weight, rel_h, rel_w, prop_weight, prop_bias, heads, block, halo,
                   topk, add_input):  # fmt: skip
    n, c, h, w = v.shape
    hp = (h // 2 + block - 1) // block * block
    wp = (w // 2 + block - 1) // block * block
    return (
        v.new_empty((n, c, h, w)),
        v.new_empty((n, c, hp, wp)),
        v.new_empty((n, heads, hp * wp), dtype=torch.float32),
    )


@torch.library.custom_op("ssiu::esam_bwd", mutates_args=())
@on_tensor_device
def esam_bwd(
    dout: Tensor, v: Tensor, qkv_weight: Tensor, rel_h: Tensor, rel_w: Tensor,
    prop_weight: Tensor, prop_bias: Tensor, o: Tensor, lse: Tensor,
    heads: int, block: int, halo: int, topk: int, add_input: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients of ESAM for v, qkv_weight, rel_h, rel_w, prop_weight, prop_bias."""
    aten = torch.ops.aten
    n, c, h, w = v.shape
    hh, wh, hp, wp = K.padded_grid(h, w, block)
    win = block + 2 * halo
    # LocalProp: out = crop(bilinear_ac(dw3x3_reflect(o))) (+ v).
    d_up = F.pad(dout.float(), (0, 2 * wp - w, 0, 2 * hp - h))
    d_t = aten.upsample_bilinear2d_backward(d_up, [2 * hp, 2 * wp], [n, c, hp, wp], True)
    o32 = o.float()
    d_opad, d_pw, d_pb = aten.convolution_backward(
        d_t, F.pad(o32, (1, 1, 1, 1), mode="reflect"), prop_weight.float(), [c],
        [1, 1], [0, 0], [1, 1], False, [0, 0], c, [True, True, True],
    )  # fmt: skip
    d_o = aten.reflection_pad2d_backward(d_opad, o32, [1, 1, 1, 1])
    # Attention (Triton), on q, k, v recomputed exactly as in the forward.
    qkv = K.qkv_fwd(v, qkv_weight, block)
    dq, dkw, dvw, d_relh, d_relw = K.attn_bwd(
        d_o, qkv, rel_h, rel_w, o, lse, heads=heads, block=block, halo=halo, topk=topk
    )
    fold = lambda t: F.fold(t, (hp, wp), kernel_size=win, stride=block, padding=halo)
    dqkv = torch.cat([dq, fold(dkw), fold(dvw)], dim=1)  # (N, 3C, Hp, Wp) fp32
    # qkv 1x1, reflect pad, max-pool.
    u, indices = aten.max_pool2d_with_indices(v, POOL, POOL)
    pad = [0, wp - wh, 0, hp - hh]
    u32 = u.float()
    u_pad = F.pad(u32, pad, mode="reflect") if any(pad) else u32
    d_upad, d_w, _ = aten.convolution_backward(
        dqkv, u_pad, qkv_weight.float(), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
        [True, True, False],
    )  # fmt: skip
    d_u = aten.reflection_pad2d_backward(d_upad, u32, pad) if any(pad) else d_upad
    dv = aten.max_pool2d_with_indices_backward(
        d_u.to(v.dtype), v, POOL, POOL, [0, 0], [1, 1], False, indices
    )
    if add_input:
        dv = dv.float() + dout.float()
    as_param = lambda g, p: g.reshape(p.shape).to(p.dtype).contiguous()
    return (
        dv.to(v.dtype).contiguous(), as_param(d_w, qkv_weight), as_param(d_relh, rel_h),
        as_param(d_relw, rel_w), as_param(d_pw, prop_weight), as_param(d_pb, prop_bias),
    )  # fmt: skip


@esam_bwd.register_fake
def _esam_bwd_fake(dout, v, qkv_weight, rel_h, rel_w, prop_weight, prop_bias, o, lse, heads,
                   block, halo, topk, add_input):  # fmt: skip
    return tuple(t.new_empty(t.shape) for t in (v, qkv_weight, rel_h, rel_w, prop_weight,
                                                 prop_bias))  # fmt: skip


def _setup_context(ctx, inputs, output):
    v, qkv_weight, rel_h, rel_w, prop_weight, prop_bias, *attrs = inputs
    _, o, lse = output
    ctx.save_for_backward(v, qkv_weight, rel_h, rel_w, prop_weight, prop_bias, o, lse)
    ctx.attrs = attrs
    ctx.mark_non_differentiable(o, lse)


def _backward(ctx, dout, _do, _dlse):
    grads = esam_bwd(dout, *ctx.saved_tensors, *ctx.attrs)
    return (*grads, None, None, None, None, None)


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
    out, _, _ = esam_fwd(v, *params, heads, block, halo, dense_topk(topk, block, halo),
                         add_input)  # fmt: skip
    return out

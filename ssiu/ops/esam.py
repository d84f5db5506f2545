"""ESAM, the efficient sparse attention module: halo-block attention at half resolution.

v -> max_pool 2x2 -> qkv 1x1 -> per 8x8 query block, attention over its 10x10 halo
window (zero padded, relative position on keys, optional top-k) -> LocalProp
(dw3x3 reflect + bilinear x2, align_corners=True) -> crop to v's size (+ v).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from ssiu.config import SAMPLING_RATIO
from ssiu.ops.backend import fused, resolve
from ssiu.ops.checks import check_feature_map, check_param
from ssiu.ops.msgm import depthwise3x3_reflect


class ESAMParams(NamedTuple):
    qkv_weight: torch.Tensor  # (3C, C, 1, 1), no bias; q, k, v thirds in that order
    rel_h: torch.Tensor  # (window, head_dim // 2): added to the first half of each key
    rel_w: torch.Tensor  # (window, head_dim // 2): added to the second half
    prop_weight: torch.Tensor  # LocalProp dw3x3 (C, 1, 3, 3), reflect padding
    prop_bias: torch.Tensor  # (C,)


def relative_position(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """(window, window, head_dim): concat(rel_h[r], rel_w[c]) for key row r, column c."""
    win = rel_h.shape[0]
    return torch.cat(
        [rel_h[:, None, :].expand(win, win, -1), rel_w[None, :, :].expand(win, win, -1)], dim=-1
    )


def topk_threshold_mask(scores: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """True where a score is >= the k-th largest along `dim` (ties at the threshold kept)."""
    kth = scores.topk(k, dim=dim).values.narrow(dim, k - 1, 1)
    return scores >= kth


def halo_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    *,
    heads: int,
    block: int,
    halo: int,
    topk: int | None,
) -> torch.Tensor:
    """Block attention; q, k, v: (N, C, Hb, Wb) with Hb, Wb multiples of `block`."""
    n, c, hb, wb = q.shape
    d = c // heads
    win = block + 2 * halo
    q_blocks = rearrange(
        q, "n (h d) (bh r) (bw s) -> n h (bh bw) (r s) d", h=heads, r=block, s=block
    )
    # Key windows: every block plus `halo` pixels around it, zeros outside the image.
    k_win = F.unfold(k, kernel_size=win, stride=block, padding=halo)
    v_win = F.unfold(v, kernel_size=win, stride=block, padding=halo)
    k_win = rearrange(k_win, "n (h d r s) b -> n h b r s d", h=heads, r=win, s=win)
    v_win = rearrange(v_win, "n (h d r s) b -> n h b (r s) d", h=heads, r=win, s=win)
    k_win = (k_win + relative_position(rel_h, rel_w)).flatten(3, 4)
    scores = (q_blocks * d**-0.5) @ k_win.transpose(-1, -2)  # (n, h, blocks, block^2, win^2)
    if topk is not None and topk < win * win:
        scores = scores.masked_fill(~topk_threshold_mask(scores, topk), float("-inf"))
    out = scores.softmax(-1) @ v_win
    return rearrange(
        out, "n h (bh bw) (r s) d -> n (h d) (bh r) (bw s)", bh=hb // block, r=block, s=block
    )


def esam_reference(
    v: torch.Tensor,
    params: ESAMParams,
    *,
    heads: int,
    block: int,
    halo: int,
    topk: int | None,
    add_input: bool = True,
) -> torch.Tensor:
    """ESAM(v) (+ v). v: (N, C, H, W) with H, W even."""
    p = params
    height, width = v.shape[-2:]
    u = F.max_pool2d(v, SAMPLING_RATIO, SAMPLING_RATIO)
    # Like the released code: reflect-pad the sampled grid to whole blocks, crop at the end.
    pad_h, pad_w = (-u.shape[-2]) % block, (-u.shape[-1]) % block
    if pad_h or pad_w:
        u = F.pad(u, (0, pad_w, 0, pad_h), mode="reflect")
    q, k, val = F.conv2d(u, p.qkv_weight).chunk(3, dim=1)
    out = halo_attention_reference(
        q, k, val, p.rel_h, p.rel_w, heads=heads, block=block, halo=halo, topk=topk
    )
    out = depthwise3x3_reflect(out, p.prop_weight, p.prop_bias)
    out = F.interpolate(out, scale_factor=SAMPLING_RATIO, mode="bilinear", align_corners=True)
    out = out[:, :, :height, :width]
    return out + v if add_input else out


def check_esam_args(v: torch.Tensor, params: ESAMParams, heads: int, block: int, halo: int,
                    topk: int | None) -> None:  # fmt: skip
    check_feature_map("v", v, min_size=2)
    c = v.shape[1]
    if v.shape[-2] % SAMPLING_RATIO or v.shape[-1] % SAMPLING_RATIO:
        raise ValueError(f"ESAM input must have even height and width, got {tuple(v.shape)}")
    if heads < 1 or c % heads or (c // heads) % 2:
        raise ValueError(f"heads={heads} must split {c} channels into heads of even size")
    if block < 1 or halo < 0:
        raise ValueError(f"block={block} must be >= 1 and halo={halo} >= 0")
    small = min(v.shape[-2:]) // SAMPLING_RATIO
    if small < block and block - small >= small:
        raise ValueError(
            f"ESAM input {v.shape[-2]}x{v.shape[-1]} is too small: its half-resolution grid "
            f"cannot be reflect-padded to a {block}x{block} block"
        )
    win, d = block + 2 * halo, c // heads
    check_param("qkv_weight", params.qkv_weight, v, (3 * c, c, 1, 1))
    check_param("rel_h", params.rel_h, v, (win, d // 2))
    check_param("rel_w", params.rel_w, v, (win, d // 2))
    check_param("prop_weight", params.prop_weight, v, (c, 1, 3, 3))
    check_param("prop_bias", params.prop_bias, v, (c,))
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"attn_topk must be None or an int >= 1, got {topk!r}")


def _fused():
    return fused("esam")  # imports triton: only when the fused path is asked for


def esam(
    v: torch.Tensor,
    params: ESAMParams,
    *,
    heads: int = 4,
    block: int = 8,
    halo: int = 1,
    topk: int | None = None,
    add_input: bool = True,
    backend: str = "torch",
) -> torch.Tensor:
    """ESAM(v) + v (or ESAM(v) alone with add_input=False). v: (N, C, H, W), H, W even.

    topk: keep keys scoring >= the k-th largest score of their query (ties kept);
    None or >= window**2 is the released dense softmax.
    """
    check_esam_args(v, params, heads, block, halo, topk)
    kwargs = dict(heads=heads, block=block, halo=halo, topk=topk, add_input=add_input)
    if resolve(backend, v, lambda: _fused().unsupported(v, heads, block, halo)) == "triton":
        return _fused().esam(v, params, **kwargs)
    return esam_reference(v, params, **kwargs)

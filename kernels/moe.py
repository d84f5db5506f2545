"""Fused MoE-FS (mixture-of-experts feature selector), forward and backward, as Triton kernels.

    l_i = 1x1_i(e_i)                     # gate logits of the three experts, i = 1, 2, 3
    p   = softmax_i(l)                   # per channel and pixel, over the experts
    q_i = p_i * [p_i >= k-th largest p]  # top-k by threshold (ties kept), no renormalisation
    m   = q_1 e_1 + q_2 e_2 + q_3 e_3
    out = 1x1_fuse(m) + m (+ residual)

Strategy
--------
Forward (`moe_fs_fwd_kernel`): one program per tile of BLOCK_P pixels (flattened H*W of
one image), all C channels: [BLOCK_P, C] tiles of the three experts. Each 1x1 is a
`tl.dot` with a [C, C] weight; the softmax over 3 experts and the top-k threshold are a
few elementwise compares (k-th largest of three: the max for k = 1, the median for
k = 2), so no sort. It writes `out` and, for k < 3, the keep set: one uint8 per channel
and pixel (bit i - 1: expert i kept), stored at out's offsets (NCHW, lanes along the
pixels: 4-16 B per lane).

Backward (`moe_fs_bwd_kernel`, one persistent kernel): recomputes l, p and m from the
experts, but takes the selection from the forward's keep set (saved with the inputs,
N*C*H*W bytes; nothing at k = 3). Recomputing it would not do: on a GPU the backward's
dots run in another precision (TF32, forward 3xTF32) and tile shape than the forward's,
so a near tie in p_i >= kth flips and the gradient is for experts the forward did not
mix (seen on an H200: de1 65x over its fp32 bound at k = 1). Then with dm = dout W_f + dout

    d e_i (direct) = q_i dm
    g_i            = [kept_i] dm e_i                   # d loss / d p_i
    d l_i          = p_i (g_i - sum_j p_j g_j)         # softmax backward over all three
                   = p_i dm ([kept_i] e_i - m)         # since sum_j p_j g_j = dm m
    d e_i         += d l_i W_i

so with moe_topk = 1 the gate still gets gradient through the kept p_i (and, through
the softmax normaliser, every logit does). The programs come in fours per chunk of
tiles: program j = 0, 1, 2 writes d e_(j+1) and sums the gradient of gate j + 1,
program 3 sums the fuse 1x1's; so each holds one [C, C] fp32 accumulator (four would
spill), at the price of recomputing the forward four times (the four read the same
tiles together, from cache). Weight and bias gradients are fp32 per-program partial
sums reduced by the launcher; no atomics. The residual's gradient is dout itself.

Floors (C = 64, per pixel, bf16): forward reads the three experts and the residual and
writes out: 640 B, 4 * 64 * 64 = 16,384 MACs; backward reads the experts and dout and
writes the three expert gradients: 896 B, about 3x the forward's MACs (the four programs
of a chunk each recompute the gates; their repeated reads of the same tiles hit L2).
At k < 3 the keep set adds 64 B to each (written once, read once: +10% and +7%).

Access pattern: lanes run along the pixels of a [BLOCK_P, C] tile; the in-image offset
h * se_h + w * se_w of a flattened pixel index is provably contiguous in runs of BLOCK_P
when W is a multiple of 16 (the JIT marks it, and se_w = 1 becomes a constant), which
holds at the canonical workloads (64x64, 180x320). SASS at the training specialisation
(sass tool; registers sm_90 / sm_80 under triton 3.9 [3.6]; the backward capped at 232,
see `moe_fs_config`):
- fwd bf16 + residual: TOPK = 3 154 / 152 [154 / 192], TOPK = 1, 2 154 / 128 [158 / 168];
  LDG 16B x72, 8B x8, STG 16B x18 (w_lo's and out's), +1 STG 16B at TOPK < 3 (the keep
  set). fp32: TOPK = 3 140 / 171 [174 / 128], TOPK = 1 173 / 174 [173 / 172]; LDG 16B
  x36, 8B x4, STG 16B x17, +1 STG 4B at TOPK < 3 (the keep set, 4 pixels per lane).
- bwd bf16: TOPK = 3 168 / 232 [178 / 230], TOPK = 1, 2 198 / 232 [196 / 232]; LDG 16B
  x10, 8B x8, STG 16B x4, 8B x1, 4B x1, +1 LDG 4B at TOPK < 3 (the keep set). fp32
  TOPK = 1, 2: 230 / 232 [232 / 232]. No spills, no access of 2 B or less per lane.
  Expert j's p carries its keep bit as its sign (`_signed_by_keep`) so the keep tile
  dies early: with it kept live the fp32 backward spilled 44 B on sm_90 (28 B before
  the keep set, when it recompared p with kth).
Odd widths fall back to narrower accesses (still correct). Weight gradients: the
per-program fp32 partials of all eight parameters are packed in one buffer and summed
by one `partials.sum_partials` launch; one wave of programs.

Precision: activations and weights enter `tl.dot` in the input dtype (fp16, bf16; fp32
through TF32 on a GPU, see `moe_fs_config`), accumulate in fp32; softmax and every
elementwise step are fp32. Offsets: image bases n * stride are int64 (the program's
tile index is cast before dividing and multiplying); offsets inside one image are int32
(`image_offsets_fit` is checked by the caller).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ssiu.kernels.common import (
    KERNEL_DTYPES,
    DtypeConfig,
    cdiv,
    dtype_signature,
    empty,
)
from ssiu.kernels.partials import persistent_programs, sum_partials
from ssiu.kernels.registry import KernelConfig, KernelSpec, register

NUM_EXPERTS = 3
# Where the backward's packed gradient vector holds each parameter of the ops' flat
# order (W1, W2, W3, b1, b2, b3, W_fuse, b_fuse): pieces (W1, b1, W2, b2, W3, b3, W_f, b_f).
PACKED_ORDER = (0, 3, 1, 4, 2, 5, 6, 7)


@triton.jit
def _pixel_tile(tile, tiles_per_image, HW, W, BLOCK_P: tl.constexpr):
    """Image index (int64), pixel offsets, mask, row and column (int32) of one pixel tile.

    Offsets inside one image stay int32 (the launchers check that an image has fewer
    than 2**31 elements); image offsets n * stride are int64.
    """
    n = tl.cast(tile, tl.int64) // tiles_per_image
    offs_p = (tile % tiles_per_image) * BLOCK_P + tl.arange(0, BLOCK_P)
    return n, offs_p, offs_p < HW, offs_p // W, offs_p % W


@triton.jit
def _gate_logits(e_ptr, offs_in, mask, w_ptr, b_ptr, offs_c, C: tl.constexpr,
                 PRECISION: tl.constexpr):  # fmt: skip
    """1x1 of one expert: e [BLOCK_P, C] @ W^T + b in fp32; W is (C_out, C_in)."""
    b_e = tl.load(e_ptr + offs_in, mask=mask, other=0.0)  # [BLOCK_P, C]
    w_t = tl.load(w_ptr + offs_c[None, :] * C + offs_c[:, None]).to(b_e.dtype)  # [C_in, C_out]
    return tl.dot(b_e, w_t, input_precision=PRECISION) + tl.load(b_ptr + offs_c)[None, :]


@triton.jit
def _kth_largest(p1, p2, p3, TOPK: tl.constexpr):
    """The k-th largest of three (k = 1: the max, k = 2: the median, k = 3: the min)."""
    if TOPK == 1:
        return tl.maximum(tl.maximum(p1, p2), p3)
    elif TOPK == 2:
        return tl.maximum(tl.minimum(p1, p2), tl.minimum(tl.maximum(p1, p2), p3))
    else:
        return tl.minimum(tl.minimum(p1, p2), p3)


@triton.jit
def _softmax_gates(e1_ptr, e2_ptr, e3_ptr, offs_in, mask, w1_ptr, b1_ptr, w2_ptr, b2_ptr,
                   w3_ptr, b3_ptr, offs_c, C: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """(p1, p2, p3): the softmax over the three gate logits, fp32 [BLOCK_P, C] each."""
    l1 = _gate_logits(e1_ptr, offs_in, mask, w1_ptr, b1_ptr, offs_c, C, PRECISION)
    l2 = _gate_logits(e2_ptr, offs_in, mask, w2_ptr, b2_ptr, offs_c, C, PRECISION)
    l3 = _gate_logits(e3_ptr, offs_in, mask, w3_ptr, b3_ptr, offs_c, C, PRECISION)
    mx = tl.maximum(tl.maximum(l1, l2), l3)
    x1 = tl.exp(l1 - mx)
    x2 = tl.exp(l2 - mx)
    x3 = tl.exp(l3 - mx)
    inv = 1.0 / (x1 + x2 + x3)
    return x1 * inv, x2 * inv, x3 * inv


@triton.jit
def _selection(p1, p2, p3, TOPK: tl.constexpr):
    """The keep set as uint8 [BLOCK_P, C]: bit i - 1 set where expert i is kept, i.e.
    p_i >= the k-th largest (ties kept). The forward decides it once and saves it."""
    kth = _kth_largest(p1, p2, p3, TOPK)
    bits = tl.where(p1 >= kth, 1, 0) | tl.where(p2 >= kth, 2, 0) | tl.where(p3 >= kth, 4, 0)
    return bits.to(tl.uint8)


@triton.jit
def _kept(x, keep, bit, TOPK: tl.constexpr):
    """x where the keep set has `bit`, else 0; TOPK = 3 keeps every expert (no mask)."""
    if TOPK == 3:
        return x
    else:
        return tl.where((keep & bit) != 0, x, 0.0)


@triton.jit
def _mixed(e1_ptr, e2_ptr, e3_ptr, offs_in, mask, p1, p2, p3, keep, TOPK: tl.constexpr):
    """m = sum_i q_i e_i, q_i = p_i where expert i is in the keep set, fp32 [BLOCK_P, C].

    The experts are loaded again (the gates loaded them first; this load hits the cache)
    so that three expert tiles and three logit tiles are never live at once.
    """
    b_m = _kept(p1, keep, 1, TOPK) * tl.load(e1_ptr + offs_in, mask=mask, other=0.0)
    b_m += _kept(p2, keep, 2, TOPK) * tl.load(e2_ptr + offs_in, mask=mask, other=0.0)
    b_m += _kept(p3, keep, 4, TOPK) * tl.load(e3_ptr + offs_in, mask=mask, other=0.0)
    return b_m


@triton.jit
def moe_fs_fwd_kernel(
    e1_ptr, e2_ptr, e3_ptr, res_ptr, out_ptr, w_lo_ptr, keep_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, wf_ptr, bf_ptr,
    H, W, tiles_per_image,
    se_n, se_c, se_h, se_w,
    C: tl.constexpr, BLOCK_P: tl.constexpr, TOPK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """out (N, C, H, W contiguous) = MoE-FS(e1, e2, e3) (+ residual).

    The experts and the residual share the strides se_*. Program 0 also writes the four
    1x1 weights (W1, W2, W3, W_fuse; fp32 here) cast to the experts' dtype to w_lo
    ([4, C, C]): the backward's operands, cast once per step without a cast launch.
    With TOPK < 3 the keep set (uint8 bits, see `_selection`) goes to keep (N, C, H, W
    contiguous, at out's offsets): the backward reads it rather than comparing its own
    recomputed p, whose rounding may differ (other dot precision and tile shape), so near
    ties cannot flip between the passes. TOPK = 3 keeps all: keep_ptr is not touched.
    """
    HW = H * W
    n, offs_p, mask_p, h, w = _pixel_tile(tl.program_id(0), tiles_per_image, HW, W, BLOCK_P)
    offs_c = tl.arange(0, C)
    dtype = e1_ptr.dtype.element_ty
    offs_in = (h * se_h + w * se_w)[:, None] + offs_c[None, :] * se_c  # [BLOCK_P, C] int32
    mask = mask_p[:, None]
    img = n * se_n  # int64
    p1, p2, p3 = _softmax_gates(e1_ptr + img, e2_ptr + img, e3_ptr + img, offs_in, mask,
                                w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, offs_c, C,
                                PRECISION)  # fmt: skip
    keep = _selection(p1, p2, p3, TOPK)  # [BLOCK_P, C] uint8; unused (removed) at TOPK = 3
    b_m = _mixed(e1_ptr + img, e2_ptr + img, e3_ptr + img, offs_in, mask, p1, p2, p3, keep, TOPK)
    wf_t = tl.load(wf_ptr + offs_c[None, :] * C + offs_c[:, None]).to(dtype)  # [C_in, C_out]
    b_out = tl.dot(b_m.to(dtype), wf_t, input_precision=PRECISION) + b_m  # [BLOCK_P, C]
    b_out += tl.load(bf_ptr + offs_c)[None, :]
    if HAS_RESIDUAL:
        b_out += tl.load(res_ptr + img + offs_in, mask=mask, other=0.0).to(tl.float32)
    offs_out = offs_c[None, :] * HW + offs_p[:, None]
    tl.store(out_ptr + n * C * HW + offs_out, b_out.to(dtype), mask=mask)
    if TOPK < 3:
        tl.store(keep_ptr + n * C * HW + offs_out, keep, mask=mask)
    if tl.program_id(0) == 0:
        offs_cc = offs_c[:, None] * C + offs_c[None, :]
        tl.store(w_lo_ptr + offs_cc, tl.load(w1_ptr + offs_cc).to(dtype))
        tl.store(w_lo_ptr + C * C + offs_cc, tl.load(w2_ptr + offs_cc).to(dtype))
        tl.store(w_lo_ptr + 2 * C * C + offs_cc, tl.load(w3_ptr + offs_cc).to(dtype))
        tl.store(w_lo_ptr + 3 * C * C + offs_cc, tl.load(wf_ptr + offs_cc).to(dtype))


@triton.jit
def _signed_by_keep(p, keep, bit, TOPK: tl.constexpr):
    """p where the keep set has `bit`, -p where not (TOPK = 3: p): one tile for the weight
    and its bit, so the keep tile dies early (the fp32 backward is at its register cap).
    p = 0 needs no bit: every term below that reads the bit is multiplied by p."""
    if TOPK == 3:
        return p
    else:
        return tl.where((keep & bit) != 0, p, -p)


@triton.jit
def _kept_by_sign(x, p_signed, TOPK: tl.constexpr):
    """x where `_signed_by_keep` marked the expert kept (p > 0), else 0."""
    if TOPK == 3:
        return x
    else:
        return tl.where(p_signed > 0, x, 0.0)


@triton.jit
def _unsigned(p_signed, TOPK: tl.constexpr):
    if TOPK == 3:
        return p_signed
    else:
        return tl.abs(p_signed)


@triton.jit
def _load_keep(ptrs, mask, BLOCK_P: tl.constexpr, C: tl.constexpr, TOPK: tl.constexpr):
    """The forward's keep set [BLOCK_P, C] uint8 (TOPK < 3), or all three experts."""
    if TOPK == 3:
        return tl.full([BLOCK_P, C], 7, tl.uint8)
    else:
        return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def moe_fs_bwd_kernel(
    e1_ptr, e2_ptr, e3_ptr, dout_ptr, keep_ptr, de1_ptr, de2_ptr, de3_ptr,
    w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, wf_ptr,
    part_ptr,
    H, W, tiles_per_image, num_tiles, num_chunks,
    se_n, se_c, se_h, se_w, sd_n, sd_c, sd_h, sd_w,
    C: tl.constexpr, BLOCK_P: tl.constexpr, TOPK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program (chunk, j), pid = 4 * chunk + j, loops over tiles chunk, chunk + num_chunks, ...

    j = 0, 1, 2 (expert j + 1): writes d e_j (contiguous NCHW, the experts' dtype) and
    accumulates dW_j, db_j of gate j; j = 3: accumulates dW, db of the fuse 1x1. The four
    programs of a chunk read the same tiles at about the same time (cache hits). Partial
    sums are fp32, packed per chunk in part[chunk] (see the end).

    With g_i = d loss / d p_i = [kept_i] dm e_i, the softmax backward
    d l_j = p_j (g_j - sum_i p_i g_i) simplifies, since sum_i p_i g_i = dm * m, to
    d l_j = p_j dm ([kept_j] e_j - m): only expert j's tiles and m stay live.
    kept_j is the forward's keep set (keep, TOPK < 3), never recomputed from p here.
    """
    pid = tl.program_id(0)
    chunk = pid // 4
    j = pid % 4
    HW = H * W
    offs_c = tl.arange(0, C)
    dtype = e1_ptr.dtype.element_ty
    bit = 1 << j  # expert j + 1's bit in the keep set
    if j == 0:
        e_ptr, w_ptr, de_ptr = e1_ptr, w1_ptr, de1_ptr
    elif j == 1:
        e_ptr, w_ptr, de_ptr = e2_ptr, w2_ptr, de2_ptr
    else:  # j == 2; for j == 3 unused
        e_ptr, w_ptr, de_ptr = e3_ptr, w3_ptr, de3_ptr
    acc_w = tl.zeros([C, C], dtype=tl.float32)
    acc_b = tl.zeros([C], dtype=tl.float32)
    for tile in range(chunk, num_tiles, num_chunks):
        n, offs_p, mask_p, h, w = _pixel_tile(tile, tiles_per_image, HW, W, BLOCK_P)
        mask = mask_p[:, None]
        offs_in = (h * se_h + w * se_w)[:, None] + offs_c[None, :] * se_c  # int32
        img = n * se_n  # int64
        p1, p2, p3 = _softmax_gates(e1_ptr + img, e2_ptr + img, e3_ptr + img, offs_in, mask,
                                    w1_ptr, b1_ptr, w2_ptr, b2_ptr, w3_ptr, b3_ptr, offs_c,
                                    C, PRECISION)  # fmt: skip
        offs_out = offs_c[None, :] * HW + offs_p[:, None]  # contiguous NCHW, as de and keep
        keep = _load_keep(keep_ptr + n * C * HW + offs_out, mask, BLOCK_P, C, TOPK)
        b_m = _mixed(e1_ptr + img, e2_ptr + img, e3_ptr + img, offs_in, mask, p1, p2, p3,
                     keep, TOPK)  # fmt: skip
        # Masked pixels have dout = 0, so they add nothing to the sums below.
        offs_do = (h * sd_h + w * sd_w)[:, None] + offs_c[None, :] * sd_c
        b_do = tl.load(dout_ptr + n * sd_n + offs_do, mask=mask, other=0.0)  # [BLOCK_P, C]
        if j == 3:  # the fuse 1x1 of out = fuse(m) + m
            acc_w += tl.dot(tl.trans(b_do), b_m.to(dtype), input_precision=PRECISION)
            acc_b += tl.sum(b_do.to(tl.float32), axis=0)
        else:
            if j == 0:
                p = p1
            elif j == 1:
                p = p2
            else:
                p = p3
            p = _signed_by_keep(p, keep, bit, TOPK)  # keep is dead from here
            wf = tl.load(wf_ptr + offs_c[:, None] * C + offs_c[None, :]).to(dtype)  # [C_out, C_in]
            b_dm = tl.dot(b_do, wf, input_precision=PRECISION) + b_do.to(tl.float32)
            b_e = tl.load(e_ptr + img + offs_in, mask=mask, other=0.0)  # [BLOCK_P, C]
            b_ek = _kept_by_sign(b_e.to(tl.float32), p, TOPK)
            b_dl = _unsigned(p, TOPK) * b_dm * (b_ek - b_m)  # d logits
            b_dl_lo = b_dl.to(dtype)
            wj = tl.load(w_ptr + offs_c[:, None] * C + offs_c[None, :]).to(dtype)  # [C_out, C_in]
            b_de = _kept_by_sign(p, p, TOPK) * b_dm
            b_de += tl.dot(b_dl_lo, wj, input_precision=PRECISION)
            tl.store(de_ptr + n * C * HW + offs_out, b_de.to(dtype), mask=mask)
            acc_w += tl.dot(tl.trans(b_dl_lo), b_e, input_precision=PRECISION)
            acc_b += tl.sum(b_dl, axis=0)
    # part[chunk] = [dW_j, db_j for j = 0..3] (4 (C*C + C) floats, program pid's at
    # pid * (C*C + C)), so one row sum of the buffer gives all eight gradients.
    part = part_ptr + pid.to(tl.int64) * (C * C + C)
    tl.store(part + offs_c[:, None] * C + offs_c[None, :], acc_w)
    tl.store(part + C * C + offs_c, acc_b)


# ---------------------------------------------------------------------------------------
# Configs and launchers


def moe_fs_config(channels: int, dtype: torch.dtype, kernel: str) -> KernelConfig:
    """The config a launcher runs `kernel` ("fwd" or "bwd") with, for `dtype` activations.

    Register pressure decides (measured with `ssiu check-kernels`, sm_90 and sm_80, C = 64):
    the loop-invariant [C, C] weights are hoisted into registers (four in the forward,
    five plus a [C, C] fp32 accumulator in the backward), so tiles are small.
    - forward: fp16/bf16 32-pixel tiles with 4 warps; fp32 16 pixels with 8 warps.
    - backward: 16-pixel tiles with 8 warps (32 spills on sm_90).
    - fp32 dots run in TF32 ("ieee" fp32 dots use FMA units and spill at any tile size):
      "tf32x3" (about fp32 accuracy) in the forward, "tf32" in the backward, where
      tf32x3 spills on sm_80. The interpreter computes every dot exactly.
    """
    wide = dtype == torch.float32
    block_p = 32 if kernel == "fwd" and not wide else 16
    warps = 4 if kernel == "fwd" and not wide else 8
    precision = ("tf32x3" if kernel == "fwd" else "tf32") if wide else "ieee"
    block_p = max(16, min(block_p, block_p * 64 // channels))
    constexprs = {"C": channels, "BLOCK_P": block_p, "PRECISION": precision}
    # The backward's six [C, C] tiles take 245 registers on sm_80 (triton 3.9); capped at
    # the 232 of check-kernels' headroom, ptxas fits it without spills on sm_80 and sm_90.
    maxnreg = 232 if kernel == "bwd" else None
    return KernelConfig(constexprs, num_warps=warps, num_stages=1, maxnreg=maxnreg)


def _shared_layout(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors themselves when they share strides (one stride set is passed to the
    kernel), else contiguous copies."""
    if all(t.stride() == tensors[0].stride() for t in tensors):
        return tensors
    return tuple(t.contiguous() for t in tensors)


def _weights(gate_weights, gate_biases, fuse_weight, fuse_bias):
    """Kernel layout: 1x1 weights (C_out, C_in) and biases in fp32 (views of fp32
    parameters). The forward casts the weights in registers and writes the cast copy the
    backward reads (its tile loop would keep hoisted fp32 tiles live: it spills on sm_80)."""
    mat = lambda t: t.reshape(t.shape[0], t.shape[1]).to(torch.float32).contiguous()
    vec = lambda t: t.reshape(-1).to(torch.float32).contiguous()
    out = []
    for w, b in zip(gate_weights, gate_biases, strict=True):
        out += [mat(w), vec(b)]
    return out + [mat(fuse_weight), vec(fuse_bias)]


def moe_fs_fwd(experts, gate_weights, gate_biases, fuse_weight, fuse_bias, *, topk: int,
               residual: torch.Tensor | None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """MoE-FS forward. experts: three (N, C, H, W) maps of one dtype, any strides;
    residual: (N, C, H, W) or None. Returns (out, w_lo, keep): out a contiguous
    (N, C, H, W) map; w_lo the 1x1 weights in the experts' dtype ([4, C, C]); keep the
    keep set, uint8 (N, C, H, W) contiguous, bit i - 1 set where expert i is kept, for
    topk < 3, else a 0-element uint8 tensor (every expert kept). Both go to `moe_fs_bwd`."""
    e1 = experts[0]
    n, c, h, w = e1.shape
    dtype = e1.dtype
    tensors = _shared_layout(*experts, *(() if residual is None else (residual.to(dtype),)))
    res = tensors[3] if residual is not None else tensors[0]
    cfg = moe_fs_config(c, dtype, "fwd")
    block_p = cfg.constexprs["BLOCK_P"]
    tiles_per_image = cdiv(h * w, block_p)
    out = empty((n, c, h, w), dtype=dtype, device=e1.device)
    w_lo = empty((4, c, c), dtype=dtype, device=e1.device)
    keep = empty((n, c, h, w) if topk < NUM_EXPERTS else (0,), dtype=torch.uint8,
                 device=e1.device)  # fmt: skip
    moe_fs_fwd_kernel[(n * tiles_per_image,)](
        *tensors[:3], res, out, w_lo, keep,
        *_weights(gate_weights, gate_biases, fuse_weight, fuse_bias),
        h, w, tiles_per_image, *tensors[0].stride(),
        TOPK=topk, HAS_RESIDUAL=residual is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )  # fmt: skip
    return out, w_lo, keep


def _bwd_ctas_per_sm(dtype: torch.dtype) -> int:
    """Resident CTAs per SM of moe_fs_bwd (8 warps): 2 at <= 128 registers (16-bit on
    sm_90), 1 for fp32 (171 registers); see `moe_fs_config`."""
    return 1 if dtype == torch.float32 else 2


def moe_fs_bwd(dout, experts, gate_weights, gate_biases, fuse_weight, fuse_bias, *,
               topk: int, w_lo: torch.Tensor,
               keep: torch.Tensor) -> list[torch.Tensor]:  # fmt: skip
    """[de1, de2, de3, dparams] for the forward that returned w_lo and keep (its keep set:
    the backward never reselects). Expert gradients contiguous in the experts' dtype; dparams
    the fp32 gradients (W1, b1, W2, b2, W3, b3, W_fuse, b_fuse) packed flat in that order
    (`PACKED_ORDER`; `partials.split_flat` views them). The residual's gradient (dout)
    is not computed here.
    """
    e1 = experts[0]
    n, c, h, w = e1.shape
    dtype = e1.dtype
    e1, e2, e3 = _shared_layout(*experts)
    dout = dout.to(dtype)
    cfg = moe_fs_config(c, dtype, "bwd")
    block_p = cfg.constexprs["BLOCK_P"]
    tiles_per_image = cdiv(h * w, block_p)
    num_tiles = n * tiles_per_image
    # Four programs per chunk (three experts, the fuse 1x1), one wave on the GPU.
    programs = persistent_programs(e1.device, _bwd_ctas_per_sm(dtype))
    chunks = min(num_tiles, max(1, programs // 4))
    de = [empty((n, c, h, w), dtype=dtype, device=e1.device) for _ in range(NUM_EXPERTS)]
    # The 1x1 weights as the forward cast them (w_lo), the biases fp32.
    biases = _weights(gate_weights, gate_biases, fuse_weight, fuse_bias)[1::2]
    weights = [t for pair in zip(w_lo.unbind(0), biases, strict=True) for t in pair]
    part = empty((chunks, 4 * (c * c + c)), dtype=torch.float32, device=e1.device)
    moe_fs_bwd_kernel[(4 * chunks,)](
        e1, e2, e3, dout, keep, *de, *weights[:7], part,
        h, w, tiles_per_image, num_tiles, chunks, *e1.stride(), *dout.stride(),
        TOPK=topk, **cfg.launch_options(), **cfg.constexprs,
    )  # fmt: skip
    return de + [sum_partials(part)]


# ---------------------------------------------------------------------------------------
# Registry: every (kernel, config) the launchers above can pick for C = 64.

_SCALARS = ("H", "W", "tiles_per_image")
_E_STRIDES = ("se_n", "se_c", "se_h", "se_w")
_GATE_POINTERS = "w1_ptr{0} b1_ptr w2_ptr{0} b2_ptr w3_ptr{0} b3_ptr wf_ptr{0}"


def _register(kernel, name: str, pointers: str, scalars: tuple, variants: list[dict]):
    fields = [p.split(":") for p in pointers.split()]
    register(
        KernelSpec(
            name=kernel.__name__,
            fn=kernel,
            signature=dtype_signature(fields, scalars),
            configs=tuple(
                DtypeConfig.of(moe_fs_config(64, dt, name), dt, extra)
                for dt in KERNEL_DTYPES
                for extra in variants
            ),
        )
    )


_register(
    moe_fs_fwd_kernel, "fwd",
    "e1_ptr:dt e2_ptr:dt e3_ptr:dt res_ptr:dt out_ptr:dt w_lo_ptr:dt keep_ptr:u8 "
    f"{_GATE_POINTERS.format('')} "
    "bf_ptr",
    _SCALARS + _E_STRIDES,
    [{"TOPK": k, "HAS_RESIDUAL": r} for k in (1, 2, 3) for r in (True, False)],
)  # fmt: skip
_register(
    moe_fs_bwd_kernel, "bwd",
    "e1_ptr:dt e2_ptr:dt e3_ptr:dt dout_ptr:dt keep_ptr:u8 de1_ptr:dt de2_ptr:dt de3_ptr:dt "
    f"{_GATE_POINTERS.format(':dt')} part_ptr",
    _SCALARS + ("num_tiles", "num_chunks") + _E_STRIDES + ("sd_n", "sd_c", "sd_h", "sd_w"),
    [{"TOPK": k} for k in (1, 2, 3)],
)  # fmt: skip

"""Fused ESAM (efficient sparse attention module) kernels, forward and backward.

ESAM (SSIU.md) on v: (N, C, H, W), with Hh, Wh = H/2, W/2 and the sampled grid padded to
whole blocks, Hp, Wp = Hh, Wh rounded up to a multiple of BLOCK:

    u   = reflect_pad(max_pool_2x2(v))                   # (N, C, Hp, Wp)
    qkv = 1x1(u)                                         # (N, 3C, Hp, Wp), no bias
    o   = halo block attention(q, k, v)                  # per 8x8 block, head: 64 x 100
    out = crop(bilinear_x2_ac(dw3x3_reflect(o))) (+ v)   # (N, C, H, W)

Kernels (names per STYLE.md):

1. `esam_qkv_fwd_kernel`: max-pool, reflect pad and the qkv 1x1 in one pass; one program per
   row tile of BW padded-grid pixels, all C channels ([C, BW] tiles, pixels along the
   lanes, three [C, C] dots). Each 2x2 window row is one contiguous run of 2 BW input
   pixels, split into the windows' columns in registers (`_windows`); the reflected
   right-hand columns come from the row's last tile by a gather. Reads v once, writes q,
   k, v at quarter resolution; u never reaches memory.
   Why not a prologue of the attention kernel: the 10x10 key windows overlap (1.56 keys
   loaded per query) and the heads would each recompute the whole u window, so the
   projection would be done ~6x over; the quarter-resolution qkv costs 3/4 of v's bytes.
   Floor per sampled pixel (C = 64, bf16): read 4 x 128 B, write 3 x 128 B; 3 x 2 C^2 =
   24.6 kFLOP (tensor cores): memory bound, at the floor when v is read once.
2. `esam_attn_fwd_kernel`: one program per (image, block, head). It loads the block's
   BLOCK^2 queries [64, D] and its window's keys and values [KEYS_PAD = 128, D] (100 real
   keys in runs of 12 slots per window row, `_key_slots`; zero outside the grid; other
   slots masked), adds rel_h/rel_w to every real key
   (zero-padded ones included), forms the scores with `tl.dot` in fp32 accumulation,
   selects the top k per query (below), and does an fp32 max-subtracted softmax and
   P V. Only o [64, D] and the per-query log-sum-exp (fp32; with top-k also the
   threshold) are written; no score or probability matrix leaves registers. (QSPLIT > 1
   takes the queries in sub-blocks of 64 / QSPLIT rows to save registers; the backward
   uses 2.)
3. `esam_prop_fwd_kernel`: LocalProp and the residual in one pass at full resolution, on
   row tiles ([CB channels, BX output pixels], lanes along the pixels): the output row's
   two bilinear (align_corners=True) source rows are scalars; each is t = dw3x3(o) +
   bias over one aligned run of o columns (its three tap rows loaded as 16-byte runs,
   summed per column tap, the column taps applied by gathers in registers); the rows are
   mixed, then the columns by two gathers, cropped (only H x W pixels computed), + v.
   The dw3x3 output never reaches memory.
   Floor per output pixel and channel (bf16): read v 2 B, o 0.5 B, write 2 B; ~80 FLOP:
   memory bound; o runs are re-read by neighbouring rows (L1/L2 hits).

Global access widths (`ssiu check-kernels`, training specialisation, bf16, C = 64; triton
3.9 and 3.6 alike unless noted): qkv LDG/STG 16 B only (38 / 84 registers sm_90 / sm_80;
was 64 LDG of 2 B, [pixels, C] flat tiles); attention fwd q 16 B, k and v 4 B (pixel
pairs), o STG 8 B (127-158 registers; was 20 LDG + 4 STG of 2 B; the sorting top-k
forward, 4 warps: o STG 16 B, 167-232 registers); attention bwd the same
loads, dq STG 16 B (192 / 232 capped, no spills; 215 / 232 under 3.6); LocalProp 16 B
runs (80 registers, was 207 with 32 LDG of 2 B). No 2-byte global access is left, so
`--strict-access` holds.
Against the floors (modelled, not measured): qkv reads v once (the overlapping last
tile of a row re-reads at most a tile, from L2) and writes q, k, v once: ~1.0x. The
attention reads q once and each key window (1.56 keys per query, k and v) from L2,
writes o and lse once: ~1.0x from DRAM; 100 of 128 key slots are real (the pixel-pair
runs pad 2 of 12 per window row), so the score tiles do 1.28x the useful dot work.
LocalProp reads each o row run for the 6 tap rows of the 2 source rows of each output
row (L1/L2 hits; o is a quarter of v) and v, out once: ~1.0x from DRAM.

4. `esam_attn_bwd_kernel`: per (image, block, head), persistent over tiles. Recomputes
   the scores from q, k, v, rel, keeps the keys whose score is >= the forward's saved
   top-k threshold (see "Top-k selection"), and the probabilities as exp(s - lse) from
   the saved log-sum-exp (no probability matrix is stored). With dO (gradient of o) and
   delta = rowsum(dO * o): dV_win = P^T dO, dS = P * (dO V^T - delta) (zero off the kept
   keys, so gradients flow through kept entries only), dQ = scale dS K, dK_win = dS^T Q.
   dQ is written per block (blocks do not overlap); dK_win / dV_win, which overlap
   between neighbouring windows, go to a window buffer in `F.fold` layout, folded by a
   gather kernel (`ssiu.kernels.esam_bwd`; fold = the adjoint of the reference's
   unfold, dropping the zero-padded keys). The relative-position gradient is dK_win
   summed over blocks and heads: fp32 per-program partials [KEYS_PAD, D], reduced by the
   launcher.

Top-k selection (attn_topk = k, 1 <= k < WIN^2; k >= WIN^2 or None is dense): a key is kept
iff its score is >= the k-th largest score of its query, so ties at the threshold are all
kept (the reference's `topk_threshold_mask`). The forward finds that threshold and saves
it (fp32, after the log-sum-exps: lse is (N, HEADS, 2 Hp * Wp) with top-k, 4 bytes per
query and head more); the backward recomputes bit-identical scores (q, k, v recomputed by
the same kernel; the score dot has K = head_dim = 16, one chunk, so its rounding does not
depend on the query sub-block) and keeps those >= the saved threshold: the forward's keep
set by construction, with no selection in the backward. The launchers pick the mode
(`topk_select`) as the constexpr SELECT:
- "bisect" (the forward under the CPU interpreter): 32 bisection steps on the
  order-preserving int32 image of the fp32 scores (sign-magnitude bits mapped to a
  monotone key; bounds in int32, the midpoint computed without overflow; scores
  compared as floats, so +-0 tie as in the reference). Each step is a vectorised compare
  and row count over the [64, 128] score tile. (Was int64 bounds. A variant that stops
  bisecting once <= 4 keys remain, ~17 passes instead of 32 in a NumPy model, used
  `while` loops: triton 3.6 fails to compile it, TritonGPURemoveLayoutConversions.)
- "sort" (the forward on a GPU): `tl.sort` of each row's monotone int32 keys
  (descending; a bitonic network, 28 compare-exchange stages), column k - 1 taken by a
  masked max (`_kth_largest_sorted`); the scores are then recomputed by the same dot
  (bit-identical) rather than held live across the sort. In the interpreter a sort of a
  [64, 128] tile takes seconds (vs ~80 ms bisecting), hence bisection there.
- "saved" (the backward, everywhere): the forward's threshold, loaded.
"bisect" and "sort" both give the exact k-th largest (its sign aside when it is a zero:
+0 and -0 compare equal), so o, lse and every gradient are bit-identical between them
(tested through the interpreter; a backward that bisects again is tested equal too).
SASS (triton 3.9, `cuobjdump`, C = 64, block 8, bf16; dynamic = straight-line code plus
loop bodies times trips, per thread; x warps = warp instructions per program or, in the
backward, per tile):
| kernel | sm_90 regs | sm_90 dynamic x warps | sm_80 regs | sm_80 dynamic x warps |
|---|---|---|---|---|
| fwd dense, 4 warps | 126 | 2,176 x 4 = 8.7k (8 warps: 15.6k) | 157 | 2,200 x 8 = 17.6k (8 warps) |
| fwd bisect (before) | 156 | 2,696 + 31 x 274 = 11,190 x 8 = 89.5k | 147 | 10,279 x 8 = 82.2k |
| fwd sort | 168 | 5,888 x 4 = 23.6k (0.26x bisect) | 231 (cap) | 6,104 x 4 = 24.4k (0.30x) |
| bwd dense | 197 | 3,362 x 8 = 26.9k | 232 | 3,211 x 8 = 25.7k |
| bwd bisect (was) | 222 | 21,863 x 8 = 175k (6.5x dense) | 232 | 19,569 x 8 = 157k |
| bwd saved | 232 (cap) | 3,583 x 8 = 28.7k (0.16x bisect) | 232 | 3,691 x 8 = 29.5k (0.19x) |
(Backward per tile: tile-loop body + (QSPLIT - 1) query sub-blocks + the bisection's
31 extra steps per sub-block. Bisecting forward as it was; now, storing the threshold
too: 2,632 + 31 x 273 on sm_90, 146 registers.) fp32 (FMA dots): forward at 16 warps
bisect 4,868 per thread on sm_90 (64 registers), sort on 32-query sub-blocks 2,200 +
1,677 = 3,877 (0.80x; 90 registers); backward at 8 warps (QSPLIT 4) bisect 16,779 per
tile, saved 4,988 (0.30x; dense 4,936). No spills anywhere, triton 3.9 and 3.6 (`ssiu
check-kernels --registry all --strict-access`). GPU time is not measured.
Why 4 warps for the 16-bit sort: Triton lays a chained dot's warps along the queries (mma
warpsPerCTA [8, 1]), so at 8 warps both warpgroups hold all 64 query rows and each runs
the whole selection (the dense and bisecting forwards do too: per thread 2,880 vs 2,696
static instructions bisecting at 4 vs 8 warps). The 8-warp sort fits once the scores are
recomputed (172 registers; 237-242 holding them, spilling at a 232 cap) but does twice
the work; 32-query sub-blocks cost as much each as the whole tile (each row on 4 of the
8 warps); 16 warps cap a thread at 128 registers (spills). 4 warps: 167 registers on
sm_90 (3 programs, 12 warps an SM); triton 3.6 reaches 203-210 (sm_90) and 255 on sm_80,
hence the 232 cap (no spills under either). A sorting backward spilled at the 232 cap in
every config tried (sm_90, 3.9, bytes: 8 warps QSPLIT 1/2 160/80, 4 warps 292/140, 2
warps 1,324, 1 warp 3,476; float keys 544 / 812 at QSPLIT 2 / 4), hence "saved".

Precision: q, k + rel, p enter `tl.dot` in the input dtype (fp32 attention dots use
input_precision="ieee", no TF32; the qkv projection "tf32x3", about fp32 accuracy, see
`esam_config`), accumulation and softmax are fp32. The scale d^-0.5 is
applied to q (in fp32) before the dot, as the reference does. Scores are accumulated in
fp32, so fp16 inputs whose products exceed 65504 do not overflow. Offsets are int64.
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
    modelling_gpu,
)
from ssiu.kernels.indexing import reflect, row_tile
from ssiu.kernels.registry import KernelConfig, KernelSpec, register

SELECT_ITERS = 32  # top-k bisection steps over the 2^32 int32 keys of fp32 scores


@triton.jit
def _monotone_key(x):
    """fp32 -> int32 key with the same order (-0 just below +0). Its own inverse on int32."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_to_float(key):
    """The fp32 value of an int32 key (inverse of `_monotone_key`)."""
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _count_at_least(s, mask_j, t):
    """Per row: how many of the row's scores (columns in mask_j) are >= t[row] (fp32)."""
    return tl.sum(((s >= t[:, None]) & mask_j[None, :]).to(tl.int32), axis=1)


@triton.jit
def _kth_largest(s, mask_j, topk, ITERS: tl.constexpr):
    """Per row of s [M, KEYS_PAD] fp32, the k-th largest score over the columns in mask_j.

    Bisection on monotone int32 keys of fp32 values; scores are compared as floats, so
    count(x) = #scores >= float(x) is non-increasing in the key x (+0 and -0 compare
    equal). Invariant: count(lo) >= k > count(hi); the midpoint is computed without
    overflow, so the bounds stay int32; 32 halvings of at most 2^32 keys leave
    hi = lo + 1 (then mid = lo: a no-op). Exact for any scores: ties, +-0, huge ranges.
    """
    lo = _monotone_key(tl.min(tl.where(mask_j[None, :], s, float("inf")), axis=1))  # [M]
    hi = _monotone_key(tl.max(tl.where(mask_j[None, :], s, float("-inf")), axis=1)) + 1
    for _ in range(ITERS):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2), no overflow
        up = _count_at_least(s, mask_j, _key_to_float(mid)) >= topk
        lo = tl.where(up, mid, lo)
        hi = tl.where(up, hi, mid)
    return _key_to_float(lo)


@triton.jit
def _kth_largest_sorted(s, topk):
    """Per row of s [M, KEYS_PAD] fp32 (-inf on padding columns), the k-th largest score.

    The row sorted in descending order (`tl.sort`, a bitonic network), column k - 1 taken
    by a masked max. The same value as `_kth_largest` (k <= the valid columns, so padding
    never reaches column k - 1); if it is a zero its sign may differ, but +0 and -0
    compare equal, so the keep sets `s >= threshold` are identical.
    """
    srt = tl.sort(_monotone_key(s), dim=1, descending=True)  # [M, KEYS_PAD] int32
    col = tl.arange(0, s.shape[1])
    kth = tl.max(tl.where(col[None, :] == topk - 1, srt, -(2**31)), axis=1)
    return _key_to_float(kth)


@triton.jit
def _keys(qkv_ptr, relh_ptr, relw_ptr, n, bh, bw, head, Hp, Wp,
          C: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, HALO: tl.constexpr,
          KEYS_PAD: tl.constexpr):  # fmt: skip
    """The key window of one (block, head): k + rel and v [KEYS_PAD, D] in the input dtype.

    Key slots run along the window's rows in runs of ROWW pixels that start PADL pixels
    left of the window (`_key_slots`), so a run's pixels are contiguous and 4-byte
    aligned: the loads move pixel pairs (a slot per window pixel would start each run one
    pixel off alignment: 2 bytes a lane). Keys outside the grid are zero (then get rel
    like the others); slots off the window are padding (mask_j False). Also returns the
    head's channel offsets [D] (int64) and each slot's window index r * WIN + c.
    """
    HALF: tl.constexpr = D // 2
    # Wp is a multiple of the block: written so the compiler sees it (a tl.multiple_of
    # hint on a kernel argument is dropped), for aligned rows and channel planes.
    Wp = Wp // BLOCK * BLOCK
    HW = Hp * Wp
    # An opaque 0 (bh >= 0; a multiple of 1024 for the alignment analysis): the index
    # tiles are then recomputed per tile, not hoisted out of the backward's tile loop
    # and held in registers across it (it spilled on sm_80).
    zero = (bh < 0).to(tl.int32) * 1024
    offs_d = tl.arange(0, D).to(tl.int64) + zero
    chan = head * D + offs_d  # [D]
    base = qkv_ptr + n * 3 * C * HW
    r, c, mask_j, widx = _key_slots(BLOCK, HALO, KEYS_PAD, zero)  # [KEYS_PAD] each
    kh, kw = bh * BLOCK - HALO + r, bw * BLOCK - HALO + c
    # Loaded: every slot of a run whose pixel is on the grid (a mask constant over pixel
    # pairs, as the grid's width is even), padding slots included; then zeroed off the
    # window, so no padding value (inf, NaN) reaches p V or dS K.
    on_grid = (r < BLOCK + 2 * HALO) & (kh >= 0) & (kh < Hp) & (kw >= 0) & (kw < Wp)
    # Slot pairs are pixel pairs at even offsets; the compiler cannot see it through the
    # division by ROWW, hence the hints.
    on_grid = tl.max_constancy(on_grid, 2)
    offs_k = tl.max_contiguous(tl.multiple_of(kh * Wp + kw, 2), 2)  # [KEYS_PAD]
    b_k = tl.load(base + (C + chan)[None, :] * HW + offs_k[:, None],
                  mask=on_grid[:, None], other=0.0)  # [KEYS_PAD, D]  # fmt: skip
    b_v = tl.load(base + (2 * C + chan)[None, :] * HW + offs_k[:, None],
                  mask=on_grid[:, None], other=0.0)  # [KEYS_PAD, D]  # fmt: skip
    b_k = tl.where(mask_j[:, None], b_k, 0.0)
    b_v = tl.where(mask_j[:, None], b_v, 0.0)
    # Relative position: rel_h[r] on the first half of the head's channels, rel_w[c] on
    # the second; every real key gets it, zero-padded ones included.
    is_h = offs_d < HALF
    b_rel = tl.load(relh_ptr + r[:, None] * HALF + offs_d[None, :],
                    mask=mask_j[:, None] & is_h[None, :], other=0.0)  # fmt: skip
    b_rel += tl.load(relw_ptr + c[:, None] * HALF + (offs_d - HALF)[None, :],
                     mask=mask_j[:, None] & (offs_d >= HALF)[None, :], other=0.0)  # fmt: skip
    b_krel = (b_k.to(tl.float32) + b_rel).to(b_k.dtype)  # [KEYS_PAD, D]
    return b_krel, b_v, chan, widx, mask_j


@triton.jit
def _key_slots(BLOCK: tl.constexpr, HALO: tl.constexpr, KEYS_PAD: tl.constexpr, zero):
    """Window row r, column c, validity and window index r * WIN + c of each key slot.

    Slot j is pixel (j // ROWW, j % ROWW - PADL) of the window: runs of ROWW (even)
    slots per window row starting PADL = HALO % 2 pixels left of it, at an even column
    (BLOCK is even), so pixel pairs are 4-byte aligned; `keys_pad` fits WIN * ROWW slots.
    """
    WIN: tl.constexpr = BLOCK + 2 * HALO
    PADL: tl.constexpr = HALO % 2
    ROWW: tl.constexpr = (WIN + PADL + 1) // 2 * 2
    offs_j = tl.arange(0, KEYS_PAD) + zero
    r, c = offs_j // ROWW, offs_j % ROWW - PADL
    mask_j = (offs_j < WIN * ROWW) & (c.to(tl.uint32) < WIN)  # 0 <= c < WIN
    return r, c, mask_j, r * WIN + c


@triton.jit
def _query_scores(qkv_ptr, b_krel, chan, mask_j, n, bh, bw, q0, Hp, Wp, scale, topk, thr_ptr,
                  C: tl.constexpr, BLOCK: tl.constexpr, BQ: tl.constexpr,
                  SPARSE: tl.constexpr, SELECT: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):  # fmt: skip
    """Queries q0 .. q0 + BQ - 1 (row-major in the block): their scores and kept keys.

    SELECT (SPARSE only): "sort" finds the k-th largest score by `tl.sort` (GPU),
    "bisect" by bisection (the interpreter), "saved" loads it from thr_ptr + pixel offset
    (the backward: the forward's); the same value, hence the same keep set (module doc).

    Returns q * scale [BQ, D] (input dtype), s [BQ, KEYS_PAD] fp32 (-inf on padding
    columns), the kept mask [BQ, KEYS_PAD], the threshold [BQ] (fp32; 0 when dense) and
    the queries' pixel offsets [BQ] (int64).
    """
    # Runs of BLOCK contiguous, BLOCK-aligned pixels (Wp is a multiple of the block):
    # the hints let the query loads and the o, dq stores move 16 bytes a lane.
    Wp = Wp // BLOCK * BLOCK
    HW = Hp * Wp
    offs_i = tl.multiple_of(q0, BQ) + tl.arange(0, BQ).to(tl.int64)
    offs_q = (bh * BLOCK + offs_i // BLOCK) * Wp + bw * BLOCK
    offs_q += offs_i % BLOCK  # [BQ]
    b_q = tl.load(qkv_ptr + n * 3 * C * HW + chan[None, :] * HW + offs_q[:, None])  # [BQ, D]
    b_qs = (b_q.to(tl.float32) * scale).to(b_q.dtype)  # [BQ, D]
    b_s = tl.dot(b_qs, tl.trans(b_krel), input_precision=DOT_PRECISION)  # [BQ, KEYS_PAD] fp32
    b_s = tl.where(mask_j[None, :], b_s, float("-inf"))
    if SPARSE:
        if SELECT == "sort":
            thr = _kth_largest_sorted(b_s, topk)  # [BQ]
            # The scores again, bit for bit (same operands, same dot), so that the tile
            # is not live across the sort (64 registers a thread). q * 1 by an opaque 1
            # (topk >= 1 at run time; the compiler cannot tell) keeps the two dots apart.
            one = (topk > 0).to(b_qs.dtype)
            b_s = tl.dot(b_qs * one, tl.trans(b_krel), input_precision=DOT_PRECISION)
            b_s = tl.where(mask_j[None, :], b_s, float("-inf"))
        elif SELECT == "saved":
            thr = tl.load(thr_ptr + offs_q)  # [BQ]
        else:
            thr = _kth_largest(b_s, mask_j, topk, 32)  # [BQ]; 32 = SELECT_ITERS
        keep = (b_s >= thr[:, None]) & mask_j[None, :]
    else:
        keep = mask_j[None, :] & (offs_q >= 0)[:, None]
        thr = tl.zeros([BQ], dtype=tl.float32)
    return b_qs, b_s, keep, thr, offs_q


@triton.jit
def _tile_ids(tile, heads, blocks_w, blocks_per_image):
    tile = tl.cast(tile, tl.int64)
    head = tile % heads
    blk = (tile // heads) % blocks_per_image
    n = tile // (heads * blocks_per_image)
    return n, blk, blk // blocks_w, blk % blocks_w, head


@triton.jit
def _windows(row_ptr, s_h, x0, limit, offs_c, s_c, s_w, C: tl.constexpr, BW: tl.constexpr):
    """The 2x2 windows of pooled columns x0 .. x0 + BW - 1 whose top row starts at row_ptr:
    (top-left, top-right, bottom-left, bottom-right), each [C, BW] in v's dtype.

    Each input row is one contiguous run of 2 BW pixels (lanes along pixels: 16 B a lane
    when s_w == 1), split into the windows' left and right columns in registers; loading
    the four corners directly would stride 2 along the pixels (2 B a lane in 16-bit).
    Columns >= limit read 0.
    """
    cols = 2 * x0 + tl.arange(0, 2 * BW)  # [2 BW]
    ptr = row_ptr + offs_c[:, None] * s_c + cols[None, :] * s_w
    mask = (cols < limit)[None, :]
    b_top = tl.reshape(tl.load(ptr, mask=mask, other=0.0), [C, BW, 2])  # [C, BW, 2]
    b_bot = tl.reshape(tl.load(ptr + s_h, mask=mask, other=0.0), [C, BW, 2])
    top_l, top_r = tl.split(b_top)  # [C, BW] each
    bot_l, bot_r = tl.split(b_bot)
    return top_l, top_r, bot_l, bot_r


@triton.jit(do_not_specialize=["tiles_per_row"])
def esam_qkv_fwd_kernel(
    v_ptr, w_ptr, qkv_ptr,
    Hh, Wh, Hp, Wp, tiles_per_row,
    sv_n, sv_c, sv_h, sv_w,
    C: tl.constexpr, BW: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """qkv (N, 3C, Hp, Wp contiguous) = 1x1(reflect_pad(max_pool_2x2(v))); v strided.

    One program per row tile of the padded grid: row y, columns x0 .. x0 + BW - 1, all
    C channels ([C, BW] tiles, pixels along the lanes). Hp, Wp are multiples of BLOCK and
    BW a multiple of BLOCK >= 2 BLOCK (`esam_config`): the last tile of a row is moved
    left to end at Wp (overlapping its neighbour, which writes the same values), so it
    holds every padded column (x >= Wh, fewer than BLOCK) and its reflection source
    2 Wh - 2 - x (> Wp - 2 BLOCK), taken from the tile by a gather in registers.
    """
    pid = tl.program_id(0)
    per_image = Hp * tiles_per_row
    n = pid.to(tl.int64) // per_image
    rest = pid % per_image
    y = rest // tiles_per_row
    x0 = tl.minimum((rest % tiles_per_row) * BW, tl.maximum(Wp - BW, 0))
    x0 = tl.multiple_of(x0, BLOCK)
    x = x0 + tl.arange(0, BW)  # [BW]
    offs_c = tl.arange(0, C)
    # Reflect padding of the bottom rows (pad < Hh is checked): a scalar row index.
    ys = tl.where(y >= Hh, 2 * Hh - 2 - y, y)
    row_ptr = v_ptr + n * sv_n + (2 * ys).to(tl.int64) * sv_h
    top_l, top_r, bot_l, bot_r = _windows(row_ptr, sv_h, x0, 2 * Wh, offs_c, sv_c, sv_w, C, BW)
    b_u = tl.maximum(tl.maximum(tl.maximum(top_l, top_r), bot_l), bot_r)  # [C, BW]
    # Triton 3.6 computes a 16-bit maximum in fp32: cast back so both dot operands match.
    b_u = b_u.to(v_ptr.dtype.element_ty)
    if x0 + BW > Wh:  # the row's last tile: reflect padding on the right
        src = tl.where(x < Wh, x, 2 * Wh - 2 - x) - x0
        src = tl.minimum(tl.maximum(src, 0), BW - 1)  # in range but for masked columns
        b_u = tl.gather(b_u, tl.broadcast_to(src[None, :], [C, BW]), axis=1)
    Wp = Wp // BLOCK * BLOCK  # whole blocks: aligned rows (`_keys`)
    HW = Hp * Wp
    ptr_out = qkv_ptr + n * 3 * C * HW + offs_c[:, None] * HW + (y * Wp + x)[None, :]
    mask = (x < Wp)[None, :]
    for part in tl.static_range(3):
        b_w = tl.load(w_ptr + (part * C + offs_c[:, None]) * C + offs_c[None, :])  # [C_out, C_in]
        b_w = b_w.to(b_u.dtype)
        b_out = tl.dot(b_w, b_u, input_precision=DOT_PRECISION)  # [C_out, BW] fp32
        tl.store(ptr_out + part * C * HW, b_out.to(qkv_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["Hp", "Wp", "blocks_w", "blocks_per_image", "topk"])
def esam_attn_fwd_kernel(
    qkv_ptr, relh_ptr, relw_ptr, o_ptr, lse_ptr,
    Hp, Wp, blocks_w, blocks_per_image, topk, scale,
    C: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    HALO: tl.constexpr, KEYS_PAD: tl.constexpr, SPARSE: tl.constexpr, SELECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, QSPLIT: tl.constexpr,
):  # fmt: skip
    """o (N, C, Hp, Wp) and lse (N, HEADS, Hp * Wp) fp32 of one (image, block, head);
    with top-k lse is (N, HEADS, 2 Hp * Wp): each (image, head) row holds the log-sum-exps,
    then the thresholds (the k-th largest scores, for the backward's keep set).

    The block's queries go through in QSPLIT sub-blocks (fewer registers per score tile).
    """
    BQ: tl.constexpr = BLOCK * BLOCK // QSPLIT
    Wp = Wp // BLOCK * BLOCK  # whole blocks: aligned rows (`_keys`)
    n, blk, bh, bw, head = _tile_ids(tl.program_id(0), HEADS, blocks_w, blocks_per_image)
    b_krel, b_v, chan, _, mask_j = _keys(qkv_ptr, relh_ptr, relw_ptr, n, bh, bw, head,
                                          Hp, Wp, C, D, BLOCK, HALO, KEYS_PAD)  # fmt: skip
    HW = Hp * Wp
    lse_row = lse_ptr + (n * HEADS + head) * (1 + SPARSE) * HW  # then thresholds if SPARSE
    for qs in range(QSPLIT):
        b_qs, b_s, keep, thr, offs_q = _query_scores(
            qkv_ptr, b_krel, chan, mask_j, n, bh, bw, qs * BQ, Hp, Wp, scale, topk,
            lse_row + HW, C, BLOCK, BQ, SPARSE, SELECT, DOT_PRECISION,
        )  # fmt: skip
        b_m = tl.max(b_s, axis=1)  # [BQ]; the row maximum is always kept
        b_p = tl.where(keep, tl.exp(b_s - b_m[:, None]), 0.0)  # [BQ, KEYS_PAD] fp32
        b_l = tl.sum(b_p, axis=1)  # [BQ] >= 1
        b_o = tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)  # [BQ, D]
        b_o = b_o / b_l[:, None]
        tl.store(o_ptr + n * C * HW + chan[None, :] * HW + offs_q[:, None],
                 b_o.to(o_ptr.dtype.element_ty))  # fmt: skip
        tl.store(lse_row + offs_q, b_m + tl.log(b_l))
        if SPARSE:
            tl.store(lse_row + HW + offs_q, thr)


@triton.jit(do_not_specialize=["Hp", "Wp", "blocks_w", "blocks_per_image", "num_tiles", "topk"])
def esam_attn_bwd_kernel(
    qkv_ptr, relh_ptr, relw_ptr, o_ptr, do_ptr, lse_ptr,
    dq_ptr, dkw_ptr, dvw_ptr, drel_part_ptr,
    Hp, Wp, blocks_w, blocks_per_image, num_tiles, topk, part_stride, scale,
    C: tl.constexpr, HEADS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
    HALO: tl.constexpr, KEYS_PAD: tl.constexpr, SPARSE: tl.constexpr, SELECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, QSPLIT: tl.constexpr,
):  # fmt: skip
    """Attention backward over the tiles of this program (persistent).

    o, dO: (N, C, Hp, Wp) contiguous; writes dq (N, C, Hp, Wp) fp32, dK/dV windows
    (N, C * WIN^2, blocks) fp32 in `F.fold` layout, and this program's partials of d rel_h
    and d rel_w ((WIN, D/2) each, in that order at row pid of the partials): d(k + rel)
    summed over its windows, then over window columns (rel_h) or rows (rel_w). Queries
    go through in QSPLIT sub-blocks; dK, dV of the window accumulate over them in fp32.
    """
    WW: tl.constexpr = (BLOCK + 2 * HALO) * (BLOCK + 2 * HALO)
    BQ: tl.constexpr = BLOCK * BLOCK // QSPLIT
    pid = tl.program_id(0)
    Wp = Wp // BLOCK * BLOCK  # whole blocks: aligned rows (`_keys`)
    HW = Hp * Wp
    acc_rel = tl.zeros([KEYS_PAD, D], dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        n, blk, bh, bw, head = _tile_ids(tile, HEADS, blocks_w, blocks_per_image)
        b_krel, b_v, chan, widx, mask_j = _keys(
            qkv_ptr, relh_ptr, relw_ptr, n, bh, bw, head, Hp, Wp, C, D, BLOCK, HALO, KEYS_PAD
        )
        dtype = b_v.dtype
        b_dk = tl.zeros([KEYS_PAD, D], dtype=tl.float32)
        b_dv = tl.zeros([KEYS_PAD, D], dtype=tl.float32)
        lse_row = lse_ptr + (n * HEADS + head) * (1 + SPARSE) * HW  # then thresholds
        for qs in range(QSPLIT):
            b_qs, b_s, keep, _, offs_q = _query_scores(
                qkv_ptr, b_krel, chan, mask_j, n, bh, bw, qs * BQ, Hp, Wp, scale, topk,
                lse_row + HW, C, BLOCK, BQ, SPARSE, SELECT, DOT_PRECISION,
            )  # fmt: skip
            b_lse = tl.load(lse_row + offs_q)  # [BQ]
            b_p = tl.where(keep, tl.exp(b_s - b_lse[:, None]), 0.0)  # [BQ, KEYS_PAD]
            offs_o = n * C * HW + chan[None, :] * HW + offs_q[:, None]
            b_do = tl.load(do_ptr + offs_o).to(tl.float32)  # [BQ, D]
            b_o = tl.load(o_ptr + offs_o).to(tl.float32)
            b_delta = tl.sum(b_do * b_o, axis=1)  # [BQ]
            b_do = b_do.to(dtype)
            b_dv += tl.dot(tl.trans(b_p.to(dtype)), b_do, input_precision=DOT_PRECISION)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BQ, KEYS_PAD]
            b_ds = (b_p * (b_dp - b_delta[:, None])).to(dtype)  # zero off the kept keys
            b_dq = tl.dot(b_ds, b_krel, input_precision=DOT_PRECISION) * scale  # [BQ, D]
            tl.store(dq_ptr + offs_o, b_dq)
            b_dk += tl.dot(tl.trans(b_ds), b_qs, input_precision=DOT_PRECISION)  # [KEYS_PAD, D]
        offs_w = (n * C * WW + chan[None, :] * WW + widx[:, None]) * blocks_per_image + blk
        tl.store(dkw_ptr + offs_w, b_dk, mask=mask_j[:, None])
        tl.store(dvw_ptr + offs_w, b_dv, mask=mask_j[:, None])
        acc_rel += b_dk
    # rel_h[r] gets the first D/2 channels of every slot in window row r, rel_w[c] the
    # second half of every slot in window column c.
    HALF: tl.constexpr = D // 2
    WIN: tl.constexpr = BLOCK + 2 * HALO
    r, c, mask_j, _ = _key_slots(BLOCK, HALO, KEYS_PAD, 0)
    offs_d = tl.arange(0, D)
    row = drel_part_ptr + pid.to(tl.int64) * part_stride
    for i in range(WIN):
        d_h = tl.sum(tl.where(((r == i) & mask_j)[:, None], acc_rel, 0.0), axis=0)  # [D]
        d_w = tl.sum(tl.where(((c == i) & mask_j)[:, None], acc_rel, 0.0), axis=0)
        tl.store(row + i * HALF + offs_d, d_h, mask=offs_d < HALF)
        tl.store(row + (WIN + i) * HALF + (offs_d - HALF), d_w, mask=offs_d >= HALF)


@triton.jit(do_not_specialize=["tiles_per_row"])
def esam_prop_fwd_kernel(
    o_ptr, pw_ptr, pb_ptr, v_ptr, sub_ptr, out_ptr,
    H, W, Hp, Wp, tiles_per_row,
    sv_n, sv_c, sv_h, sv_w, scale_h, scale_w,
    CB: tl.constexpr, BX: tl.constexpr, ADD_INPUT: tl.constexpr, HAS_SUB: tl.constexpr,
):  # fmt: skip
    """out (N, C, H, W contiguous) = crop(bilinear_x2_ac(dw3x3_reflect(o))) (+ v) (- sub).

    sub (contiguous, like out) is the fused SS-ReM step's beta (w = ESAM(u) + u - beta).
    Grid (row tiles, C / CB). o: (N, C, Hp, Wp) contiguous; pw (C, 9) fp32;
    scale_h = (Hp - 1) /
    (2 Hp - 1) (align_corners=True), scale_w likewise; v strided. A program owns output
    row y, columns x0 .. x0 + BX - 1, CB channels ([CB, pixels] tiles, lanes along the
    pixels). Row y interpolates t = dw3x3(o) + bias at the two source rows y0, y1
    (scalars); the columns it reads lie in one aligned run of BX columns of o from c0
    (BX / 2 + 2 columns plus the taps and the alignment, `_prop_chunk`). Per source row:
    the three o rows of its taps are loaded as such runs (contiguous), summed per column
    tap with the tap weights, and the column taps applied by gathers in registers; then
    the rows are mixed with their weights and the columns by two more gathers.
    """
    n, y, x0, x = row_tile(tl.program_id(0), H, tiles_per_row, BX)
    C = CB * tl.num_programs(1)
    offs_c = tl.program_id(1) * CB + tl.arange(0, CB)
    mask_x = x < W
    # Source rows and columns, as PyTorch's upsample_bilinear2d computes them (fp32).
    src_y = y.to(tl.float32) * scale_h
    y0 = src_y.to(tl.int32)  # floor (>= 0)
    ly = src_y - y0.to(tl.float32)
    y1 = tl.where(y0 < Hp - 1, y0 + 1, y0)
    src_x = x.to(tl.float32) * scale_w  # [BX]
    xa = src_x.to(tl.int32)
    lx = src_x - xa.to(tl.float32)
    xb = tl.where(xa < Wp - 1, xa + 1, xa)
    c0 = _prop_chunk(x0, scale_w)
    cols = c0 + tl.arange(0, BX)  # [BX] columns of o (and of t)
    o_img = o_ptr + n * C * Hp * Wp + offs_c[:, None].to(tl.int64) * (Hp * Wp)
    mask_o = (cols < Wp)[None, :]
    b_w = _tap_table(pw_ptr, offs_c, C)  # [16, CB]
    b_t = tl.zeros([CB, BX], dtype=tl.float32)  # the two t rows mixed: [CB, columns]
    for r in tl.static_range(2):
        yr = y0 if r == 0 else y1
        acc_l = tl.zeros([CB, BX], dtype=tl.float32)  # tap column dw = -1, by o column
        acc_m = tl.zeros([CB, BX], dtype=tl.float32)
        acc_r = tl.zeros([CB, BX], dtype=tl.float32)
        for dh in tl.static_range(3):
            row = reflect(yr + dh - 1, Hp)
            b_o = tl.load(o_img + (row * Wp + cols)[None, :], mask=mask_o, other=0.0)
            b_o = b_o.to(tl.float32)  # [CB, BX]
            acc_l += _tap(b_w, dh * 3)[:, None] * b_o
            acc_m += _tap(b_w, dh * 3 + 1)[:, None] * b_o
            acc_r += _tap(b_w, dh * 3 + 2)[:, None] * b_o
        # t[col] = sum_dw acc_dw[reflect(col + dw)]; columns past the chunk are not read.
        t_r = acc_m + _column(acc_l, reflect(cols - 1, Wp) - c0, CB, BX)
        t_r += _column(acc_r, reflect(cols + 1, Wp) - c0, CB, BX)
        b_t += (1.0 - ly if r == 0 else ly) * t_r
    b_out = (1.0 - lx)[None, :] * _column(b_t, xa - c0, CB, BX)
    b_out += lx[None, :] * _column(b_t, xb - c0, CB, BX)
    b_out += tl.load(pb_ptr + offs_c)[:, None]  # the bilinear weights sum to 1
    if ADD_INPUT:
        ptr_v = v_ptr + n * sv_n + offs_c[:, None].to(tl.int64) * sv_c + y * sv_h
        b_out += tl.load(ptr_v + (x * sv_w)[None, :], mask=mask_x[None, :], other=0.0).to(
            tl.float32
        )
    offs_out = n * C * H * W + offs_c[:, None].to(tl.int64) * (H * W) + y * W + x[None, :]
    if HAS_SUB:
        b_out -= tl.load(sub_ptr + offs_out, mask=mask_x[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_out, b_out.to(out_ptr.dtype.element_ty), mask=mask_x[None, :])


@triton.jit
def _tap_table(pw_ptr, offs_c, C):
    """The dw3x3 weights of channels offs_c as a [16, CB] fp32 table (row = tap, rows >= 9
    zero) from pw, the (C, 1, 3, 3) fp32 parameter itself (no transposed copy: one small
    gather per program)."""
    offs_t = tl.arange(0, 16)
    ptr = pw_ptr + offs_c[None, :] * 9 + offs_t[:, None]
    return tl.load(ptr, mask=(offs_t < 9)[:, None], other=0.0)  # [16, CB]


@triton.jit
def _tap(table, tap):
    """Row `tap` of a `_tap_table` as [CB] (exact: one nonzero term per column)."""
    return tl.sum(tl.where((tl.arange(0, 16) == tap)[:, None], table, 0.0), axis=0)


@triton.jit
def _prop_chunk(x0, scale_w):
    """First o column c0 (a multiple of 8) of the run a LocalProp row tile reads: its
    source columns start at floor(x0 scale_w) >= c0 + 1 and, as scale_w < 1/2, end
    before floor(x0 scale_w) + BX / 2 + 2, so with the taps (+-1) and c0's rounding
    (<= 8) a run of BX >= 32 columns holds them."""
    first = (x0.to(tl.float32) * scale_w).to(tl.int32)
    return tl.multiple_of(tl.maximum(first - 1, 0) // 8 * 8, 8)


@triton.jit
def _column(t, idx, CB: tl.constexpr, BX: tl.constexpr):
    """t [CB, BX] read at columns idx [BX] (clamped into the tile: clamped ones unused)."""
    idx = tl.minimum(tl.maximum(idx, 0), BX - 1)
    return tl.gather(t, tl.broadcast_to(idx[None, :], [CB, BX]), axis=1)


# ---------------------------------------------------------------------------------------
# Configs and launchers


def key_rows(block: int, halo: int) -> tuple[int, int]:
    """(WIN, ROWW): the window's side and the key slots per window row (`_key_slots`)."""
    win = block + 2 * halo
    return win, (win + halo % 2 + 1) // 2 * 2


def keys_pad(block: int, halo: int) -> int:
    win, roww = key_rows(block, halo)
    return triton.next_power_of_2(win * roww)


def topk_select(kernel: str, device: torch.device) -> str:
    """How attention kernel `kernel` ("attn_fwd", "attn_bwd") gets the k-th largest score
    on `device` (SELECT): `GPU_SELECT` where kernels are compiled (CUDA, or a GPU
    modelled while launches are captured: `ssiu.kernels.common.modelling_gpu`), else
    `INTERPRETER_SELECT` (the CPU interpreter: `tl.sort` of a [64, 128] tile takes
    seconds there). All give the same keep set (module doc, "Top-k selection")."""
    compiled = device.type == "cuda" or modelling_gpu()
    return (GPU_SELECT if compiled else INTERPRETER_SELECT)[kernel]


# The forward sorts on a GPU and bisects in the interpreter; the backward loads the
# forward's thresholds ("saved", stored after the log-sum-exps) everywhere.
GPU_SELECT = {"attn_fwd": "sort", "attn_bwd": "saved"}
INTERPRETER_SELECT = {"attn_fwd": "bisect", "attn_bwd": "saved"}


def esam_config(kernel: str, channels: int, heads: int, block: int, halo: int,
                dtype: torch.dtype, sparse: bool = False,
                select: str = "bisect") -> KernelConfig:  # fmt: skip
    """The config a launcher runs `kernel` ("qkv", "attn_fwd", "attn_bwd", "prop") with.

    Chosen from ptxas's register report for sm_90 and sm_80 at C = 64 (no spills):
    - qkv: [BLOCK_P, C] pixel tiles, BLOCK_P = 64 (32 in fp32, whose "tf32x3" dots, three
      TF32 tensor-core products of about fp32 accuracy, need more registers; "ieee" would
      lower the K = C dots to FMA loops that spill, as in the MSGM kernels).
    - attn_fwd / attn_bwd: one (block, head) per program, its queries in QSPLIT sub-blocks
      of the [64, 128] score tile; fp32 dots are "ieee" (K = 16 or the sub-block: short FMA
      loops; "tf32x3" spills here). The fp32 forward runs 16 warps: with 8, Triton 3.6
      (torch 2.11's pin) spills 16-56 bytes on sm_90 and sm_80 (1 or 2 stages; 4 warps
      spill more), where Triton 3.9 does not; 16 warps keep the whole score tile in one
      pass and compile spill-free with both (QSPLIT = 2 at 8 warps would too).
      Top-k with select="sort" (`_SORT_LAUNCH`): 16-bit forwards run 4 warps, capped at
      232 registers; fp32 16 warps on 32-query sub-blocks (module doc, "Top-k selection").
    - prop: [CB = 16 channels, BLOCK_P = 64 output pixels] tiles, pixels along the lanes
      (the 9-tap x 4-corner gathers are register hungry: [16, C] spilled at 32 pixels).
    The interpreter computes fp32 dots exactly whatever the precision setting.
    """
    fp32 = dtype == torch.float32
    if kernel == "qkv":
        # Row tiles of BW padded-grid pixels, a multiple of the block and >= 2 blocks (the
        # reflection sources of a row's padded columns then lie in its last tile).
        bw = max(16, (1024 if fp32 else 2048) // channels, 2 * block)
        constexprs = {"C": channels, "BW": bw, "BLOCK": block,
                      "DOT_PRECISION": "tf32x3" if fp32 else "ieee"}  # fmt: skip
        return KernelConfig(constexprs, num_warps=8, num_stages=1)
    if kernel == "prop":
        return KernelConfig({"CB": 16, "BX": 64}, num_warps=4, num_stages=1)
    if select not in ("bisect", "sort", "saved"):
        raise ValueError(f"select must be 'bisect', 'sort' or 'saved', not {select!r}")
    select = select if sparse else "none"
    warps, qsplit = (_SORT_LAUNCH if select == "sort" else _LAUNCH)[kernel, fp32]
    constexprs = {
        "C": channels, "HEADS": heads, "D": channels // heads, "BLOCK": block, "HALO": halo,
        "KEYS_PAD": keys_pad(block, halo), "SPARSE": sparse, "SELECT": select,
        "DOT_PRECISION": "ieee",
        "QSPLIT": max(1, min(qsplit, block * block // 16)),  # tl.dot needs >= 16 rows
    }  # fmt: skip
    # The backward reaches 255 registers on sm_80 under triton 3.6 (232 under 3.9), so does
    # the 16-bit sorting forward (198 under 3.9): capped at check-kernels' 232 headroom,
    # ptxas fits them without spills under both.
    maxnreg = 232 if kernel == "attn_bwd" or (select == "sort" and not fp32) else None
    return KernelConfig(constexprs, num_warps=warps, num_stages=1, maxnreg=maxnreg)


# (kernel, fp32) -> (num_warps, QSPLIT); see `esam_config` for the fp32 forward's 16 warps.
# The fp32 backward takes 16-query sub-blocks: with 32 it spilled under triton 3.6 (C = 16,
# 32) and 3.9 (top-k) since the keys load as pixel pairs (`_key_slots`).
# The 16-bit forward runs one warpgroup: at 8 warps both warpgroups held all 64 query rows
# (the same registers a thread, 134 vs 126 on sm_90) and did the same work twice: 8 x
# 1,952 against 4 x 2,176 warp instructions per program (sm_90, triton 3.9, no spills;
# 157-159 registers on sm_80, 135 sm_90 under 3.6).
_LAUNCH = {
    ("attn_fwd", False): (4, 1),
    ("attn_fwd", True): (16, 1),
    ("attn_bwd", False): (8, 2),
    ("attn_bwd", True): (8, 4),
}
# The same for the top-k kernels with SELECT = "sort" (the sorted [BQ, KEYS_PAD] tile
# costs registers: see the module doc's "Top-k selection").
# 16-bit: 4 warps, one warpgroup for the 64 queries (8 warps put two on the same rows,
# each doing the whole sort); fp32 (FMA dots): 16 warps on [32, KEYS_PAD] sub-blocks.
# The backward's entries serve tests only (it loads the forward's thresholds: `GPU_SELECT`).
_SORT_LAUNCH = {
    ("attn_fwd", False): (4, 1),
    ("attn_fwd", True): (16, 2),
    ("attn_bwd", False): (8, 2),
    ("attn_bwd", True): (8, 4),
}


def supported(channels: int, heads: int, block: int, halo: int, dtype: torch.dtype) -> bool:
    """Whether these kernels run this ESAM shape (tl.dot needs dims that are powers of 2 >= 16)."""
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0
    d = channels // heads
    return (
        dtype in KERNEL_DTYPES and pow2(channels) and channels <= 256 and pow2(d)
        and pow2(block * block) and keys_pad(block, halo) <= 256
    )  # fmt: skip


def padded_grid(height: int, width: int, block: int) -> tuple[int, int, int, int]:
    """(Hh, Wh, Hp, Wp): the max-pooled grid and its size rounded up to whole blocks."""
    hh, wh = height // 2, width // 2
    return hh, wh, cdiv(hh, block) * block, cdiv(wh, block) * block


def qkv_fwd(v: torch.Tensor, qkv_weight: torch.Tensor, block: int) -> torch.Tensor:
    """q, k, v of ESAM at the padded quarter-resolution grid: (N, 3C, Hp, Wp), v's dtype."""
    n, c, h, w = v.shape
    hh, wh, hp, wp = padded_grid(h, w, block)
    cfg = esam_config("qkv", c, 1, block, 0, v.dtype)
    tiles_per_row = cdiv(wp, cfg.constexprs["BW"])
    qkv = empty((n, 3 * c, hp, wp), dtype=v.dtype, device=v.device)
    weight = qkv_weight.reshape(3 * c, c).float().contiguous()  # cast in the kernel
    esam_qkv_fwd_kernel[(n * hp * tiles_per_row,)](
        v, weight, qkv, hh, wh, hp, wp, tiles_per_row, *v.stride(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )  # fmt: skip
    return qkv


def _rel(rel_h: torch.Tensor, rel_w: torch.Tensor):
    return rel_h.float().contiguous(), rel_w.float().contiguous()


def lse_shape(n: int, heads: int, hp: int, wp: int, topk: int) -> tuple[int, int, int]:
    """Shape of `attn_fwd`'s lse: per (image, head) the Hp * Wp log-sum-exps, then with
    top-k (topk > 0) as many thresholds."""
    return (n, heads, (1 + (topk > 0)) * hp * wp)


def attn_fwd(qkv, rel_h, rel_w, *, heads: int, block: int, halo: int, topk: int):
    """(o, lse): o (N, C, Hp, Wp) in qkv's dtype, lse (N, heads, Hp * Wp) fp32; with
    top-k (N, heads, 2 Hp * Wp): per (image, head) the log-sum-exps, then the thresholds
    (each query's k-th largest score, which `attn_bwd` keeps by).

    topk: 0 for dense, else 1 <= topk < window^2 (threshold semantics, ties kept).
    """
    n, c3, hp, wp = qkv.shape
    c = c3 // 3
    cfg = esam_config("attn_fwd", c, heads, block, halo, qkv.dtype, sparse=topk > 0,
                      select=topk_select("attn_fwd", qkv.device))  # fmt: skip
    blocks_w, blocks = wp // block, (hp // block) * (wp // block)
    o = empty((n, c, hp, wp), dtype=qkv.dtype, device=qkv.device)
    lse = empty(lse_shape(n, heads, hp, wp, topk), dtype=torch.float32, device=qkv.device)
    esam_attn_fwd_kernel[(n * blocks * heads,)](
        qkv, *_rel(rel_h, rel_w), o, lse, hp, wp, blocks_w, blocks, max(topk, 1),
        (c // heads) ** -0.5, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **cfg.constexprs,
    )  # fmt: skip
    return o, lse


def attn_bwd(do, qkv, rel_h, rel_w, o, lse, part, *, heads: int, block: int, halo: int,
             topk: int):  # fmt: skip
    """(dq, dkv_windows) of the attention at (qkv, rel).

    dq: (N, C, Hp, Wp) fp32; dkv windows: (2, N, C * win^2, blocks) fp32, dK then dV, in
    `F.fold` layout (folded inside `ssiu.kernels.esam_bwd.qkv_bwd`). lse: `attn_fwd`'s (with
    top-k also the thresholds, the keep set's). The partials of
    drel_h, drel_w ((win, D/2) fp32 each) go to part, a [programs, 2 win D/2] fp32 view of
    the op's partials buffer.
    """
    n, c3, hp, wp = qkv.shape
    c = c3 // 3
    win, d = block + 2 * halo, c // heads
    cfg = esam_config("attn_bwd", c, heads, block, halo, qkv.dtype, sparse=topk > 0,
                      select=topk_select("attn_bwd", qkv.device))  # fmt: skip
    if lse.shape != lse_shape(n, heads, hp, wp, topk):
        raise ValueError(f"lse of shape {tuple(lse.shape)} is not attn_fwd's at topk={topk}")
    blocks_w, blocks = wp // block, (hp // block) * (wp // block)
    num_tiles = n * blocks * heads
    f32 = dict(dtype=torch.float32, device=qkv.device)
    dq = empty((n, c, hp, wp), **f32)
    dkvw = empty((2, n, c * win * win, blocks), **f32)  # dK, dV windows, one buffer
    dkw, dvw = dkvw[0], dkvw[1]
    esam_attn_bwd_kernel[(part.shape[0],)](
        qkv, *_rel(rel_h, rel_w), o.contiguous(), do.float().contiguous(), lse,
        dq, dkw, dvw, part, hp, wp, blocks_w, blocks, num_tiles, max(topk, 1),
        part.stride(0), d**-0.5, **cfg.launch_options(), **cfg.constexprs,
    )  # fmt: skip
    return dq, dkvw


def prop_fwd(o, prop_weight, prop_bias, v, *, add_input: bool,
             sub: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """LocalProp(o) cropped to v's size (+ v) (- sub): (N, C, H, W) contiguous in v's
    dtype; sub (N, C, H, W) in v's dtype."""
    n, c, h, w = v.shape
    hp, wp = o.shape[-2:]
    cfg = esam_config("prop", c, 1, 1, 0, v.dtype)
    tiles_per_row = cdiv(w, cfg.constexprs["BX"])
    out = empty((n, c, h, w), dtype=v.dtype, device=v.device)
    esam_prop_fwd_kernel[(n * h * tiles_per_row, c // cfg.constexprs["CB"])](
        o.contiguous(), prop_weight.float().contiguous(), prop_bias.float().contiguous(), v,
        o if sub is None else sub.contiguous(), out, h, w, hp, wp, tiles_per_row,
        *v.stride(), (hp - 1) / (2 * hp - 1), (wp - 1) / (2 * wp - 1), ADD_INPUT=add_input,
        HAS_SUB=sub is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **cfg.constexprs,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------
# Registry: every (kernel, config) the launchers above pick for the released ESAM
# (C = 64, 4 heads of 16, block 8, halo 1), dense and top-k, fp32/fp16/bf16.

_RELEASED = dict(channels=64, heads=4, block=8, halo=1)  # the released ESAM


def _register(kernel, name: str, pointers: str, scalars: tuple, floats=(), sparse=(False,),
              extras=(None,)):  # fmt: skip
    fields = [p.split(":") for p in pointers.split()]
    # Dense, then top-k as the interpreter and as a GPU runs it (`topk_select`).
    selects = dict.fromkeys((INTERPRETER_SELECT.get(name), GPU_SELECT.get(name)))
    modes = [(sp, sel) for sp in sparse for sel in (selects if sp else ["bisect"])]
    configs = tuple(
        DtypeConfig.of(esam_config(name, **_RELEASED, dtype=dt, sparse=sp, select=sel), dt, extra)
        for sp, sel in modes
        for extra in extras
        for dt in KERNEL_DTYPES
    )
    register(KernelSpec(kernel.__name__, kernel, dtype_signature(fields, scalars, floats), configs))


_V_STRIDES = ("sv_n", "sv_c", "sv_h", "sv_w")
_register(
    esam_qkv_fwd_kernel, "qkv", "v_ptr:dt w_ptr qkv_ptr:dt",
    ("Hh", "Wh", "Hp", "Wp", "tiles_per_row", *_V_STRIDES),
)  # fmt: skip
_register(
    esam_attn_fwd_kernel, "attn_fwd", "qkv_ptr:dt relh_ptr relw_ptr o_ptr:dt lse_ptr",
    ("Hp", "Wp", "blocks_w", "blocks_per_image", "topk"), ("scale",), (False, True),
)  # fmt: skip
_register(
    esam_attn_bwd_kernel, "attn_bwd",
    "qkv_ptr:dt relh_ptr relw_ptr o_ptr:dt do_ptr lse_ptr dq_ptr dkw_ptr dvw_ptr drel_part_ptr",
    ("Hp", "Wp", "blocks_w", "blocks_per_image", "num_tiles", "topk", "part_stride"),
    ("scale",), (False, True),
)  # fmt: skip
_register(
    esam_prop_fwd_kernel, "prop", "o_ptr:dt pw_ptr pb_ptr v_ptr:dt sub_ptr:dt out_ptr:dt",
    ("H", "W", "Hp", "Wp", "tiles_per_row", *_V_STRIDES), ("scale_h", "scale_w"),
    extras=tuple({"ADD_INPUT": a, "HAS_SUB": s} for a in (True, False) for s in (False, True)),
)  # fmt: skip

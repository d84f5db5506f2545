"""Fused MSGM (mixed-scale gating module), forward and backward, as Triton kernels.

    g   = 1x1_a(x)                            # gate
    e   = 1x1_c(x)                            # expand
    s   = dw3x3_reflect(e)                    # depthwise 3x3, reflect padding 1
    v   = 1x1_d(s)                            # reduce
    m   = GELU_erf(g) * v
    out = 1x1_o(m) (+ residual)

Strategy
--------
Tiles are BLOCK_P consecutive pixels of one image row, all C channels: a [BLOCK_P, C]
tile (`_tile`). The row h is one scalar and the first column a multiple of BLOCK_P, so
with a unit column stride (what the JIT sees for NCHW maps) every activation load and
store has provably contiguous, aligned pixel offsets: lanes run along pixels and move 8
or 16 bytes each.

Forward (`msgm_fwd_kernel`): one program per tile. Each 1x1 is a `tl.dot` of the tile
with a [C, C] weight. The depthwise 3x3 needs 1x1_c at the 8 neighbours of every pixel;
instead of writing e to memory the kernel recomputes it. Per tap row (a scalar reflected
row) it loads the row tile and the aligned HALO-pixel chunks either side; the -1 / +1
column taps are made in registers by dots with 0/1 shift matrices that include the
reflection (`_shift`, `_shifted`). Loading the taps directly would be misaligned by one
element: scalar 2-byte loads (what the flat-tile version of this kernel compiled to).
fp16/bf16 (`_expand_depthwise`) apply 1x1_c to each row's tile and halo chunks (3 dots a
row, not one per tap) and, because the per-channel tap weights commute with a column
shift, sum the three rows of each column offset first: two shifts a tile, not six. The
two shifted sums are rounded to x's dtype where they enter the shift dot (the reference
rounds e itself); fp16 errors against float64 are as before within ~15%. Nothing but
`out` leaves the chip. `msgm_fwd_pair_kernel` runs the SS-ReM step's S1 and S2 (two
MSGMs of the same normalised input) in one launch, their programs interleaved so that
the second reads each x tile from L2 (one launch and one DRAM read of x fewer per step;
the pair compiles to 231 registers on sm_90 at the training workload, capped at 232,
222 at 180x320, 128 on sm_80, no spills).

Backward, two kernels, recomputing every intermediate from x (only the inputs are saved):
  1. `msgm_bwd_gate_kernel`, per tile: recompute g, s, v, m; from dout form the
     gradients of 1x1_o, 1x1_d, all biases but 1x1_c's, and two scratch maps in x's
     dtype (each is rounded to it where it enters a dot anyway): dg = d(1x1_a output)
     and ds = d(dw3x3 output).
  2. `msgm_bwd_dx_kernel`, per tile q: the adjoint of the reflect-padded depthwise
     conv gathers, for each tap, ds from every pixel p whose reflected neighbour is q:
     rows by scalar selection (p = q - d, plus the border row 0 or H-1 when q is 1 or
     H-2, `_gather_row`), columns by the transposed shift matrices (fp32: direct
     tap loads in both backward kernels and the forward, see the SASS notes below). That gives de,
     then the gradients of the dw weights (sum_q e * gathered ds), of 1x1_c and 1x1_a
     (from dg and x), and dx = de @ W_c + dg @ W_a.
In the fused SS-ReM step the dx kernel of MSGM_z, the last backward to produce d a_n,
also runs the step LayerNorm's backward on its tile (HAS_LN, statistics recomputed from
the LayerNorm's input): it writes d a and the LayerNorm's partials, d a_n never leaves
the chip (sm_90 220 registers, sm_80 230 capped, no spills, both tritons).
Weight gradients are fp32 per-program partial sums (programs loop over tiles, one per SM:
one CTA of either kernel fits an SM), packed in one buffer and reduced in a fixed order by
one `partials.sum_partials` launch; no atomics. The op returns them flat and the autograd
formula views them per parameter (`gradient_views`): no per-parameter copy.

Floors and what the kernels cost (per pixel, C = 64, bf16; modelled, not measured)
------------------------------------------------------------------------------------
Forward floor: read x and the residual, write out: 384 bytes (256 without residual);
four 1x1 (4 * 2 C^2) plus the dw 3x3: about 34 kFLOP. The kernel moves the floor bytes
from DRAM when the tap rows and halos hit L1/L2 (each x row is read by 3 tile rows plus
2 HALO chunks per neighbour tile). Its dots per pixel, 16-bit (MACs = C^2 = 4096 units):
1x1_c on 3 rows of (BLOCK_P + 2 HALO) pixels, 3 (BLOCK_P + 32) / BLOCK_P units; the two
column shifts, (2 BLOCK_P + 48) / 64 units; 1x1_d, 1x1_a, 1x1_o, 3 units. At BLOCK_P =
64 (sm_90) that is 10.3 units, 84 kFLOP (2.5x the floor; 20.3 units, 166 kFLOP, with
1x1_c at each of the 9 taps and six shifts before), at BLOCK_P = 32 (sm_80) 10.8 units,
88 kFLOP (was 17.3, 141 kFLOP): all on tensor cores, the price of writing no e map.
Backward floor: read x, dout; write dx: 384 bytes; about 100 kFLOP (dX and dW of four
1x1 plus the recomputed forward). The two kernels read x twice, dout, ds and dg and write
dg, ds, dx: 1024 bytes (2.7x; 1536 while dg, ds were fp32). The gate kernel recomputes s
as the forward does and adds 6 units (v, g; dW_o, dm, dW_d, ds): 13.8 units at BLOCK_P
= 32 (sm_90; 20.3 before the column sums), 16.3 at 16 (sm_80; 18.8); the dx kernel
(e, the adjoint shifts of three rows, dW_c, dW_a and dx's two dots) 10.3 and 8.8.

SASS at the training workload (x4, N = 40, 64x64 LR, bf16, C = 64; the JIT's
specialisation: unit column strides, sizes and strides divisible by 16), triton 3.9,
registers and static global accesses (LDG/STG by bytes per lane), flat tiles -> row
tiles. Triton 3.6 not checked (no side venv here).
  fwd (+res)  sm_90  78 -> 104 regs; 2-byte LDG 8 -> 0; 8/16-byte 18 -> 19 of 25
              sm_80  80 -> 104 regs; the same mix
  bwd_gate    sm_90 181 -> 172 regs; 2-byte LDG 36 -> 0; 8/16-byte 26 -> 35 of 57
              sm_80 184 -> 172 regs; 2-byte LDG 36 -> 0; 8/16-byte 26 -> 29 of 39
  bwd_dx      sm_90 136 -> 167 regs; 8/16-byte 19 -> 25 of 32 (the 4-byte are fp32
              weights/biases and partial-sum stores)
              sm_80 186 -> 212 regs; the same mix
At 1x3x180x320 inference (H, tile counts not multiples of 16) the forward keeps the mix:
bf16 sm_90 102 regs, no 2-byte access, 18 of 24 at 8/16 bytes; fp32 133 regs, 23 of 33.
The remaining 4-byte accesses are the [C] fp32 bias and depthwise-weight loads and the
[4, C] bias partial stores. fp32 (direct, coalesced 4-byte tap loads in all three kernels:
3xTF32/TF32 shift dots would cost 250+ registers):
  fwd (+res)  sm_90 136 -> 133 regs, sm_80 127 -> 128; 8/16-byte 24 of 34 accesses
  bwd_gate    sm_90 184 -> 175, sm_80 255 -> 254 regs; 4-byte LDG 54 -> 10
  bwd_dx      sm_90 124 -> 124, sm_80 166 -> 172 regs; the same mix as before (the
              4-byte LDG are the coalesced, misaligned ds taps)

Precision: activations and weights enter `tl.dot` in the input dtype (fp32, fp16, bf16);
accumulation and every elementwise step are fp32, and the intermediates s, m (and in
backward dg, dv, de) are rounded to the input dtype only where they enter a dot. The
forward reads the 1x1 weights in fp32 and casts them in registers (`_weight`; autocast
hands fp32 weights to bf16 inputs), and writes the cast copy the backward reads (no cast
launch); biases and depthwise weights stay fp32. fp32 dots run on tensor cores:
"tf32x3" (3xTF32, about fp32 accuracy) in the forward, one TF32 product in the backward
(like cuDNN's default fp32 convolutions); "ieee" would lower to FMA loops that spill
heavily at C = 64 (see `msgm_config`). The interpreter computes fp32 dots exactly
either way, so CPU tests see IEEE fp32.

Tolerances (ssiu.testing.TOLERANCES, against the float64 reference): fp32 atol 1e-5,
rtol 1e-4; fp16 5e-3 / 1e-2; bf16 4e-2 / 5e-2 (atol scaled by max |reference|).

Offsets: the image index and each image's base offset are int64 (program ids cast
first), so batches past 2**31 elements are safe. Offsets inside one image are int32
unless the launcher sees an image extent of 2**31 elements or more, where it picks the
INT64_INDEX=True variant (int64 [BLOCK_P, C] offset tiles cost registers: with them the
bf16 forward spills at BLOCK_P = 64).
"""

from __future__ import annotations

from itertools import product

import torch
import triton
import triton.language as tl
from ssiu.kernels.common import (
    KERNEL_DTYPES,
    TUNED_ARCH,
    DtypeConfig,
    cdiv,
    device_arch,
    dtype_signature,
    empty,
    needs_int64_index,
)
from ssiu.kernels.indexing import reflect
from ssiu.kernels.layer_norm import normalized, normalized_grad
from ssiu.kernels.partials import persistent_programs, split_flat, sum_partials
from ssiu.kernels.registry import KernelConfig, KernelSpec, register

TAPS = 9  # 3x3 depthwise taps, row-major (dh, dw) in {0, 1, 2}^2
TAPS_PAD = 16  # the tap axis of a register tile, padded to a power of two
HALO = 16  # pixels of the aligned chunks either side of a row tile (tl.dot needs K >= 16)


@triton.jit
def _gelu_and_grad(g):
    """GELU (erf form) of g and its derivative, fp32."""
    cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))  # 1 / sqrt(2)
    pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
    return g * cdf, cdf + g * pdf


@triton.jit
def _weight(w_ptr, offs_c, C: tl.constexpr, TRANSPOSE: tl.constexpr, dtype: tl.constexpr):
    """A (C_out, C_in) fp32 1x1 weight as a [C, C] tile in `dtype` (the dots' operand
    type): W^T ([C_in, C_out]) if TRANSPOSE. Cast here, not by the launcher: no cast
    launch per weight per call, and the same rounding as the PyTorch cast."""
    if TRANSPOSE:
        w = tl.load(w_ptr + offs_c[None, :] * C + offs_c[:, None])  # [C_in, C_out]
    else:
        w = tl.load(w_ptr + offs_c[:, None] * C + offs_c[None, :])  # [C_out, C_in]
    return w.to(dtype)


@triton.jit
def _keep_weight(w_lo_ptr, index: tl.constexpr, w_t, offs_c, C: tl.constexpr, tile):
    """Tile 0's program stores the [C_in, C_out] tile w_t as block `index` of w_lo,
    (C_out, C_in)."""
    if tile == 0:
        ptr = w_lo_ptr + index * C * C + offs_c[:, None] * C + offs_c[None, :]
        tl.store(ptr, tl.trans(w_t))


@triton.jit
def _tile(tile, tiles_per_row, H, W, BLOCK_P: tl.constexpr, INT64_INDEX: tl.constexpr):
    """Image index n (int64), row h, first column w0, columns w and their mask of a tile.

    A tile is BLOCK_P consecutive pixels of one image row: h is one scalar (the row taps
    of the 3x3 are whole rows) and w0 a multiple of BLOCK_P, so the column offsets are
    provably contiguous and aligned, which lets every load put lanes on pixels.
    """
    tile = tl.cast(tile, tl.int64)
    row = tile // tiles_per_row  # n * H + h
    n = row // H
    if INT64_INDEX:
        h = row % H
        w0 = (tile % tiles_per_row) * BLOCK_P
        w = w0 + tl.arange(0, BLOCK_P).to(tl.int64)
    else:
        h = (row % H).to(tl.int32)
        w0 = (tile % tiles_per_row).to(tl.int32) * BLOCK_P
        w = w0 + tl.arange(0, BLOCK_P)
    return n, h, w0, w, w < W


@triton.jit
def _channels(C: tl.constexpr, INT64_INDEX: tl.constexpr):
    """Channel offsets 0..C-1 in the index type of the kernel variant."""
    offs_c = tl.arange(0, C)
    if INT64_INDEX:
        offs_c = offs_c.to(tl.int64)
    return offs_c


@triton.jit
def _shift(dst0, src0, W, d, ROWS: tl.constexpr, COLS: tl.constexpr, ADJOINT: tl.constexpr,
           dtype):  # fmt: skip
    """[ROWS, COLS] 0/1 matrix of the reflect-padded column shift by d (-1 or +1).

    Rows are the pixels dst0 + i, columns the pixels src0 + j of one image row. Forward:
    1 where reflect(dst + d) == src (a tap reads its neighbour). ADJOINT: 1 where
    reflect(src + d) == dst (the transpose: each pixel collects what its neighbours read
    from it). A dot with it moves a [COLS, C] tile along the pixel axis in registers:
    neighbour taps are then loaded as aligned tiles instead of one-element-misaligned,
    unvectorisable ones. 0/1 products accumulate exactly in fp32 (16-bit inputs).
    """
    dst = dst0 + tl.arange(0, ROWS)[:, None]
    src = src0 + tl.arange(0, COLS)[None, :]
    if ADJOINT:
        hit = reflect(src + d, W) == dst
    else:
        hit = reflect(dst + d, W) == src
    return tl.where(hit, 1.0, 0.0).to(dtype)


@triton.jit
def _row_chunks(row_ptr, w0, w, limit, offs_c, s_c, s_w, C: tl.constexpr,
                BLOCK_P: tl.constexpr, HALO: tl.constexpr):  # fmt: skip
    """The tile's pixels of one row and the aligned HALO-pixel chunks either side.

    Columns outside [0, limit) read 0: limit is W, or 0 for a row not to be read (a
    scalar bound, not a scalar mask: the interpreter rejects scalar & tensor masks).
    """
    chan = offs_c[None, :] * s_c
    b_mid = tl.load(row_ptr + w[:, None] * s_w + chan, mask=(w < limit)[:, None], other=0.0)
    w_prev = w0 - HALO + tl.arange(0, HALO)
    in_prev = (w_prev >= 0) & (w_prev < limit)
    b_prev = tl.load(row_ptr + w_prev[:, None] * s_w + chan, mask=in_prev[:, None], other=0.0)
    w_next = w0 + BLOCK_P + tl.arange(0, HALO)
    b_next = tl.load(row_ptr + w_next[:, None] * s_w + chan,
                     mask=(w_next < limit)[:, None], other=0.0)  # fmt: skip
    return b_mid, b_prev, b_next  # [BLOCK_P, C], [HALO, C], [HALO, C]


@triton.jit
def _shifted(b_mid, b_prev, b_next, w0, W, d, ADJOINT: tl.constexpr, BLOCK_P: tl.constexpr,
             HALO: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """The row tile moved by the column tap d (see `_shift`), fp32 [BLOCK_P, C].

    Forward, d = -1 reads w - 1 (the previous chunk at w0) and d = +1 reads w + 1 (the
    next chunk) or, at the image's last column, W - 2 (the previous chunk when that
    column starts a tile). The adjoint mirrors it: d = -1 collects from w + 1, d = +1
    from w - 1 and from W - 1.
    """
    dt = b_mid.dtype
    near, far = b_prev, b_next
    if ADJOINT:
        near, far = b_next, b_prev
    near0 = w0 - HALO
    far0 = w0 + BLOCK_P
    if ADJOINT:
        near0, far0 = far0, near0
    acc = tl.dot(_shift(w0, w0, W, d, BLOCK_P, BLOCK_P, ADJOINT, dt), b_mid,
                 input_precision=DOT_PRECISION)  # fmt: skip
    acc += tl.dot(_shift(w0, near0, W, d, BLOCK_P, HALO, ADJOINT, dt), near,
                  input_precision=DOT_PRECISION)  # fmt: skip
    if d > 0:
        acc += tl.dot(_shift(w0, far0, W, d, BLOCK_P, HALO, ADJOINT, dt), far,
                      input_precision=DOT_PRECISION)  # fmt: skip
    return acc


@triton.jit
def _column_tap(row_ptr, w, W, d, offs_c, sx_c, sx_w):
    """x at column reflect(w + d) of one row, loaded directly: [BLOCK_P, C].

    Offsets w + d are contiguous but one element off alignment (4-byte lanes on pixels
    for fp32, coalesced); the border pixel whose neighbour is outside (w + d == -1 or W)
    takes its reflection w - d from a second, mostly masked load. Pixels past the row
    (w >= W) load nothing: the backward multiplies them by a zero dout, and garbage read
    past the image could be Inf/NaN (0 * NaN would poison the weight gradients).
    """
    chan = offs_c[None, :] * sx_c
    ww = w + d
    inside = (ww >= 0) & (ww < W)
    b_x = tl.load(row_ptr + ww[:, None] * sx_w + chan, mask=inside[:, None], other=0.0)
    border = ((ww == -1) | (ww == W)) & (w < W)
    b_x += tl.load(row_ptr + (w - d)[:, None] * sx_w + chan, mask=border[:, None], other=0.0)
    return b_x


@triton.jit
def _expand_depthwise(x_img, h, w0, w, H, W, offs_c, sx_c, sx_h, sx_w, wc_t, bc_ptr,
                      wdw_ptr, bdw_ptr, C: tl.constexpr, BLOCK_P: tl.constexpr,
                      HALO: tl.constexpr, DOT_PRECISION: tl.constexpr):  # fmt: skip
    """s = dw3x3_reflect(1x1_c(x)) for one row tile, recomputing 1x1_c (e) from x.

    Per tap row: fp16/bf16 load the row tile and its two halo chunks aligned (lanes on
    pixels, 16 bytes each), apply 1x1_c to each, accumulate the three column offsets'
    weighted sums, and make the column taps of the two off-centre sums by `_shifted` in
    registers. fp32 loads each of the 9 column taps directly (`_column_tap`: 4-byte
    lanes, coalesced) and applies 1x1_c to it: its 3xTF32 shift dots would take the
    forward to 254 registers on sm_90.
    """
    dtype = x_img.dtype.element_ty
    b_bc = tl.load(bc_ptr + offs_c)  # [C] fp32
    b_s = tl.zeros([BLOCK_P, C], dtype=tl.float32) + tl.load(bdw_ptr + offs_c)[None, :]
    # Runtime loops (not static_range): unrolled, the compiler hoists the loads and
    # address tiles of every tap (row), and the kernel spills.
    if dtype == tl.float32:
        for tap in range(9):
            row_ptr = x_img + reflect(h + (tap // 3 - 1), H) * sx_h
            b_xn = _column_tap(row_ptr, w, W, tap % 3 - 1, offs_c, sx_c, sx_w)
            b_e = tl.dot(b_xn, wc_t, input_precision=DOT_PRECISION) + b_bc[None, :]
            b_s += b_e * tl.load(wdw_ptr + offs_c * 9 + tap)[None, :]
    else:
        # 1x1_c once per row chunk (mid and halos), not at every tap: the per-channel
        # tap weights commute with the column shift, so each column offset's three rows
        # are summed first and only the two off-centre sums are shifted (rounded to x's
        # dtype where they enter the shift dot, as the reference rounds e).
        b_l = tl.zeros([BLOCK_P, C], dtype=tl.float32)  # column offset -1: mid, prev
        b_l_prev = tl.zeros([HALO, C], dtype=tl.float32)
        b_r = tl.zeros([BLOCK_P, C], dtype=tl.float32)  # column offset +1: all three
        b_r_prev = tl.zeros([HALO, C], dtype=tl.float32)
        b_r_next = tl.zeros([HALO, C], dtype=tl.float32)
        for r in range(3):  # runtime loop, see above
            row_ptr = x_img + reflect(h + (r - 1), H) * sx_h
            b_mid, b_prev, b_next = _row_chunks(row_ptr, w0, w, W, offs_c, sx_c, sx_w, C,
                                                BLOCK_P, HALO)  # fmt: skip
            e_mid = tl.dot(b_mid, wc_t, input_precision=DOT_PRECISION) + b_bc[None, :]
            e_prev = tl.dot(b_prev, wc_t, input_precision=DOT_PRECISION) + b_bc[None, :]
            e_next = tl.dot(b_next, wc_t, input_precision=DOT_PRECISION) + b_bc[None, :]
            w_l = tl.load(wdw_ptr + offs_c * 9 + r * 3)[None, :]  # [1, C] fp32
            w_m = tl.load(wdw_ptr + offs_c * 9 + (r * 3 + 1))[None, :]
            w_r = tl.load(wdw_ptr + offs_c * 9 + (r * 3 + 2))[None, :]
            b_s += e_mid * w_m
            b_l += e_mid * w_l
            b_l_prev += e_prev * w_l
            b_r += e_mid * w_r
            b_r_prev += e_prev * w_r
            b_r_next += e_next * w_r
        b_l_prev = b_l_prev.to(dtype)  # the -1 shift reads no next chunk
        b_s += _shifted(b_l.to(dtype), b_l_prev, b_l_prev, w0, W, -1, False, BLOCK_P, HALO,
                        DOT_PRECISION)  # fmt: skip
        b_s += _shifted(b_r.to(dtype), b_r_prev.to(dtype), b_r_next.to(dtype), w0, W, 1, False,
                        BLOCK_P, HALO, DOT_PRECISION)  # fmt: skip
    return b_s  # [BLOCK_P, C] fp32


@triton.jit
def _msgm_fwd_tile(
    tile, x_ptr, res_ptr, res2_ptr, out_ptr, w_lo_ptr,
    wa_ptr, ba_ptr, wc_ptr, bc_ptr, wdw_ptr, bdw_ptr, wd_ptr, bd_ptr, wo_ptr, bo_ptr,
    H, W, tiles_per_row,
    sx_n, sx_c, sx_h, sx_w, sr_n, sr_c, sr_h, sr_w,
    C: tl.constexpr, BLOCK_P: tl.constexpr, HALO: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_RESIDUAL2: tl.constexpr, INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out = MSGM(x) (+ residual) (+ residual2) on one row tile (see `msgm_fwd_kernel`)."""
    offs_c = _channels(C, INT64_INDEX)
    dtype = x_ptr.dtype.element_ty
    n, h, w0, w, mask_p = _tile(tile, tiles_per_row, H, W, BLOCK_P, INT64_INDEX)
    x_img = x_ptr + n * sx_n
    # The value branch first, so that g is not live across the tap loop.
    wc_t = _weight(wc_ptr, offs_c, C, True, dtype)  # [C, C]
    _keep_weight(w_lo_ptr, 1, wc_t, offs_c, C, tile)
    b_s = _expand_depthwise(x_img, h, w0, w, H, W, offs_c, sx_c, sx_h, sx_w, wc_t, bc_ptr,
                            wdw_ptr, bdw_ptr, C, BLOCK_P, HALO, DOT_PRECISION)  # fmt: skip
    wd_t = _weight(wd_ptr, offs_c, C, True, dtype)
    _keep_weight(w_lo_ptr, 2, wd_t, offs_c, C, tile)
    b_v = tl.dot(b_s.to(dtype), wd_t, input_precision=DOT_PRECISION)  # [BLOCK_P, C]
    b_v += tl.load(bd_ptr + offs_c)[None, :]
    ptr_x = x_img + h * sx_h + (w[:, None] * sx_w + offs_c[None, :] * sx_c)
    b_x = tl.load(ptr_x, mask=mask_p[:, None], other=0.0)  # [BLOCK_P, C]
    wa_t = _weight(wa_ptr, offs_c, C, True, dtype)
    _keep_weight(w_lo_ptr, 0, wa_t, offs_c, C, tile)
    b_g = tl.dot(b_x, wa_t, input_precision=DOT_PRECISION)  # [BLOCK_P, C]
    b_g += tl.load(ba_ptr + offs_c)[None, :]
    b_gelu, _ = _gelu_and_grad(b_g)
    b_m = (b_gelu * b_v).to(dtype)  # [BLOCK_P, C]
    wo_t = _weight(wo_ptr, offs_c, C, True, dtype)
    _keep_weight(w_lo_ptr, 3, wo_t, offs_c, C, tile)
    b_out = tl.dot(b_m, wo_t, input_precision=DOT_PRECISION) + tl.load(bo_ptr + offs_c)[None, :]
    if HAS_RESIDUAL:
        ptr_r = res_ptr + n * sr_n + h * sr_h + (w[:, None] * sr_w + offs_c[None, :] * sr_c)
        b_out += tl.load(ptr_r, mask=mask_p[:, None], other=0.0).to(tl.float32)
    offs_out = n * C * H * W + h * W + (offs_c[None, :] * (H * W) + w[:, None])
    if HAS_RESIDUAL2:
        b_out += tl.load(res2_ptr + offs_out, mask=mask_p[:, None], other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_out, b_out.to(dtype), mask=mask_p[:, None])


@triton.jit
def msgm_fwd_kernel(
    x_ptr, res_ptr, res2_ptr, out_ptr, w_lo_ptr,
    wa_ptr, ba_ptr, wc_ptr, bc_ptr, wdw_ptr, bdw_ptr, wd_ptr, bd_ptr, wo_ptr, bo_ptr,
    H, W, tiles_per_row,
    sx_n, sx_c, sx_h, sx_w, sr_n, sr_c, sr_h, sr_w,
    C: tl.constexpr, BLOCK_P: tl.constexpr, HALO: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    HAS_RESIDUAL2: tl.constexpr, INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """out (N, C, H, W contiguous) = MSGM(x) (+ residual) (+ residual2); x, residual
    strided, residual2 contiguous (the fused SS-ReM step's second addend).

    The program of tile 0 also writes the four 1x1 weights in x's dtype to w_lo ([4, C, C]: W_a,
    W_c, W_d, W_o, each (C_out, C_in)): the backward's operands, cast once per step
    here instead of once per kernel by the launcher (their fp32 loads, hoisted out of
    the backward's tile loops, would cost 16 registers each).

    One tile per program (no tile loop: with one, the compiler keeps the four [C, C]
    weight tiles live across iterations and the fp32 variant spills).
    """
    _msgm_fwd_tile(
        tl.program_id(0), x_ptr, res_ptr, res2_ptr, out_ptr, w_lo_ptr,
        wa_ptr, ba_ptr, wc_ptr, bc_ptr, wdw_ptr, bdw_ptr, wd_ptr, bd_ptr, wo_ptr, bo_ptr,
        H, W, tiles_per_row, sx_n, sx_c, sx_h, sx_w, sr_n, sr_c, sr_h, sr_w,
        C, BLOCK_P, HALO, HAS_RESIDUAL, HAS_RESIDUAL2, INT64_INDEX, DOT_PRECISION,
    )  # fmt: skip


@triton.jit
def msgm_fwd_pair_kernel(
    x_ptr, res2_ptr, out_ptr, w_lo_ptr,
    wa_ptr, ba_ptr, wc_ptr, bc_ptr, wdw_ptr, bdw_ptr, wd_ptr, bd_ptr, wo_ptr, bo_ptr,
    out2_ptr, w_lo2_ptr,
    wa2_ptr, ba2_ptr, wc2_ptr, bc2_ptr, wdw2_ptr, bdw2_ptr, wd2_ptr, bd2_ptr, wo2_ptr, bo2_ptr,
    H, W, tiles_per_row,
    C: tl.constexpr, BLOCK_P: tl.constexpr, HALO: tl.constexpr, INT64_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The SS-ReM step's S1 and S2 in one launch: out = MSGM_1(x) + x + residual2 and
    out2 = MSGM_2(x), two MSGMs with their own weights on the same x (contiguous NCHW:
    the step's LayerNorm output; unit strides known to the compiler in every build).

    Programs 2t and 2t + 1 run tile t of the first and of the second MSGM: neighbours in
    launch order, so they run at about the same time and the second reads x's tile (and
    its tap rows) from L2: x leaves DRAM once for both. Each writes its own w_lo.
    """
    pid = tl.program_id(0)
    tile = pid // 2
    s_h = W
    if INT64_INDEX:
        s_h = W.to(tl.int64)
    s_c = H * s_h
    s_n = C * s_c
    if pid % 2 == 0:
        _msgm_fwd_tile(
            tile, x_ptr, x_ptr, res2_ptr, out_ptr, w_lo_ptr,
            wa_ptr, ba_ptr, wc_ptr, bc_ptr, wdw_ptr, bdw_ptr, wd_ptr, bd_ptr, wo_ptr, bo_ptr,
            H, W, tiles_per_row, s_n, s_c, s_h, 1, s_n, s_c, s_h, 1,
            C, BLOCK_P, HALO, True, True, INT64_INDEX, DOT_PRECISION,
        )  # fmt: skip
    else:
        _msgm_fwd_tile(
            tile, x_ptr, x_ptr, res2_ptr, out2_ptr, w_lo2_ptr,
            wa2_ptr, ba2_ptr, wc2_ptr, bc2_ptr, wdw2_ptr, bdw2_ptr, wd2_ptr, bd2_ptr, wo2_ptr,
            bo2_ptr, H, W, tiles_per_row, s_n, s_c, s_h, 1, s_n, s_c, s_h, 1,
            C, BLOCK_P, HALO, False, False, INT64_INDEX, DOT_PRECISION,
        )  # fmt: skip


@triton.jit
def msgm_bwd_gate_kernel(
    x_ptr, dout_ptr, dout2_ptr, dg_ptr, ds_ptr,
    wa_ptr, ba_ptr, wc_ptr, bc_ptr, wdw_ptr, bdw_ptr, wd_ptr, bd_ptr, wo_ptr,
    dwd_part_ptr, dwo_part_ptr, dbias_part_ptr,
    H, W, tiles_per_row, num_tiles, part_stride,
    sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
    C: tl.constexpr, BLOCK_P: tl.constexpr, HALO: tl.constexpr, HAS_DOUT2: tl.constexpr,
    INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Backward through 1x1_o, the GELU gate and 1x1_d.

    With HAS_DOUT2 the output gradient is dout - dout2 (dout2 contiguous, rounded to x's
    dtype as a separate subtraction would): the fused SS-ReM step's beta gradient.

    Writes dg = d(1x1_a output) and ds = d(dw3x3 output) (x's dtype, contiguous NCHW:
    both are rounded to it where they enter a dot anyway) and this program's partial
    sums of dW_d, dW_o ([C, C] each) and of the biases of 1x1_a, 1x1_d, 1x1_o and dw3x3
    (rows 0..3 of a [4, C] block). dW_a and dx through 1x1_a are left to
    `msgm_bwd_dx_kernel`, which loads x anyway: two [C, C] accumulators per kernel
    instead of three here keeps the fp32 variant from spilling.
    """
    pid = tl.program_id(0)
    HW = H * W
    offs_c = _channels(C, INT64_INDEX)
    dtype = x_ptr.dtype.element_ty
    acc_wd = tl.zeros([C, C], dtype=tl.float32)
    acc_wo = tl.zeros([C, C], dtype=tl.float32)
    acc_ba = tl.zeros([C], dtype=tl.float32)
    acc_bd = tl.zeros([C], dtype=tl.float32)
    acc_bo = tl.zeros([C], dtype=tl.float32)
    acc_bdw = tl.zeros([C], dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        n, h, w0, w, mask_p = _tile(tile, tiles_per_row, H, W, BLOCK_P, INT64_INDEX)
        x_img = x_ptr + n * sx_n
        # Recompute the forward up to m (value branch first, as in the forward kernel).
        wc_t = _weight(wc_ptr, offs_c, C, True, dtype)
        b_s = _expand_depthwise(x_img, h, w0, w, H, W, offs_c, sx_c, sx_h, sx_w, wc_t,
                                bc_ptr, wdw_ptr, bdw_ptr, C, BLOCK_P, HALO,
                                DOT_PRECISION)  # fmt: skip
        b_s = b_s.to(dtype)
        wd_t = _weight(wd_ptr, offs_c, C, True, dtype)
        b_v = tl.dot(b_s, wd_t, input_precision=DOT_PRECISION)  # [BLOCK_P, C]
        b_v += tl.load(bd_ptr + offs_c)[None, :]
        ptr_x = x_img + h * sx_h + (w[:, None] * sx_w + offs_c[None, :] * sx_c)
        b_x = tl.load(ptr_x, mask=mask_p[:, None], other=0.0)  # [BLOCK_P, C]
        wa_t = _weight(wa_ptr, offs_c, C, True, dtype)
        b_g = tl.dot(b_x, wa_t, input_precision=DOT_PRECISION)  # [BLOCK_P, C]
        b_g += tl.load(ba_ptr + offs_c)[None, :]
        b_gelu, b_dgelu = _gelu_and_grad(b_g)  # [BLOCK_P, C] each
        b_m = (b_gelu * b_v).to(dtype)
        # Through 1x1_o; masked pixels have dout = 0, so they add nothing below.
        ptr_do = dout_ptr + n * sd_n + h * sd_h + (w[:, None] * sd_w + offs_c[None, :] * sd_c)
        b_do = tl.load(ptr_do, mask=mask_p[:, None], other=0.0)  # [BLOCK_P, C]
        if HAS_DOUT2:
            offs_do2 = n * C * HW + h * W + (offs_c[None, :] * HW + w[:, None])
            b_do2 = tl.load(dout2_ptr + offs_do2, mask=mask_p[:, None], other=0.0)
            b_do = (b_do.to(tl.float32) - b_do2.to(tl.float32)).to(dtype)
        acc_wo += tl.dot(tl.trans(b_do), b_m, input_precision=DOT_PRECISION)  # [C_out, C_in]
        acc_bo += tl.sum(b_do.to(tl.float32), axis=0)
        wo = _weight(wo_ptr, offs_c, C, False, dtype)
        b_dm = tl.dot(b_do, wo, input_precision=DOT_PRECISION)  # [BLOCK_P, C]
        # Through the gate: m = gelu(g) * v.
        b_dg = b_dm * b_v * b_dgelu  # [BLOCK_P, C] fp32
        acc_ba += tl.sum(b_dg, axis=0)
        b_dv = (b_dm * b_gelu).to(dtype)
        acc_wd += tl.dot(tl.trans(b_dv), b_s, input_precision=DOT_PRECISION)
        acc_bd += tl.sum(b_dv.to(tl.float32), axis=0)
        wd = _weight(wd_ptr, offs_c, C, False, dtype)
        b_ds = tl.dot(b_dv, wd, input_precision=DOT_PRECISION)  # [BLOCK_P, C] fp32
        acc_bdw += tl.sum(b_ds, axis=0)
        offs_out = n * C * HW + h * W + (offs_c[None, :] * HW + w[:, None])
        tl.store(dg_ptr + offs_out, b_dg.to(dtype), mask=mask_p[:, None])
        tl.store(ds_ptr + offs_out, b_ds.to(dtype), mask=mask_p[:, None])
    pid64 = pid.to(tl.int64)
    offs_cc = offs_c[:, None] * C + offs_c[None, :]
    tl.store(dwd_part_ptr + pid64 * part_stride + offs_cc, acc_wd)
    tl.store(dwo_part_ptr + pid64 * part_stride + offs_cc, acc_wo)
    ptr_bias = dbias_part_ptr + pid64 * part_stride + offs_c
    tl.store(ptr_bias, acc_ba)
    tl.store(ptr_bias + C, acc_bd)
    tl.store(ptr_bias + 2 * C, acc_bo)
    tl.store(ptr_bias + 3 * C, acc_bdw)


@triton.jit
def _gather_row(ds_img, h, dh, w0, w, H, W, offs_c, C: tl.constexpr, BLOCK_P: tl.constexpr,
                HALO: tl.constexpr):  # fmt: skip
    """ds summed over the rows p whose dh neighbour, reflected, is row h (fp32 chunks).

    The sources are p = h - dh (if inside the image) and, for dh != 0, the border row
    whose outside neighbour reflects onto h: p = 0 when h == 1 (dh = -1), p = H - 1 when
    h == H - 2 (dh = +1). Row selection is scalar; the column adjoint is `_shifted`.
    """
    HW = H * W
    p1 = h - dh
    ok1 = (p1 >= 0) & (p1 < H)
    p2 = tl.where(dh < 0, 0, H - 1)
    ok2 = ((dh < 0) & (h == 1)) | ((dh > 0) & (h == H - 2))
    lim1 = tl.where(ok1, W, 0)
    lim2 = tl.where(ok2, W, 0)
    m1, l1, r1 = _row_chunks(ds_img + p1 * W, w0, w, lim1, offs_c, HW, 1, C, BLOCK_P, HALO)
    m2, l2, r2 = _row_chunks(ds_img + p2 * W, w0, w, lim2, offs_c, HW, 1, C, BLOCK_P, HALO)
    f32 = tl.float32
    return m1.to(f32) + m2.to(f32), l1.to(f32) + l2.to(f32), r1.to(f32) + r2.to(f32)


@triton.jit
def _gather_tap(ds_img, h, w, H, W, offs_c, d_h, d_w):
    """fp32 ds gathered for tap (d_h, d_w) by direct loads: [BLOCK_P, C] fp32.

    Sources as in `_gather_row`, per axis: p = q - d, and for d != 0 the border pixel
    p = q + d when q is 1 (d = -1) or size - 2 (d = +1). Rows are scalar conditions,
    folded into column bounds (the interpreter rejects scalar & tensor masks); columns
    are contiguous, one element off alignment (4-byte lanes, coalesced).
    """
    chan = offs_c[None, :] * (H * W)
    ph, pw = h - d_h, w - d_w  # primary sources
    qh, qw = h + d_h, w + d_w  # mirrored sources
    lim_p = tl.where((ph >= 0) & (ph < H), W, 0)
    lim_q = tl.where(((d_h < 0) & (h == 1)) | ((d_h > 0) & (h == H - 2)), W, 0)
    in_w = (pw >= 0) & (pw < W)
    mirror_w = ((d_w < 0) & (w == 1)) | ((d_w > 0) & (w == W - 2))
    b_sum = tl.load(ds_img + ph * W + pw[:, None] + chan,
                    mask=(in_w & (w < lim_p))[:, None], other=0.0)  # fmt: skip
    b_sum += tl.load(ds_img + qh * W + pw[:, None] + chan,
                     mask=(in_w & (w < lim_q))[:, None], other=0.0)  # fmt: skip
    b_sum += tl.load(ds_img + ph * W + qw[:, None] + chan,
                     mask=(mirror_w & (w < lim_p))[:, None], other=0.0)  # fmt: skip
    b_sum += tl.load(ds_img + qh * W + qw[:, None] + chan,
                     mask=(mirror_w & (w < lim_q))[:, None], other=0.0)  # fmt: skip
    return b_sum


@triton.jit
def msgm_bwd_dx_kernel(
    x_ptr, ds_ptr, dg_ptr, dx_ptr, dx_plus_ptr,
    wa_ptr, wc_ptr, bc_ptr, wdw_ptr,
    dwa_part_ptr, dwc_part_ptr, dbc_part_ptr, dwdw_part_ptr,
    ln_x_ptr, ln_w_ptr, ln_part_ptr, plus_sum_ptr, ln_plus_ptr,
    H, W, tiles_per_row, num_tiles, part_stride,
    sx_n, sx_c, sx_h, sx_w, eps,
    C: tl.constexpr, BLOCK_P: tl.constexpr, HALO: tl.constexpr, TAPS_PAD: tl.constexpr,
    HAS_DX_PLUS: tl.constexpr, HAS_PLUS_SUM: tl.constexpr, HAS_LN: tl.constexpr,
    HAS_LN_PLUS: tl.constexpr, INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Backward through the reflect-padded dw3x3 (adjoint gather), 1x1_c and 1x1_a.

    dx = de @ W_c + dg @ W_a (+ dx_plus, contiguous: a gradient the fused SS-ReM step
    accumulates into x's). Writes dx (contiguous NCHW, x's dtype) and this program's
    partial sums of dW_c and dW_a ([C, C] each), of the 1x1_c bias ([C]) and of the
    dw3x3 weight ([9, C], tap-major). fp16/bf16: the column adjoint moves fp32 ds
    row sums with TF32 dots, exact for fp16/bf16 ds (their mantissas fit); fp32 gathers
    each tap by direct loads (`_gather_tap`).

    HAS_LN (the fused step's MSGM_z): x is LayerNorm(ln_x) with weight ln_w (fp32, eps)
    and dx, in fp32, goes on through that LayerNorm's backward (`layer_norm`'s
    `normalized_grad`, statistics recomputed from ln_x, contiguous): the kernel writes
    d ln_x instead of dx, and the LayerNorm's dweight and dbias partials ([C] each) at
    ln_part_ptr + pid * part_stride.

    The fused SS-ReM body's gradient sums (contiguous, x's dtype), where a separate add
    would read two maps and write one: HAS_PLUS_SUM adds dx_plus into plus_sum in place
    (the running sum of d y over the steps); HAS_LN_PLUS adds ln_plus to d ln_x (an
    expert's gradient, or d y's sum at the first step).
    """
    pid = tl.program_id(0)
    HW = H * W
    offs_c = _channels(C, INT64_INDEX)
    offs_tap = tl.arange(0, TAPS_PAD)
    dtype = x_ptr.dtype.element_ty
    acc_wc = tl.zeros([C, C], dtype=tl.float32)
    acc_wa = tl.zeros([C, C], dtype=tl.float32)
    acc_bc = tl.zeros([C], dtype=tl.float32)
    acc_wdw = tl.zeros([TAPS_PAD, C], dtype=tl.float32)
    acc_lnw = tl.zeros([C], dtype=tl.float32)  # HAS_LN: the LayerNorm's dweight, dbias
    acc_lnb = tl.zeros([C], dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        n, h, w0, w, mask_p = _tile(tile, tiles_per_row, H, W, BLOCK_P, INT64_INDEX)
        ptr_x = x_ptr + n * sx_n + h * sx_h + (w[:, None] * sx_w + offs_c[None, :] * sx_c)
        b_x = tl.load(ptr_x, mask=mask_p[:, None], other=0.0)  # [BLOCK_P, C]
        wc_t = _weight(wc_ptr, offs_c, C, True, dtype)
        b_e = tl.dot(b_x, wc_t, input_precision=DOT_PRECISION) + tl.load(bc_ptr + offs_c)[None, :]
        ds_img = ds_ptr + n * C * HW
        b_de = tl.zeros([BLOCK_P, C], dtype=tl.float32)
        if dtype == tl.float32:  # direct loads, as in _expand_depthwise
            for tap in range(9):
                b_gath = _gather_tap(ds_img, h, w, H, W, offs_c, tap // 3 - 1, tap % 3 - 1)
                b_de += b_gath * tl.load(wdw_ptr + offs_c * 9 + tap)[None, :]
                b_dtap = tl.sum(b_gath * b_e, axis=0)  # [C]
                acc_wdw += tl.where(offs_tap[:, None] == tap, b_dtap[None, :], 0.0)
        else:
            for r in range(3):  # runtime loop, see _expand_depthwise
                b_mid, b_prev, b_next = _gather_row(ds_img, h, r - 1, w0, w, H, W, offs_c, C,
                                                    BLOCK_P, HALO)  # fmt: skip
                for col in tl.static_range(3):
                    if col == 1:
                        b_gath = b_mid
                    else:
                        b_gath = _shifted(b_mid, b_prev, b_next, w0, W, col - 1, True,
                                          BLOCK_P, HALO, "tf32")  # fmt: skip
                    b_tap = tl.load(wdw_ptr + offs_c * 9 + (r * 3 + col))  # [C] fp32
                    b_de += b_gath * b_tap[None, :]
                    b_dtap = tl.sum(b_gath * b_e, axis=0)  # [C]
                    acc_wdw += tl.where(offs_tap[:, None] == r * 3 + col, b_dtap[None, :], 0.0)
        b_de_lo = b_de.to(dtype)
        acc_wc += tl.dot(tl.trans(b_de_lo), b_x, input_precision=DOT_PRECISION)
        acc_bc += tl.sum(b_de, axis=0)
        wc = _weight(wc_ptr, offs_c, C, False, dtype)
        b_dx = tl.dot(b_de_lo, wc, input_precision=DOT_PRECISION)  # [BLOCK_P, C] fp32
        # Through 1x1_a: dg from msgm_bwd_gate_kernel.
        offs_out = n * C * HW + h * W + (offs_c[None, :] * HW + w[:, None])
        b_dg = tl.load(dg_ptr + offs_out, mask=mask_p[:, None], other=0.0)  # [BLOCK_P, C]
        acc_wa += tl.dot(tl.trans(b_dg), b_x, input_precision=DOT_PRECISION)
        wa = _weight(wa_ptr, offs_c, C, False, dtype)
        b_dx += tl.dot(b_dg, wa, input_precision=DOT_PRECISION)
        if HAS_DX_PLUS:
            b_plus = tl.load(dx_plus_ptr + offs_out, mask=mask_p[:, None], other=0.0)
            b_dx += b_plus.to(tl.float32)
            if HAS_PLUS_SUM:
                b_sum = tl.load(plus_sum_ptr + offs_out, mask=mask_p[:, None], other=0.0)
                b_sum = b_sum.to(tl.float32) + b_plus.to(tl.float32)
                tl.store(plus_sum_ptr + offs_out, b_sum.to(dtype), mask=mask_p[:, None])
        if HAS_LN:  # on through the LayerNorm that made x (0 at masked pixels: b_dx is)
            b_ln = tl.load(ln_x_ptr + offs_out, mask=mask_p[:, None], other=0.0)
            b_xhat, rstd = normalized(b_ln.to(tl.float32), eps, C)
            acc_lnw += tl.sum(b_dx * b_xhat, axis=0)
            acc_lnb += tl.sum(b_dx, axis=0)
            b_dx = normalized_grad(b_xhat, rstd, b_dx, tl.load(ln_w_ptr + offs_c), C)
            if HAS_LN_PLUS:
                b_dx += tl.load(ln_plus_ptr + offs_out, mask=mask_p[:, None],
                                other=0.0).to(tl.float32)  # fmt: skip
        tl.store(dx_ptr + offs_out, b_dx.to(dtype), mask=mask_p[:, None])
    pid64 = pid.to(tl.int64)
    if HAS_LN:
        tl.store(ln_part_ptr + pid64 * part_stride + offs_c, acc_lnw)
        tl.store(ln_part_ptr + pid64 * part_stride + C + offs_c, acc_lnb)
    offs_cc = offs_c[:, None] * C + offs_c[None, :]
    tl.store(dwc_part_ptr + pid64 * part_stride + offs_cc, acc_wc)
    tl.store(dwa_part_ptr + pid64 * part_stride + offs_cc, acc_wa)
    tl.store(dbc_part_ptr + pid64 * part_stride + offs_c, acc_bc)
    # [C, 9] (the parameter's layout), so the reduced block is a view of the gradient.
    ptr_wdw = dwdw_part_ptr + pid64 * part_stride + offs_c[None, :] * 9 + offs_tap[:, None]
    tl.store(ptr_wdw, acc_wdw, mask=(offs_tap < 9)[:, None])


# ---------------------------------------------------------------------------------------
# Configs and launchers


# (BLOCK_P, num_warps) at C = 64 per kernel, for fp16/bf16 and for fp32, each for int32
# and int64 (INT64_INDEX) offsets: the largest tiles that `ssiu check-kernels` (ptxas)
# shows compiling without spills for both sm_90 and sm_80 with both Triton 3.9 (CI) and
# Triton 3.6 (torch 2.11's pin, what the GPU machines run). The backward kernels hold two
# [C, C] fp32 weight-gradient accumulators each, hence the smaller fp32 tiles and the
# single-product TF32 dots of the fp32 backward (see `msgm_config`).
# The tiles were chosen for the flat-tile kernels; the row-tile kernels (halo chunks,
# shift dots) keep them and are re-checked spill-free with Triton 3.9 only (no 3.6 venv
# at the time): re-run `ssiu check-kernels --only msgm_` under 3.6.
# Where Triton 3.6 forced a smaller tile than 3.9 needs (no other num_warps/num_stages
# compiles spill-free on both):
# - fwd 16-bit int32: 64 -> 32. At 64, Triton 3.6 spills 24 bytes on sm_80 without a
#   residual with 8 warps (1, 2 or 3 stages; 16 warps spill with a residual), and with
#   4 warps Triton 3.9 spills 268 bytes on sm_80 with a residual.
# - bwd_gate 16-bit: 32 -> 16. At 32, Triton 3.6 spills 12 (int32) / 84-96 (int64) bytes
#   on sm_80 with 8 warps (1, 2 or 3 stages), and more with 4 or 16 warps.
_TILES = {
    #            16-bit int32  16-bit int64  fp32 int32  fp32 int64
    "fwd": ((32, 8), (32, 8), (16, 8), (16, 8)),
    "bwd_gate": ((16, 8), (16, 8), (16, 8), (16, 8)),
    "bwd_dx": ((16, 8), (16, 8), (16, 8), (16, 8)),
}
# sm_90 (the only arch they are checked for; others run the tiles above), 16-bit, int32
# offsets: larger tiles, which spill on sm_80. On the H200 the MSGM kernels were 73% of a
# training step at ~6% of the copy bandwidth (latency-bound: a dozen dependent
# [BLOCK_P, 64] x [64, 64] dots per tile, README "Measured on a GPU"). The forward's
# 64-pixel tile compiles to wgmma (92 HGMMA in the pair kernel) instead of mma.sync m16
# pieces; on two warpgroups since its column sums (`_expand_depthwise`: three [64, C]
# fp32 accumulators) spilled 72-132 B on one, capped at 232 registers (see
# `msgm_config`), 1 CTA of 8 warps per SM as 2 of 4 before. The backward's 32-pixel
# tiles halve the persistent loops' trip count at 208-232 registers.
# sm_80 with these (measured with the per-tap forward): forward 255 registers (spills
# 268 B with a residual), bwd_gate spills 68 B. The forward's unspecialised sm_90 builds
# (strided inputs) fit the 232 cap without spills (`make check-kernels-all`).
# GPU time of the change: not measured (the sweep part of gpu-check times it).
_TILES_SM90 = {"fwd": (64, 8), "bwd_gate": (32, 8), "bwd_dx": (32, 8)}


def msgm_config(
    channels: int, dtype: torch.dtype, kernel: str, int64_index: bool = False,
    arch: int = TUNED_ARCH,
) -> KernelConfig:  # fmt: skip
    """The config a launcher runs `kernel` ("fwd", "bwd_gate", "bwd_dx") with on a GPU of
    compute capability `arch` (`device_arch`: sm_90 tiles on the CPU too).

    BLOCK_P scales as 64 / C from the C = 64 table (at least 16, at most 64), but for
    the fp32 gate backward.
    DOT_PRECISION: fp32 dots run on tensor cores: "ieee" lowers to FMA loops whose K = 64
    operand slices spill kilobytes of registers per thread on sm_90. The forward uses
    "tf32x3" (three TF32 products, about fp32 accuracy); the backward kernels hold more
    live tiles and spill on sm_80 with tf32x3, so they use one TF32 product, as cuDNN's
    fp32 convolutions do by default (torch.backends.cudnn.allow_tf32). The interpreter
    computes every fp32 dot exactly whatever the setting. For fp16/bf16 it is ignored.
    """
    fp32 = dtype == torch.float32
    wide_tiles = arch == 90 and not fp32 and not int64_index
    block_p, num_warps = (
        _TILES_SM90[kernel] if wide_tiles else _TILES[kernel][2 * fp32 + int64_index]
    )
    # Narrower channels take longer tiles (about the same registers), except the fp32
    # gate backward: its C = 16 / 32 builds spilled 12-72 bytes at 64 / 32 pixels.
    if not (fp32 and kernel == "bwd_gate"):
        block_p = max(16, min(64, block_p * 64 // channels))
    constexprs = {
        "C": channels,
        "BLOCK_P": block_p,
        "DOT_PRECISION": ("tf32x3" if kernel == "fwd" else "tf32") if fp32 else "ieee",
        "INT64_INDEX": int64_index,
        "HALO": HALO,
    }
    # ptxas allocates the fp32 int64 variant without spills only with num_stages=2
    # (found by `ssiu check-kernels`: 12 bytes spilled on sm_80 with 1 stage).
    num_stages = 2 if fp32 and int64_index else 1
    # The 16-bit backward kernels with the fused step's prologue / epilogue take 238-245
    # registers on sm_80 uncapped; capped at the 232 headroom they do not spill. So do
    # the 16-bit forwards on wide tiles or int64 offsets, whose column sums took the sm_90
    # training pair to 241 and the int64-offset sm_80 builds to 255 uncapped (the sm_80
    # int32 build takes 128 uncapped but 232 capped, half the resident warps).
    capped = kernel in ("bwd_gate", "bwd_dx") or (not fp32 and (wide_tiles or int64_index))
    maxnreg = 232 if capped else None
    archs = None if fp32 or int64_index else ((90,) if wide_tiles else (80,))
    return KernelConfig(constexprs, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
                        archs=archs)  # fmt: skip


def _weights(params):
    """Launcher layout: every parameter flat or [C_out, C_in], fp32 (views of fp32
    parameters; the kernels cast the 1x1 weights to the input dtype in registers)."""
    is_1x1 = (True, False, True, False, False, False, True, False, True, False)
    return tuple(
        (t.reshape(t.shape[0], t.shape[1]) if mat else t.reshape(-1)).float().contiguous()
        for t, mat in zip(params, is_1x1, strict=True)
    )


def _launch_geometry(x: torch.Tensor, block_p: int) -> tuple[int, int]:
    """Row tiles: cdiv(W, BLOCK_P) tiles per image row (see `_tile`), and their count."""
    n, _, h, w = x.shape
    tiles_per_row = cdiv(w, block_p)
    return tiles_per_row, n * h * tiles_per_row


def msgm_fwd(
    x: torch.Tensor, params, residual: torch.Tensor | None, residual2: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSGM(x) (+ residual) (+ residual2), w_lo). x, residual: (N, C, H, W), any strides;
    out contiguous; w_lo the 1x1 weights in x's dtype for `msgm_bwd` ([4, C, C])."""
    n, c, h, w = x.shape
    res = residual if residual is not None else x
    w_lo = empty((4, c, c), dtype=x.dtype, device=x.device)
    # Unused operands get a small dummy pointer (never read: constexpr flags).
    res2 = residual2.contiguous() if residual2 is not None else w_lo
    cfg = msgm_config(
        c, x.dtype, "fwd", needs_int64_index(x, res, residual2), device_arch(x.device)
    )
    block_p = cfg.constexprs["BLOCK_P"]
    tiles_per_row, programs = _launch_geometry(x, block_p)
    out = empty((n, c, h, w), dtype=x.dtype, device=x.device)
    msgm_fwd_kernel[(programs,)](
        x, res, res2, out, w_lo, *_weights(params),
        h, w, tiles_per_row, *x.stride(), *res.stride(),
        HAS_RESIDUAL=residual is not None, HAS_RESIDUAL2=residual2 is not None,
        **cfg.launch_options(), **cfg.constexprs,
    )  # fmt: skip
    return out, w_lo


def msgm_fwd_pair(
    x: torch.Tensor, params, params2, residual2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(MSGM(x) + x + residual2, its w_lo, MSGM2(x), its w_lo) in one launch
    (`msgm_fwd_pair_kernel`): the same results as two `msgm_fwd` calls."""
    n, c, h, w = x.shape
    w_lo, w_lo2 = (empty((4, c, c), dtype=x.dtype, device=x.device) for _ in range(2))
    x, residual2 = x.contiguous(), residual2.contiguous()
    cfg = msgm_config(c, x.dtype, "fwd", needs_int64_index(x, residual2), device_arch(x.device))
    tiles_per_row, programs = _launch_geometry(x, cfg.constexprs["BLOCK_P"])
    out, out2 = (empty((n, c, h, w), dtype=x.dtype, device=x.device) for _ in range(2))
    msgm_fwd_pair_kernel[(2 * programs,)](
        x, residual2, out, w_lo, *_weights(params), out2, w_lo2, *_weights(params2),
        h, w, tiles_per_row, **cfg.launch_options(), **cfg.constexprs,
    )  # fmt: skip
    return out, w_lo, out2, w_lo2


# Column blocks of the packed weight-gradient partials, in the order the kernels write
# them: the gate kernel's dW_d, dW_o and its four biases (one [4, C] block: 1x1_a,
# 1x1_d, 1x1_o, dw3x3), then the dx kernel's dW_a, dW_c, 1x1_c bias and dw3x3 weight
# ([C, 9], the parameter's layout). Widths in units of C.
_PARTS = (("wd", "C"), ("wo", "C"), ("bias4", 4), ("wa", "C"), ("wc", "C"), ("bc", 1),
          ("wdw", TAPS))  # fmt: skip


def _offsets(c: int) -> tuple[dict, int]:
    """Column offset of each block of the packed partials, and the row width."""
    offsets, start = {}, 0
    for name, width in _PARTS:
        offsets[name] = start
        start += c * (c if width == "C" else width)
    return offsets, start


# The parameter (`MSGMParams` index) of each consecutive piece of the reduced partials
# (`_PARTS`, the bias block split into its four rows): W_d, W_o, the biases of 1x1_a,
# 1x1_d, 1x1_o and dw3x3, W_a, W_c, b_c, the dw3x3 weight.
PACKED_ORDER = (6, 8, 1, 7, 9, 5, 0, 2, 3, 4)


def gradient_views(flat: torch.Tensor, params) -> list[torch.Tensor]:
    """The reduced partials `flat` ([total] fp32, from `msgm_bwd`) as [dW_a, db_a, dW_c,
    db_c, dW_dw, db_dw, dW_d, db_d, dW_o, db_o]: views shaped like each parameter (cast
    only if a parameter is not fp32). Called outside the custom op, whose outputs may
    not alias each other."""
    pieces = split_flat(flat, [params[i] for i in PACKED_ORDER])
    return [pieces[PACKED_ORDER.index(i)] for i in range(len(params))]


def gradients_size(c: int) -> int:
    """Elements of `msgm_bwd`'s packed parameter-gradient vector."""
    return _offsets(c)[1]


# Resident CTAs per SM of either backward kernel (8 warps at 167-175 registers: 1), so
# one program per SM: the partials are no larger than what the GPU runs at once.
_BWD_CTAS_PER_SM = 1


def partials_rows(device: torch.device) -> int:
    """Programs (partial-sum rows) of the backward kernels: one wave."""
    return persistent_programs(device, _BWD_CTAS_PER_SM)


def _contiguous_map(t: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """t, which a kernel reads (and may write) at x's contiguous offsets, checked."""
    if t.shape != x.shape or t.dtype != x.dtype or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {tuple(x.shape)} {x.dtype} map")
    return t


def msgm_bwd(
    dout: torch.Tensor, x: torch.Tensor, params, w_lo: torch.Tensor,
    dout2: torch.Tensor | None = None, dx_plus: torch.Tensor | None = None,
    partials: torch.Tensor | None = None, layer_norm: tuple | None = None,
    plus_sum: torch.Tensor | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """[dx, dparams] of MSGM at x: dx contiguous in x's dtype, dparams every parameter
    gradient packed flat in fp32 (`gradient_views` shapes them). w_lo: the forward's
    weight copy. The output gradient is dout (- dout2); dx_plus is added to dx.

    partials: a [programs, gradients_size(C)] fp32 view (unit column stride) of a buffer
    shared with other ops: the kernels write their per-program partials there and
    dparams is None (the caller reduces the whole buffer once, `partials_rows`).

    layer_norm: (ln_x, weight, eps, ln_partials, ln_plus) when x = LayerNorm(ln_x): dx is
    then the gradient of ln_x (the LayerNorm's backward in the dx kernel's epilogue), plus
    ln_plus unless it is None, and the LayerNorm's [dweight, dbias] partials go to
    ln_partials, a [programs, 2C] fp32 view with the row stride of `partials` (needed).

    plus_sum: a contiguous map in x's dtype that dx_plus (needed) is added into, in place.

    The residual's gradient is dout itself and is not computed here.
    """
    n, c, h, w = x.shape
    dev = x.device
    _, ba, _, bc, wdw, bdw, _, bd, _, _ = _weights(params)
    wa, wc, wd, wo = w_lo.unbind(0)
    int64_index = needs_int64_index(x, dout, dout2, dx_plus)
    has_dout2, has_dx_plus = dout2 is not None, dx_plus is not None
    # Unused operands get a small dummy pointer (never read: constexpr flags).
    dout2 = dout2.contiguous() if has_dout2 else w_lo
    dx_plus = dx_plus.contiguous() if has_dx_plus else w_lo
    if layer_norm is not None:
        ln_x, ln_w, eps, ln_part, ln_plus = layer_norm
        ln_x, ln_w = ln_x.contiguous(), ln_w.float().contiguous()
        if partials is None or ln_part.stride(0) != partials.stride(0):
            raise ValueError("the LayerNorm's partials need the row stride of `partials`")
        if ln_plus is not None:
            _contiguous_map(ln_plus, x, "ln_plus")
        int64_index = int64_index or needs_int64_index(ln_x)
    else:
        ln_x, ln_w, ln_part, ln_plus = w_lo, wdw, wdw, None  # HAS_LN=False reads none
        eps = 0.0
    if plus_sum is not None:
        if not has_dx_plus:
            raise ValueError("plus_sum needs dx_plus (the map it accumulates)")
        _contiguous_map(plus_sum, x, "plus_sum")
    cfg_gate = msgm_config(c, x.dtype, "bwd_gate", int64_index, device_arch(dev))
    cfg_dx = msgm_config(c, x.dtype, "bwd_dx", int64_index, device_arch(dev))
    gate_tiles = _launch_geometry(x, cfg_gate.constexprs["BLOCK_P"])
    dx_tiles = _launch_geometry(x, cfg_dx.constexprs["BLOCK_P"])
    # Both kernels write the same rows of one partials buffer: the same program count
    # (the tile loops take any count).
    offsets, total = _offsets(c)
    if partials is None:
        programs = min(gate_tiles[1], dx_tiles[1], partials_rows(dev))
        packed = empty((programs, total), dtype=torch.float32, device=dev)
    else:
        packed = partials  # extra programs find no tile and write zero partials
        programs = packed.shape[0]
    bounds = zip(offsets.items(), [*list(offsets.values())[1:], total], strict=True)
    part = {name: packed[:, start:end] for (name, start), end in bounds}  # column blocks
    row_stride = packed.stride(0)

    dg = empty((n, c, h, w), dtype=x.dtype, device=dev)
    ds = empty((n, c, h, w), dtype=x.dtype, device=dev)
    msgm_bwd_gate_kernel[(programs,)](
        x, dout, dout2, dg, ds, wa, ba, wc, bc, wdw, bdw, wd, bd, wo,
        part["wd"], part["wo"], part["bias4"],
        h, w, *gate_tiles, row_stride, *x.stride(), *dout.stride(),
        HAS_DOUT2=has_dout2, **cfg_gate.launch_options(), **cfg_gate.constexprs,
    )  # fmt: skip
    dx = empty((n, c, h, w), dtype=x.dtype, device=dev)
    msgm_bwd_dx_kernel[(programs,)](
        x, ds, dg, dx, dx_plus, wa, wc, bc, wdw,
        part["wa"], part["wc"], part["bc"], part["wdw"], ln_x, ln_w, ln_part,
        plus_sum if plus_sum is not None else w_lo, ln_plus if ln_plus is not None else w_lo,
        h, w, *dx_tiles, row_stride, *x.stride(), eps,
        TAPS_PAD=TAPS_PAD, HAS_DX_PLUS=has_dx_plus, HAS_PLUS_SUM=plus_sum is not None,
        HAS_LN=layer_norm is not None, HAS_LN_PLUS=ln_plus is not None,
        **cfg_dx.launch_options(), **cfg_dx.constexprs,
    )  # fmt: skip
    return [dx, sum_partials(packed) if partials is None else None]


# ---------------------------------------------------------------------------------------
# Registry: every (kernel, config) the launchers above can pick for C = 64.

_SCALARS = ("H", "W", "tiles_per_row", "num_tiles", "part_stride")
_X_STRIDES = ("sx_n", "sx_c", "sx_h", "sx_w")


def _register(kernel, name: str, pointers: str, scalars: tuple, variants: dict,
              floats: tuple = (), valid=lambda flags: True):  # fmt: skip
    """One spec per kernel: every dtype x every combination of the `variants` flags.

    pointers: the kernel's pointer names, "name:dt" for input-dtype tensors, else fp32;
    scalars i32 (i64 strides with INT64_INDEX), then floats fp32. valid: which flag
    combinations (a dict) a launcher can pick.
    """
    fields = [p.split(":") for p in pointers.split()]
    flags = [dict(zip(variants, values, strict=True)) for values in product(*variants.values())]
    flags = [f for f in flags if valid(f)]
    configs = []  # the sm_80 and sm_90 tiles (one config where they are the same)
    for dt, int64_index, flag, arch in product(KERNEL_DTYPES, (False, True), flags, (80, 90)):
        config = DtypeConfig.of(msgm_config(64, dt, name, int64_index, arch), dt, flag)
        if config not in configs:
            configs.append(config)
    strides = [s for s in scalars if s.startswith("s")]
    signature = dtype_signature(fields, scalars, floats=floats, wide=strides)
    register(KernelSpec(kernel.__name__, kernel, signature, tuple(configs)))


_register(
    msgm_fwd_kernel, "fwd",
    "x_ptr:dt res_ptr:dt res2_ptr:dt out_ptr:dt w_lo_ptr:dt wa_ptr ba_ptr wc_ptr bc_ptr "
    "wdw_ptr bdw_ptr wd_ptr bd_ptr wo_ptr bo_ptr",
    ("H", "W", "tiles_per_row") + _X_STRIDES + ("sr_n", "sr_c", "sr_h", "sr_w"),
    {"HAS_RESIDUAL": (False, True), "HAS_RESIDUAL2": (False, True)},
)  # fmt: skip
_register(
    msgm_fwd_pair_kernel, "fwd",
    "x_ptr:dt res2_ptr:dt out_ptr:dt w_lo_ptr:dt wa_ptr ba_ptr wc_ptr bc_ptr wdw_ptr bdw_ptr "
    "wd_ptr bd_ptr wo_ptr bo_ptr out2_ptr:dt w_lo2_ptr:dt wa2_ptr ba2_ptr wc2_ptr bc2_ptr "
    "wdw2_ptr bdw2_ptr wd2_ptr bd2_ptr wo2_ptr bo2_ptr",
    ("H", "W", "tiles_per_row"),
    {},
)  # fmt: skip
_register(
    msgm_bwd_gate_kernel, "bwd_gate",
    "x_ptr:dt dout_ptr:dt dout2_ptr:dt dg_ptr:dt ds_ptr:dt wa_ptr:dt ba_ptr wc_ptr:dt bc_ptr "
    "wdw_ptr bdw_ptr wd_ptr:dt bd_ptr wo_ptr:dt dwd_part_ptr dwo_part_ptr dbias_part_ptr",
    _SCALARS + _X_STRIDES + ("sd_n", "sd_c", "sd_h", "sd_w"),
    {"HAS_DOUT2": (False, True)},
)  # fmt: skip
_register(
    msgm_bwd_dx_kernel, "bwd_dx",
    "x_ptr:dt ds_ptr:dt dg_ptr:dt dx_ptr:dt dx_plus_ptr:dt wa_ptr:dt wc_ptr:dt bc_ptr wdw_ptr "
    "dwa_part_ptr dwc_part_ptr dbc_part_ptr dwdw_part_ptr ln_x_ptr:dt ln_w_ptr ln_part_ptr "
    "plus_sum_ptr:dt ln_plus_ptr:dt",
    _SCALARS + _X_STRIDES,
    {"TAPS_PAD": (TAPS_PAD,), "HAS_DX_PLUS": (False, True), "HAS_PLUS_SUM": (False, True),
     "HAS_LN": (False, True), "HAS_LN_PLUS": (False, True)},
    floats=("eps",),
    # The sums ride on an addend that is there: dx_plus, the LayerNorm epilogue.
    valid=lambda f: (f["HAS_DX_PLUS"] or not f["HAS_PLUS_SUM"])
    and (f["HAS_LN"] or not f["HAS_LN_PLUS"]),
)  # fmt: skip

"""Fused upsampling stage of the tail: 1x1 (C -> C*r*r) + PixelShuffle(r) + GELU, fwd and bwd.

    z[n, c*r*r + i*r + j, y, x] = (W x[n, :, y, x])[c*r*r + i*r + j] + b[c*r*r + i*r + j]
    out[n, c, y*r + i, x*r + j] = GELU_erf(z[n, c*r*r + i*r + j, y, x])

Floors (C = 64, per input pixel of one x2 stage; bf16): forward reads x (128 B) and
writes 4 output pixels (512 B): 640 B, 64 * 256 = 16,384 MACs; backward reads x and dout
and writes dx: 768 B, 2 x 16,384 MACs. Memory-bound on an H200 in both directions.

Strategy
--------
Forward (`upshuffle_fwd_kernel`): one program per row tile, BLOCK_P input pixels of one
row y of one image, all C channels: an x^T tile [C, BLOCK_P] with lanes along the
pixels (16 B a lane when the w-stride is 1). For each of the r*r sub-pixel positions
(i, j) it takes the C weight rows c*r*r + i*r + j as a [C, C] matrix, does one `tl.dot`,
applies GELU and stores straight into the shuffled (N, C, h*r, w*r) output: neither the
pre-shuffle map nor a shuffle pass exists. At r = 2 the two sub-pixel columns of output
row y*2 + i are interleaved in registers (`tl.interleave`) so each channel's output is
one contiguous, aligned run of 2 * BLOCK_P pixels (16 B stores); at r = 3 each of the 3
stores has lanes on pixels 3 apart (2 B a lane; the 3 stores fill each other's sectors
in L2). x4 runs the r = 2 kernel twice.

Backward, two kernels, recomputing z from x (only the input is saved):
  1. `upshuffle_bwd_dx_kernel`, per row tile: for every (i, j), dz = GELU'(z) * dout
     at the shuffled positions, dx += W_ij^T dz. Writes dx. At r = 2 dout is read as the
     contiguous run of 2 * BLOCK_P output pixels and split (`tl.split`) into the two
     sub-pixel columns, the mirror of the forward's interleave.
  2. `upshuffle_bwd_dw_kernel`, programs (chunk, i*r + j): each loops over the tiles of
     its chunk for one sub-pixel position and accumulates the fp32 partial sums
     dW_ij = sum dz x^T ([C, C]) and db_ij, packed per chunk in the parameters' order and
     reduced by one `partials.sum_partials` launch (no atomics, no per-parameter sum; in
     `ssiu.ops.fused_tail` one launch for all stages and the final 3x3). The
     r*r programs of a chunk read the same x tiles and dout rows at about the same time
     (cache hits; at r = 2 a program reads the whole dout run and keeps its half). One
     wave of programs (`partials.persistent_programs`).
Splitting dW by sub-pixel keeps one [C, C] accumulator per program; r*r of them (9 at
x3) would not fit in registers.

SASS (sass tool, training workload specialisation: w-strides 1, sizes and strides
multiples of 16; triton 3.9; C = 64, r = 2; registers / global accesses), before -> after
the row tiles:
- fwd bf16 sm_90: 128 regs, STG 2B x64 -> 94 regs, LDG 16B x18, STG 16B x8, no 2 B.
- fwd fp32 sm_90: 128 regs + 16 spills, STG 4B x16 (lanes on channels) -> 142, no
  spills, STG 16B x4.
- bwd_dx bf16 sm_90: 128 regs, LDG 2B x32 -> 102 regs, LDG 16B x21, no 2 B.
- bwd_dw bf16 sm_90: 102 regs, LDG 2B x8 -> 97 regs, LDG 16B x5, no 2 B.
sm_80 after: fwd bf16 121 regs / fp32 170, bwd_dx 184 / 148, bwd_dw 162 / 125, same
access widths, no spills. The remaining 4 B loads are the fp32 biases (rows
c*r*r + sub). triton 3.6 not checked (no side venv). Distance from the floor: the
forward moves its floor (x once, out once); the backward reads x and dout twice (dx and
dW kernels, the second mostly from L2) and at r = 2 each dW program reads both halves of
a dout run: about 1.8x the floor from DRAM's point of view in the worst case.

The last x2 stage with the tail's final reflect 3x3 (C -> 3, `ssiu.kernels.tail_rgb`)
--------------------------------------------------------------------------------------
Run apart, the stage writes f (C channels at full resolution: 335 MB at the training
workload), the 3x3 reads it, saves it for its backward and writes df there, which both
stage backward kernels read: 2.7 GB of the step's modelled traffic. Fused (per input
pixel, C = 64, bf16): the forward reads x and writes 4 RGB pixels, 152 B (1,176 apart);
the backward reads x and dout (3 channels) and writes dx, 280 B (about 2,000 apart).
- Forward, 16-bit (`upshuffle_rgb_fwd_kernel`): per input-row tile of 32 pixels, output
  rows 2y and 2y + 1 from f-rows refl(2y - 1) .. refl(2y + 2), recomputed (the outer two
  from the neighbouring input rows: twice the stage's dots) with the f-columns just
  outside the tile (16-pixel chunks of input columns x0 - 1 and x0 + 32: +50%); each
  f-row times the 3x3's tap-row weights gives G, as in `tail_rgb_fwd_kernel`, which
  shares its epilogue (`tail_rgb.rgb_epilogue`). About 3x the stage's FLOPs, on tensor
  cores, for 1/8 of its bytes. fp32 keeps the two kernels (the fused one spilled 176-248
  bytes on sm_90).
- Backward (RGB=True in both kernels, any dtype): the stage's output gradient at the
  tile's pixels is formed from dout as the 3x3's adjoint (`tail_rgb.tap_grads`: the
  reflected column taps of a [4 BLOCK_P, 16] dout run), in fp32, never stored; the dW
  programs (chunk, sub-pixel) also accumulate the 3x3's weight and bias partials over
  their output pixels (the four sub-pixels of a chunk cover each once).
SASS (training specialisation, C = 64, bf16; triton 3.9 / 3.6): fused forward sm_90
205 / 210 registers, sm_80 220 / 218 (capped at 232), no spills, LDG 16B x52, STG 16B
x16 + 4B x2 (the [64, 4] RGB tile); RGB dx 138 / 102 (sm_90), 154 / 150 (sm_80); RGB dW
200 / 202, 228 / 231 (capped). Distance from the floor: the forward reads x about 3
times (the recomputed rows and halo chunks, L2 hits), the backward reads x and dout
twice (dx and dW kernels): under 2x from DRAM's point of view. GPU time: not measured.

Precision: x and the weights enter `tl.dot` in the input dtype (fp32 via TF32, see
`upshuffle_config`; fp16, bf16), accumulation, bias and GELU are fp32. Offsets: image
bases n * stride are int64 (program ids cast first); offsets inside one image are int32
(the launchers check an image has < 2**31 elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ssiu.kernels.common import (
    KERNEL_DTYPES,
    DtypeConfig,
    cdiv,
    device_arch,
    dtype_signature,
    empty,
)
from ssiu.kernels.indexing import reflect, row_tile
from ssiu.kernels.partials import persistent_programs, sum_partials
from ssiu.kernels.registry import KernelConfig, KernelSpec, register
from ssiu.kernels.tail_rgb import (
    SKIP_IMAGE,
    SKIP_MAP,
    SKIP_NONE,
    dout_rows,
    output_dtype,
    pick_row,
    rgb_dout,
    rgb_epilogue,
    skip_arguments,
    store_partials,
    tap_grads,
    tap_weights,
)

FACTORS = (2, 3)  # PixelShuffle factors a stage runs (x4 = two x2 stages)


@triton.jit
def _gelu_and_grad(z):
    """GELU (erf form) of z and its derivative, fp32."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    return z * cdf, cdf + z * pdf


@triton.jit
def _input_tile(x_ptr, n, y, x, mask_p, sx_n, sx_c, sx_h, sx_w, offs_c):
    """x^T tile [C, BLOCK_P] of row y: lanes along the pixels (contiguous when sx_w = 1)."""
    ptr = x_ptr + n * sx_n + y * sx_h + offs_c[:, None] * sx_c + (x * sx_w)[None, :]
    return tl.load(ptr, mask=mask_p[None, :], other=0.0)


@triton.jit
def _preact(b_xt, w_ptr, b_ptr, sub, offs_c, C: tl.constexpr, RR: tl.constexpr,
            PRECISION: tl.constexpr):  # fmt: skip
    """z^T at sub-pixel `sub` = i*r + j: W_sub [C_out, C_in] @ x^T [C_in, P] + b_sub, fp32."""
    rows = offs_c * RR + sub  # weight rows of output channels c at this sub-pixel
    w = tl.load(w_ptr + rows[:, None] * C + offs_c[None, :]).to(b_xt.dtype)  # [C_out, C_in]
    b_z = tl.dot(w, b_xt, input_precision=PRECISION)  # [C, BLOCK_P]
    return b_z + tl.load(b_ptr + rows)[:, None]


@triton.jit
def _dout_pair(row_ptr, x0, W, sd_w, offs_c_d, C: tl.constexpr, BLOCK_P: tl.constexpr):
    """R = 2: dout at columns 2x and 2x + 1 of one output row, loaded as one contiguous
    [C, 2 * BLOCK_P] run (16 B a lane when sd_w = 1) and split into two [C, BLOCK_P]."""
    q = 2 * x0 + tl.arange(0, 2 * BLOCK_P)  # output columns
    b_d = tl.load(row_ptr + offs_c_d[:, None] + (q * sd_w)[None, :],
                  mask=(q < 2 * W)[None, :], other=0.0)  # fmt: skip
    return tl.split(tl.reshape(b_d, [C, BLOCK_P, 2]))


@triton.jit
def _store_cast_weight(w_ptr, w_lo_ptr, offs_c, C: tl.constexpr, RR: tl.constexpr):
    """The fp32 (C*RR, C) weight cast to w_lo's dtype: the backward's operand."""
    for sub in tl.static_range(RR):
        offs_w = (offs_c * RR + sub)[:, None] * C + offs_c[None, :]  # [C, C]
        tl.store(w_lo_ptr + offs_w, tl.load(w_ptr + offs_w).to(w_lo_ptr.dtype.element_ty))


@triton.jit
def upshuffle_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, w_lo_ptr,
    H, W, tiles_per_row,
    sx_n, sx_c, sx_h, sx_w,
    C: tl.constexpr, R: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out (N, C, H*R, W*R contiguous) = GELU(PixelShuffle_R(1x1(x))); x strided.

    Program 0 also writes the fp32 weight cast to x's dtype to w_lo ((C*R*R, C)): the
    backward's operand, cast once per step without a cast launch.
    """
    n, y, x0, x = row_tile(tl.program_id(0), H, tiles_per_row, BLOCK_P)
    offs_c = tl.arange(0, C)
    mask_p = x < W
    b_xt = _input_tile(x_ptr, n, y, x, mask_p, sx_n, sx_c, sx_h, sx_w, offs_c)  # [C, P]
    WO = W * R
    dtype = out_ptr.dtype.element_ty
    out_img = out_ptr + n * C * H * W * (R * R)  # int64 image offset
    plane = offs_c[:, None] * (H * W * R * R)  # [C, 1]
    for i in tl.static_range(R):
        row = out_img + (y * R + i) * WO
        if R == 2:  # the two sub-pixel columns interleaved: one contiguous run of 2P
            g0, _ = _gelu_and_grad(_preact(b_xt, w_ptr, b_ptr, 2 * i, offs_c, C, 4, PRECISION))
            g1, _ = _gelu_and_grad(_preact(b_xt, w_ptr, b_ptr, 2 * i + 1, offs_c, C, 4,
                                           PRECISION))  # fmt: skip
            b_o = tl.interleave(g0.to(dtype), g1.to(dtype))  # [C, 2P]
            q = 2 * x0 + tl.arange(0, 2 * BLOCK_P)
            tl.store(row + plane + q[None, :], b_o, mask=(q < WO)[None, :])
        else:  # lanes along pixels, R elements apart (the R stores fill each other's sectors)
            for j in tl.static_range(R):
                b_z = _preact(b_xt, w_ptr, b_ptr, i * R + j, offs_c, C, R * R, PRECISION)
                b_g, _ = _gelu_and_grad(b_z)
                tl.store(row + plane + (x * R + j)[None, :], b_g.to(dtype),
                         mask=mask_p[None, :])  # fmt: skip
    if tl.program_id(0) == 0:
        _store_cast_weight(w_ptr, w_lo_ptr, offs_c, C, R * R)


@triton.jit
def _stage_columns(x_ptr, n, yy, cols, W, sx_n, sx_c, sx_h, sx_w, w_ptr, b_ptr, sub, offs_c,
                   dtype, C: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
    """x2 stage output f^T [C, len(cols)] at sub-pixel `sub` of input row yy, columns cols
    (masked loads outside the image), in `dtype`."""
    b_xt = _input_tile(x_ptr, n, yy, cols, (cols >= 0) & (cols < W), sx_n, sx_c, sx_h, sx_w,
                       offs_c)  # fmt: skip
    b_f, _ = _gelu_and_grad(_preact(b_xt, w_ptr, b_ptr, sub, offs_c, C, 4, PRECISION))
    return b_f.to(dtype)


@triton.jit
def upshuffle_rgb_fwd_kernel(
    x_ptr, w_ptr, b_ptr, rgb_w_ptr, rgb_b_ptr, skip_ptr, out_ptr, w_lo_ptr,
    H, W, tiles_per_row,
    sx_n, sx_c, sx_h, sx_w, ss_n, ss_c, ss_h, ss_w, IH, IW, inv_scale,
    C: tl.constexpr, R: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
    SKIP: tl.constexpr,
):  # fmt: skip
    """out (N, 3, 2H, 2W contiguous) = conv3x3_reflect(f) + rgb_b (+ the skip:
    `tail_rgb.rgb_epilogue`), f = the x2
    stage GELU(PixelShuffle_2(1x1(x))), f never stored: per input-row tile, output rows
    2y and 2y + 1 at the tile's 2 BLOCK_P columns. They read f-rows refl(2y - 1) ..
    refl(2y + 2) (the outer two recomputed from the neighbouring input rows) and the
    f-columns just outside the tile (from input columns x0 - 1 and x0 + BLOCK_P, in
    aligned 16-pixel chunks); each f-row is multiplied by the 3x3's tap-row weights
    (`tail_rgb.tap_weights`) into G, as in `tail_rgb_fwd_kernel`. Program 0 also writes
    the cast stage weight (w_lo), as `upshuffle_fwd_kernel` does."""
    tl.static_assert(R == 2)
    n, y, x0, x = row_tile(tl.program_id(0), H, tiles_per_row, BLOCK_P)
    offs_c = tl.arange(0, C)
    dtype = x_ptr.dtype.element_ty
    halo = tl.arange(0, 16)
    x_left, x_right = x0 - 16 + halo, x0 + BLOCK_P + halo  # input chunks beside the tile
    g0 = tl.zeros([2 * BLOCK_P, 16], dtype=tl.float32)  # G of output row 2y
    g1 = tl.zeros([2 * BLOCK_P, 16], dtype=tl.float32)  # G of output row 2y + 1
    g0_left = tl.zeros([16], dtype=tl.float32)
    g0_right = tl.zeros([16], dtype=tl.float32)
    g1_left = tl.zeros([16], dtype=tl.float32)
    g1_right = tl.zeros([16], dtype=tl.float32)
    for k in range(4):  # f-row refl(2y - 1 + k) (a runtime loop: unrolled, it spilled)
        yf = reflect(2 * y - 1 + k, 2 * H)
        yy, i = yf // 2, yf % 2
        f0 = _stage_columns(x_ptr, n, yy, x, W, sx_n, sx_c, sx_h, sx_w, w_ptr, b_ptr, 2 * i,
                            offs_c, dtype, C, PRECISION)  # fmt: skip
        f1 = _stage_columns(x_ptr, n, yy, x, W, sx_n, sx_c, sx_h, sx_w, w_ptr, b_ptr, 2 * i + 1,
                            offs_c, dtype, C, PRECISION)  # fmt: skip
        f_t = tl.trans(tl.interleave(f0, f1))  # [2P, C]: f-columns 2 x0 ..
        # f-column 2 x0 - 1 is sub-pixel 1 of input column x0 - 1; 2 x0 + 2P is sub-pixel 0
        # of input column x0 + P.
        f_left = tl.trans(_stage_columns(x_ptr, n, yy, x_left, W, sx_n, sx_c, sx_h, sx_w,
                                         w_ptr, b_ptr, 2 * i + 1, offs_c, dtype, C,
                                         PRECISION))  # fmt: skip
        f_right = tl.trans(_stage_columns(x_ptr, n, yy, x_right, W, sx_n, sx_c, sx_h, sx_w,
                                          w_ptr, b_ptr, 2 * i, offs_c, dtype, C,
                                          PRECISION))  # fmt: skip
        # Tap row k of output row 2y (none at k = 3), k - 1 of 2y + 1 (none at k = 0).
        w_k = tl.where(k <= 2, tap_weights(rgb_w_ptr, tl.minimum(k, 2), C, dtype), 0.0)
        w_k = w_k.to(dtype)
        g0 += tl.dot(f_t, w_k, input_precision=PRECISION)
        g0_left += pick_row(tl.dot(f_left, w_k, input_precision=PRECISION), 15)
        g0_right += pick_row(tl.dot(f_right, w_k, input_precision=PRECISION), 0)
        w_k = tl.where(k >= 1, tap_weights(rgb_w_ptr, tl.maximum(k - 1, 0), C, dtype), 0.0)
        w_k = w_k.to(dtype)
        g1 += tl.dot(f_t, w_k, input_precision=PRECISION)
        g1_left += pick_row(tl.dot(f_left, w_k, input_precision=PRECISION), 15)
        g1_right += pick_row(tl.dot(f_right, w_k, input_precision=PRECISION), 0)
    xf = 2 * x0 + tl.arange(0, 2 * BLOCK_P)
    skip = (skip_ptr, ss_n, ss_c, ss_h, ss_w, IH, IW, inv_scale)
    rgb_epilogue(g0, g0_left, g0_right, n, 2 * y, 2 * x0, xf, 2 * H, 2 * W, rgb_b_ptr, skip,
                 out_ptr, 2 * BLOCK_P, SKIP)  # fmt: skip
    rgb_epilogue(g1, g1_left, g1_right, n, 2 * y + 1, 2 * x0, xf, 2 * H, 2 * W, rgb_b_ptr,
                 skip, out_ptr, 2 * BLOCK_P, SKIP)  # fmt: skip
    if tl.program_id(0) == 0:
        _store_cast_weight(w_ptr, w_lo_ptr, offs_c, C, 4)


@triton.jit
def _rgb_run(d_img, y, i, dy, x0, H, W, sd_c, sd_h, sd_w, BLOCK_P: tl.constexpr):
    """RGB = True: `tail_rgb.dout_rows` of full-resolution row 2y + i and tap row dy over
    the columns 2 x0 - P .. 2 x0 + 3P (the tile's 2P output columns and their neighbours)
    of the final 3x3's output gradient (N, 3, 2H, 2W): [4 BLOCK_P, 16] fp32."""
    run = 2 * x0 - BLOCK_P + tl.arange(0, 4 * BLOCK_P)
    return dout_rows(d_img, 2 * y + i, dy, 2 * H, run, 2 * W, sd_c, sd_h, sd_w)


@triton.jit
def upshuffle_bwd_dx_kernel(
    x_ptr, w_ptr, b_ptr, dout_ptr, rgb_w_ptr, dx_ptr,
    H, W, tiles_per_row,
    sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
    C: tl.constexpr, R: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
    RGB: tl.constexpr,
):  # fmt: skip
    """dx (N, C, H, W contiguous, x's dtype) = sum over (i, j) of W_ij^T (GELU'(z) * dout).

    RGB (R = 2 only): dout_ptr is the gradient of the tail's final reflect 3x3 (weights
    rgb_w_ptr, (3, C, 3, 3) fp32), whose input is this stage's output: the stage's own
    output gradient is formed here from it, in fp32 (module doc)."""
    n, y, x0, x = row_tile(tl.program_id(0), H, tiles_per_row, BLOCK_P)
    offs_c = tl.arange(0, C)
    mask_p = x < W
    dtype = x_ptr.dtype.element_ty
    b_xt = _input_tile(x_ptr, n, y, x, mask_p, sx_n, sx_c, sx_h, sx_w, offs_c)  # [C, P]
    b_dx = tl.zeros([C, BLOCK_P], dtype=tl.float32)
    at = 2 * tl.arange(0, BLOCK_P) + BLOCK_P  # column 2x of the run in `_rgb_run`
    for i in tl.static_range(R):
        row = dout_ptr + n * sd_n + (y * R + i) * sd_h
        if RGB:  # d(stage output) at columns 2x, 2x + 1 = sum over taps of Wk_dy E_dy^T
            tl.static_assert(R == 2)
            d0 = tl.zeros([C, BLOCK_P], dtype=tl.float32)
            d1 = tl.zeros([C, BLOCK_P], dtype=tl.float32)
            for dy in tl.static_range(3):
                b_run = _rgb_run(dout_ptr + n * sd_n, y, i, dy, x0, H, W, sd_c, sd_h, sd_w,
                                 BLOCK_P)  # fmt: skip
                w_k = tap_weights(rgb_w_ptr, dy, C, dtype)  # [C, 16]
                e0, _ = tap_grads(b_run, at, 2 * x, 2 * W, mask_p, dtype)  # [P, 16]
                e1, _ = tap_grads(b_run, at + 1, 2 * x + 1, 2 * W, mask_p, dtype)
                d0 += tl.dot(w_k, tl.trans(e0), input_precision=PRECISION)
                d1 += tl.dot(w_k, tl.trans(e1), input_precision=PRECISION)
        elif R == 2:
            d0, d1 = _dout_pair(row, x0, W, sd_w, offs_c * sd_c, C, BLOCK_P)
        for j in tl.static_range(R):
            if R == 2:
                b_do = d0 if j == 0 else d1
            else:
                b_do = tl.load(row + offs_c[:, None] * sd_c + ((x * R + j) * sd_w)[None, :],
                               mask=mask_p[None, :], other=0.0)  # fmt: skip
            b_z = _preact(b_xt, w_ptr, b_ptr, i * R + j, offs_c, C, R * R, PRECISION)
            _, b_dg = _gelu_and_grad(b_z)
            b_dz = (b_dg * b_do.to(tl.float32)).to(dtype)  # [C_out, P]
            rows = offs_c * (R * R) + (i * R + j)
            w_t = tl.load(w_ptr + rows[None, :] * C + offs_c[:, None]).to(dtype)  # [C_in, C_out]
            b_dx += tl.dot(w_t, b_dz, input_precision=PRECISION)
    ptr = dx_ptr + n * C * H * W + offs_c[:, None] * (H * W) + (y * W + x)[None, :]
    tl.store(ptr, b_dx.to(dtype), mask=mask_p[None, :])


@triton.jit
def upshuffle_bwd_dw_kernel(
    x_ptr, w_ptr, b_ptr, dout_ptr, rgb_w_ptr, part_ptr, rgb_part_ptr,
    H, W, tiles_per_row, num_tiles, num_chunks, part_stride, rgb_part_stride,
    sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
    C: tl.constexpr, R: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
    RGB: tl.constexpr,
):  # fmt: skip
    """Program pid = chunk * R*R + sub accumulates, over tiles chunk, chunk + num_chunks, ...,
    the fp32 partials of dW rows c*R*R + sub ([C, C]) and of db at those rows.

    Partials are packed per chunk in the parameters' own order, [C*R*R, C] weight then
    [C*R*R] bias (C*R*R*(C + 1) floats from `part_ptr + chunk * part_stride`: a row of a
    buffer other ops may share), so one row sum gives both. A chunk with no tile writes
    zeros.

    RGB (R = 2 only): dout_ptr is the final 3x3's output gradient, as in the dx kernel,
    and each program also writes the partials of that 3x3's weight and bias over its
    sub-pixel's output pixels (`tail_rgb.store_partials`, 27 C + 3 floats at
    rgb_part_ptr + pid * rgb_part_stride): the four programs of a chunk cover every output
    pixel of its tiles once.
    """
    pid = tl.program_id(0)
    chunk = pid // (R * R)
    sub = pid % (R * R)
    i = sub // R
    j = sub % R
    offs_c = tl.arange(0, C)
    dtype = x_ptr.dtype.element_ty
    acc_w = tl.zeros([C, C], dtype=tl.float32)
    acc_b = tl.zeros([C], dtype=tl.float32)
    acc_r0 = tl.zeros([C, 16], dtype=tl.float32)  # RGB: the 3x3's dW^T, tap rows 0, 1, 2
    acc_r1 = tl.zeros([C, 16], dtype=tl.float32)
    acc_r2 = tl.zeros([C, 16], dtype=tl.float32)
    acc_rb = tl.zeros([16], dtype=tl.float32)  # RGB: its db[o] at column 3 + o
    at = 2 * tl.arange(0, BLOCK_P) + BLOCK_P + j  # column 2x + j of the run in `_rgb_run`
    for tile in range(chunk, num_tiles, num_chunks):
        n, y, x0, x = row_tile(tile, H, tiles_per_row, BLOCK_P)
        mask_p = x < W
        b_xt = _input_tile(x_ptr, n, y, x, mask_p, sx_n, sx_c, sx_h, sx_w, offs_c)
        b_z = _preact(b_xt, w_ptr, b_ptr, sub, offs_c, C, R * R, PRECISION)
        b_g, b_dg = _gelu_and_grad(b_z)
        row = dout_ptr + n * sd_n + (y * R + i) * sd_h
        if RGB:  # the stage's output gradient at (2y + i, 2x + j) and the 3x3's dW
            tl.static_assert(R == 2)
            b_do = tl.zeros([C, BLOCK_P], dtype=tl.float32)
            b_f = b_g.to(dtype)  # [C, P]: the 3x3's input at these pixels
            for dy in tl.static_range(3):
                b_run = _rgb_run(dout_ptr + n * sd_n, y, i, dy, x0, H, W, sd_c, sd_h, sd_w,
                                 BLOCK_P)  # fmt: skip
                b_e, b_d = tap_grads(b_run, at, 2 * x + j, 2 * W, mask_p, dtype)  # [P, 16]
                b_do += tl.dot(tap_weights(rgb_w_ptr, dy, C, dtype), tl.trans(b_e),
                               input_precision=PRECISION)  # fmt: skip
                acc = tl.dot(b_f, b_e, input_precision=PRECISION)  # [C, 16]
                if dy == 0:
                    acc_r0 += acc
                elif dy == 1:
                    acc_r1 += acc
                    acc_rb += tl.sum(b_d, axis=0)  # each output pixel's own dout, once
                else:
                    acc_r2 += acc
        elif R == 2:  # the whole output row run (vectorised), this program's half kept
            d0, d1 = _dout_pair(row, x0, W, sd_w, offs_c * sd_c, C, BLOCK_P)
            b_do = tl.where(j == 0, d0, d1)
        else:
            b_do = tl.load(row + offs_c[:, None] * sd_c + ((x * R + j) * sd_w)[None, :],
                           mask=mask_p[None, :], other=0.0)  # fmt: skip
        b_dz = b_dg * b_do.to(tl.float32)  # [C_out, P]; 0 at masked pixels
        acc_w += tl.dot(b_dz.to(dtype), tl.trans(b_xt), input_precision=PRECISION)
        acc_b += tl.sum(b_dz, axis=1)
    rows = offs_c * (R * R) + sub  # weight / bias rows of this sub-pixel
    part = part_ptr + chunk.to(tl.int64) * part_stride
    tl.store(part + rows[:, None] * C + offs_c[None, :], acc_w)
    tl.store(part + C * R * R * C + rows, acc_b)
    if RGB:
        rgb_part = rgb_part_ptr + pid.to(tl.int64) * rgb_part_stride
        store_partials(rgb_part, tl.trans(acc_r0), tl.trans(acc_r1), tl.trans(acc_r2), acc_rb, C)


# ---------------------------------------------------------------------------------------
# Configs and launchers


def upshuffle_config(channels: int, dtype: torch.dtype, factor: int, kernel: str,
                     rgb: bool = False) -> KernelConfig:  # fmt: skip
    """The config a launcher runs `kernel` ("fwd", "bwd_dx", "bwd_dw") with (rgb: with the
    final 3x3 fused in: `upshuffle_rgb_fwd_kernel`, the backward kernels' RGB=True).

    Chosen so no config spills on sm_90 / sm_80 at C = 64 (`ssiu check-kernels`): 32-pixel
    tiles for 16-bit inputs, 16 for fp32; 4 warps for the forward and the 16-bit r = 2 dx
    backward (at 8 warps its two warpgroups held the same [C, BLOCK_P] tiles and did the
    same work: 3,472 static instructions a thread at 8 warps, 3,520 at 4, sm_90; at r = 3
    4 warps spill), 8 for the other backward kernels. fp32 dots use TF32 ("ieee" fp32
    dots run on FMA units and spill): "tf32x3" (about fp32 accuracy) in the forward,
    "tf32" in the backward, where tf32x3 spills.
    With the 3x3 fused (rgb) the backward kernels take 16-pixel tiles at every width and
    dtype (at 32, bf16 reached 255 registers on sm_80, the dW kernel spilling 564 bytes);
    the 16-bit dW kernel runs 4 warps capped at the 232 headroom (training build: 200
    registers on sm_90, 228 on sm_80, no spills; 2 CTAs an SM fit), the fp32 one 8 warps
    capped at 232 (255 on sm_80 uncapped, no spills capped). The fused forward
    (`upshuffle_rgb_fwd_kernel`, 16-bit only: in fp32 it spilled 176-248 bytes on sm_90
    at 4 or 8 warps) keeps 32-pixel tiles on 4 warps, capped at 232 (bf16: 205 registers
    on sm_90, 220 on sm_80): with 16 its [2 BLOCK_P, 4] RGB stores put one 2-byte pixel
    on a lane.
    The interpreter computes every dot exactly.
    """
    wide = dtype == torch.float32
    block_p = 16 if wide else 32
    block_p = max(16, min(block_p, block_p * 64 // channels))
    warps = 4 if kernel == "fwd" or (kernel == "bwd_dx" and not wide and factor == 2) else 8
    maxnreg = None
    precision = ("tf32x3" if kernel == "fwd" else "tf32") if wide else "ieee"
    if rgb:
        block_p = 32 if kernel == "fwd" else 16
        maxnreg = 232 if kernel in ("fwd", "bwd_dw") else None
        warps = 4 if kernel == "bwd_dw" and not wide else warps
        precision = "tf32" if wide else precision  # the 3x3's (tail_rgb_config)
    constexprs = {"C": channels, "R": factor, "BLOCK_P": block_p, "PRECISION": precision}
    return KernelConfig(constexprs, num_warps=warps, num_stages=1, maxnreg=maxnreg)


def _dw_ctas_per_sm(dtype: torch.dtype, arch: int) -> int:
    """Resident CTAs per SM of upshuffle_bwd_dw, as `ssiu check-kernels` reports (warps/SM):
    2 in 16-bit on sm_90 (8 warps at 97 registers; with the 3x3 fused, 4 warps at 200),
    else 1 (fp32; 16-bit on sm_80: 162 registers at 8 warps). One count serves every
    stage of a tail (their partials share one row count)."""
    return 2 if dtype != torch.float32 and arch >= 90 else 1


def gradients_size(channels: int, factor: int) -> int:
    """Floats of one stage's packed gradient (and of a row of its dW partials): the
    weight (C*r*r, C) then the bias (C*r*r,)."""
    return channels * factor * factor * (channels + 1)


def partials_rows(device: torch.device, dtype: torch.dtype, factor: int) -> int:
    """Chunks (partial rows) of upshuffle_bwd_dw at this factor: its chunks * r*r programs
    make one wave (`persistent_programs`), so no program waits for a second one and the
    partials are no larger than what runs at once."""
    ctas = _dw_ctas_per_sm(dtype, device_arch(device))
    return max(1, persistent_programs(device, ctas) // (factor * factor))


def _weight(weight: torch.Tensor, bias: torch.Tensor):
    """(C_out, C_in) weight and bias in fp32 (views of fp32 parameters). The forward casts
    the weight in registers and writes the cast copy the backward reads (an fp32 tile
    would cost upshuffle_bwd_dx 80 registers: 102 -> 181)."""
    c_out, c_in = weight.shape[:2]
    return weight.reshape(c_out, c_in).float().contiguous(), bias.float().contiguous()


def _row_tiles(w: int, config: KernelConfig) -> int:
    return cdiv(w, config.constexprs["BLOCK_P"])


def upshuffle_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, factor: int):
    """GELU(PixelShuffle_r(conv1x1(x, weight, bias))). x: (N, C, H, W) any strides;
    weight (C*r*r, C, 1, 1), bias (C*r*r,). Returns (N, C, H*r, W*r) contiguous and w_lo,
    the weight (C*r*r, C) in x's dtype for `upshuffle_bwd`."""
    n, c, h, w = x.shape
    cfg = upshuffle_config(c, x.dtype, factor, "fwd")
    tiles_per_row = _row_tiles(w, cfg)
    out = empty((n, c, h * factor, w * factor), dtype=x.dtype, device=x.device)
    w_lo = empty((c * factor * factor, c), dtype=x.dtype, device=x.device)
    upshuffle_fwd_kernel[(n * h * tiles_per_row,)](
        x, *_weight(weight, bias), out, w_lo, h, w, tiles_per_row, *x.stride(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )  # fmt: skip
    return out, w_lo


def upshuffle_rgb_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      rgb_weight: torch.Tensor, rgb_bias: torch.Tensor,
                      skip: torch.Tensor | None, image: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """conv3x3_reflect(GELU(PixelShuffle_2(conv1x1(x, weight, bias))), rgb_weight, rgb_bias)
    + skip or + bilinear_upsample(image) (or neither), the x2 stage's output never stored.
    x (N, C, H, W) any strides; weight (4C, C, 1, 1), bias (4C,); rgb_weight (3, C, 3, 3),
    rgb_bias (3,); skip (N, 3, 2H, 2W) or image (N, 3, 2H / s, 2W / s), each x's dtype or
    fp32. Returns (N, 3, 2H, 2W) contiguous in `tail_rgb.output_dtype` and w_lo, as
    `upshuffle_fwd`."""
    n, c, h, w = x.shape
    cfg = upshuffle_config(c, x.dtype, 2, "fwd", rgb=True)
    tiles_per_row = _row_tiles(w, cfg)
    out = empty((n, 3, 2 * h, 2 * w), dtype=output_dtype(x, skip, image), device=x.device)
    w_lo = empty((4 * c, c), dtype=x.dtype, device=x.device)
    mode, skip_args = skip_arguments(out, skip, image)
    upshuffle_rgb_fwd_kernel[(n * h * tiles_per_row,)](
        x, *_weight(weight, bias), rgb_weight.float().contiguous(),
        rgb_bias.float().contiguous(), skip_args[0], out, w_lo, h, w, tiles_per_row,
        *x.stride(), *skip_args[1:], SKIP=mode, **cfg.launch_options(), **cfg.constexprs,
    )  # fmt: skip
    return out, w_lo


def upshuffle_bwd(
    dout: torch.Tensor, x: torch.Tensor, w_lo: torch.Tensor, bias: torch.Tensor, factor: int,
    partials: torch.Tensor | None = None, rgb: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """[dx, dparams]: dx contiguous in x's dtype; dparams the fp32 sum of the weight and
    bias gradients packed flat in that order (`partials.split_flat` views them). w_lo:
    the forward's cast weight.

    partials: a [chunks, gradients_size(C, r)] fp32 view (unit column stride) of a buffer
    shared with other ops: the dW programs write their partials there (chunks * r*r
    programs; chunks without a tile write zeros) and dparams is None (the caller reduces
    the buffer once).

    rgb: (weight (3, C, 3, 3), rgb_partials) when this x2 stage feeds the tail's final
    reflect 3x3: dout is then that 3x3's output gradient (N, 3, 2H, 2W; x's dtype or fp32,
    read as it is: `tail_rgb.rgb_dout`), the stage's own output gradient is formed in the
    kernels, and the dW programs write the 3x3's weight and bias partials to rgb_partials,
    [chunks * 4, tail_rgb.gradients_size(C)] (one row per dW program; needs `partials`)."""
    n, c, h, w = x.shape
    rr = factor * factor
    w2d, b32 = w_lo, bias.float().contiguous()
    dout = dout.to(x.dtype) if rgb is None else rgb_dout(dout, x.dtype)
    if rgb is not None:
        if factor != 2 or partials is None:
            raise ValueError("the 3x3's backward fuses into an x2 stage with shared partials")
        rgb_w, rgb_part = rgb[0].float().contiguous(), rgb[1]
    else:
        rgb_w, rgb_part = b32, b32  # fp32 placeholder pointers (RGB=False reads neither)

    cfg = upshuffle_config(c, x.dtype, factor, "bwd_dx", rgb is not None)
    tiles_per_row = _row_tiles(w, cfg)
    dx = empty((n, c, h, w), dtype=x.dtype, device=x.device)
    upshuffle_bwd_dx_kernel[(n * h * tiles_per_row,)](
        x, w2d, b32, dout, rgb_w, dx, h, w, tiles_per_row, *x.stride(), *dout.stride(),
        **cfg.launch_options(), RGB=rgb is not None, **cfg.constexprs,
    )  # fmt: skip

    cfg = upshuffle_config(c, x.dtype, factor, "bwd_dw", rgb is not None)
    tiles_per_row = _row_tiles(w, cfg)
    num_tiles = n * h * tiles_per_row
    part = partials
    if part is None:
        chunks = min(num_tiles, partials_rows(x.device, x.dtype, factor))
        part = empty((chunks, gradients_size(c, factor)), dtype=torch.float32, device=x.device)
    chunks = part.shape[0]
    if rgb is not None and rgb_part.shape[0] != chunks * rr:
        raise ValueError(f"rgb partials need {chunks * rr} rows, got {rgb_part.shape[0]}")
    upshuffle_bwd_dw_kernel[(chunks * rr,)](
        x, w2d, b32, dout, rgb_w, part, rgb_part, h, w, tiles_per_row, num_tiles, chunks,
        part.stride(0), rgb_part.stride(0), *x.stride(), *dout.stride(),
        **cfg.launch_options(), RGB=rgb is not None, **cfg.constexprs,
    )  # fmt: skip
    return [dx, sum_partials(part) if partials is None else None]


# ---------------------------------------------------------------------------------------
# Registry: every (kernel, config) the launchers above can pick for C = 64, r = 2 and 3.

_X = ("sx_n", "sx_c", "sx_h", "sx_w")
_SIZES = ("H", "W", "tiles_per_row")
_D = ("sd_n", "sd_c", "sd_h", "sd_w")
_RGB = "rgb_w_ptr"  # fp32
register(
    KernelSpec(
        name=upshuffle_rgb_fwd_kernel.__name__,
        fn=upshuffle_rgb_fwd_kernel,
        signature=dtype_signature(
            [
                p.split(":")
                for p in "x_ptr:dt w_ptr b_ptr rgb_w_ptr rgb_b_ptr skip_ptr:dt "
                "out_ptr:dt w_lo_ptr:dt".split()
            ],
            (*_SIZES, *_X, "ss_n", "ss_c", "ss_h", "ss_w", "IH", "IW"),
            floats=("inv_scale",),
        ),  # fmt: skip
        configs=tuple(
            # 16-bit only; an fp32 skip and output (autocast) too.
            DtypeConfig.of(
                upshuffle_config(64, dt, 2, "fwd", rgb=True), dt, {"SKIP": mode.value}, wide
            )  # fmt: skip
            for dt in KERNEL_DTYPES
            if dt != torch.float32
            for mode in (SKIP_NONE, SKIP_MAP, SKIP_IMAGE)
            for wide in ((), ("skip_ptr", "out_ptr"))
            if not (wide and mode == SKIP_NONE)
        ),
    )
)
for _kernel, _name, _pointers, _scalars in (
    (upshuffle_fwd_kernel, "fwd", "x_ptr:dt w_ptr b_ptr out_ptr:dt w_lo_ptr:dt",
     (*_SIZES, *_X)),
    (upshuffle_bwd_dx_kernel, "bwd_dx", f"x_ptr:dt w_ptr:dt b_ptr dout_ptr:dt {_RGB} dx_ptr:dt",
     (*_SIZES, *_X, *_D)),
    (upshuffle_bwd_dw_kernel, "bwd_dw",
     f"x_ptr:dt w_ptr:dt b_ptr dout_ptr:dt {_RGB} part_ptr rgb_part_ptr",
     (*_SIZES, "num_tiles", "num_chunks", "part_stride", "rgb_part_stride", *_X, *_D)),
):  # fmt: skip
    # The backward kernels also run with the final 3x3 fused in (RGB, x2 stages only).
    _rgb = (False, True) if _name != "fwd" else (None,)
    register(
        KernelSpec(
            name=_kernel.__name__,
            fn=_kernel,
            signature=dtype_signature([p.split(":") for p in _pointers.split()], _scalars),
            configs=tuple(
                DtypeConfig.of(
                    upshuffle_config(64, dt, r, _name, bool(rgb)),
                    dt,
                    {} if rgb is None else {"RGB": rgb},
                    wide,
                )
                for dt in KERNEL_DTYPES
                for r in FACTORS
                for rgb in _rgb
                if not (rgb and r != 2)
                # the 3x3's output gradient in fp32 (an fp32 skip: autocast)
                for wide in (((), ("dout_ptr",)) if rgb and dt != torch.float32 else ((),))
            ),
        )
    )

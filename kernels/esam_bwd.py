"""ESAM backward outside the attention: LocalProp, the window fold, qkv 1x1 and max-pool.

The forward (see `ssiu.kernels.esam`) on v: (N, C, H, W), Hh, Wh = H/2, W/2, the sampled
grid padded to whole blocks Hp, Wp:

    u   = max_pool_2x2(v)                           # (N, C, Hh, Wh)
    qkv = 1x1(reflect_pad(u))                       # (N, 3C, Hp, Wp)
    o   = attention(qkv)                            # (N, C, Hp, Wp)
    t   = dw3x3_reflect(o) + bias                   # (N, C, Hp, Wp)
    out = crop(bilinear_x2_ac(t)) (+ v)             # (N, C, H, W)

Its adjoints, every one written as a gather (each output element sums the inputs that
reach it, in a fixed order): no atomics, so the gradients are bit-identical run to run.
Weight gradients are fp32 per-program partial sums (programs loop over tiles), summed by
the launcher in a fixed order.

1. `esam_prop_bwd_dt_kernel`: dt = the bilinear (align_corners=True) adjoint of the cropped
   dout, at the quarter-res grid. For output row y the forward reads rows y0 = floor(y s)
   and min(y0 + 1, Hp - 1), s = (Hp - 1) / (2 Hp - 1) in (0.43, 0.5) for Hp >= 8; so row
   i of dt receives from output rows 2i - 2 .. 2i + 3 only (6 x 6 candidates, weights
   recomputed with the forward's fp32 formula, zero for the others). The same program
   adds its tile's share of d bias = sum dt and d w[tap] = sum dt * o[reflect(p + tap)].
2. `esam_prop_bwd_do_kernel`: dO = the adjoint of dw3x3 with reflect pad 1, at the
   quarter-res grid. Pixel a of an axis gets dt[a - d] w[d] (tap d, when a - d is on the
   grid) plus, through the reflection, dt[0] w[-1] if a == 1 and dt[Hp - 1] w[+1] if
   a == Hp - 2.
3. `esam_qkv_bwd_kernel` (persistent, one pass over v): per row tile of the sampled grid,
   g = the gradient of the sampled grid u before the qkv 1x1, per projection (q, k, v),
   gathered in registers (`_folded`): the fold of the overlapping dK, dV windows (a
   padded-grid pixel sums the windows of the blocks that contain it) and the reflect-pad
   adjoint (a real pixel sums the padded pixels that mirror onto it). Then du = g W (the
   [C, 3C] product) and the max-pool adjoint: du goes to the first maximum of each 2x2
   window in row-major order (strictly greater replaces, NaN wins, as PyTorch's
   max_pool2d), the other three get 0; + dout for the residual; writes dv in v's dtype.
   From the same tiles dW_qkv = sum over pixels of g^T u (u = the window maxima); fp32
   partials. (Was a fold kernel writing g, fp32, and this one reading it: 0.56 GB and 9
   launches more per training step, modelled; before that a dx and a dw kernel each read
   g and v.)

All gradients are fp32 until the final cast; the fp32 dots of 4 are one TF32 product
(as the MSGM backward; the interpreter is exact). Image and channel-plane offsets are
int64, pixel indices inside an image int32 (int64 division costs registers).

Floors, per full-resolution pixel at C = 64 in bf16 (the whole ESAM backward): read dout, v
(2 x 128 B), o at quarter resolution (32 B), write dv (128 B): ~420 B. FLOPs: the qkv 1x1
backward 2 x 2 x 3C^2 / 4 ~ 12 kFLOP, the attention backward ~20 kFLOP (tensor cores): so
memory bound. These kernels move about 3x that floor (estimate from the buffers, not
measured): dt, dO, dq (fp32, C / 4 each, written and read) and the dK / dV windows
(fp32, 1.56 x C / 4 each).

The full-resolution and quarter-resolution maps are read and written on row tiles
([C, pixels] tiles, lanes along the contiguous pixel axis): 2x2 windows as contiguous
runs of 2 BW pixels split / joined in registers (dx, dw), neighbour and bilinear taps as
aligned runs shifted by `tl.gather` (dt, dO), so no load or store of an activation moves
2 bytes a lane. SASS (`ssiu check-kernels`, training specialisation, bf16, C = 64),
registers sm_90 / sm_80 under triton 3.9 (3.6 within a few), no spills anywhere:
- dt: 112 / 106 regs (8 warps); LDG / STG 16 B only (was 16 LDG of 2 B).
- do: 153 / 128 regs; LDG / STG 16 B only, the dw3x3 weights as one [16, C] table (was
  33 LDG of 4 B).
- qkv (8 warps, the fold inside): at most 189 regs (3.9) / 222 (3.6) over sm_90 and
  sm_80 (the three parts in a runtime loop; unrolled, sm_80 spilled); v, dout LDG 16B,
  dv STG 16B, partials STG 16B; dq and the windows gathered LDG 4B (fp32, F.fold
  layout; mirror rows and window rows that do not exist skipped by scalar branches).
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
    max_programs,
)
from ssiu.kernels.esam import _tap, _tap_table, _windows
from ssiu.kernels.indexing import reflect, row_tile
from ssiu.kernels.partials import sum_partials
from ssiu.kernels.registry import KernelConfig, KernelSpec, register

PARTIAL_ROWS = tl.constexpr(16)  # rows of a LocalProp weight partial: 9 taps, the bias, padding


@triton.jit
def _bilinear_weight(y, i, size_in, scale):
    """Weight of source row i in the align_corners bilinear value at output row y (fp32)."""
    src = y.to(tl.float32) * scale
    y0 = src.to(tl.int64)  # floor (src >= 0)
    lam = src - y0.to(tl.float32)
    y1 = tl.where(y0 < size_in - 1, y0 + 1, y0)
    return tl.where(y0 == i, 1.0 - lam, 0.0) + tl.where(y1 == i, lam, 0.0)


@triton.jit(do_not_specialize=["num_tiles", "tiles_per_row"])
def esam_prop_bwd_dt_kernel(
    dout_ptr, o_ptr, dt_ptr, part_ptr,
    H, W, Hp, Wp, num_tiles, tiles_per_row, part_stride,
    sd_n, sd_c, sd_h, sd_w, scale_h, scale_w,
    C: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """dt (N, C, Hp, Wp) fp32 and this program's partial of d w (C, 1, 3, 3) and d bias
    (C,), written in those layouts (9 C then C floats) at row pid of the partials.

    dout strided (N, C, H, W); o (N, C, Hp, Wp) contiguous. Programs loop over row tiles
    of the quarter-res grid (row i, columns j0 .. j0 + BJ - 1, [C, pixels] tiles, lanes
    along the pixels). The six candidate dout rows 2i - 2 .. 2i + 3 are loaded as aligned
    runs of 4 BJ columns from 2 j0 - BJ (the candidates 2j - 2 .. 2j + 3 of every column
    j of the tile), summed with their row weights (scalars), and the column adjoint
    taken by six gathers in registers, each with its per-column weight.
    """
    pid = tl.program_id(0)
    offs_c = tl.arange(0, C)
    offs_r = tl.arange(0, PARTIAL_ROWS)
    acc = tl.zeros([PARTIAL_ROWS, C], dtype=tl.float32)  # rows 0..8: taps, row 9: bias
    HW = Hp * Wp
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        n, i, j0, j = row_tile(tile, Hp, tiles_per_row, BJ)
        x_first = 2 * j0 - BJ
        xs = x_first + tl.arange(0, 4 * BJ)  # [4 BJ] output columns
        dout_img = dout_ptr + n * sd_n + offs_c[:, None].to(tl.int64) * sd_c
        b_rows = tl.zeros([C, 4 * BJ], dtype=tl.float32)  # weighted sum of the rows
        for k in tl.static_range(6):
            y = 2 * i + k - 2
            inside = (y >= 0) & (y < H)
            wy = tl.where(inside, _bilinear_weight(y, i, Hp, scale_h), 0.0)
            limit = tl.where(inside, W, 0)  # a scalar bound (no scalar mask: interpreter)
            ptr = dout_img + y.to(tl.int64) * sd_h + (xs * sd_w)[None, :]
            b_d = tl.load(ptr, mask=((xs >= 0) & (xs < limit))[None, :], other=0.0)
            b_rows += wy * b_d.to(tl.float32)  # [C, 4 BJ]
        b_dt = tl.zeros([C, BJ], dtype=tl.float32)
        for k in tl.static_range(6):
            x = 2 * j + k - 2  # [BJ]
            wx = tl.where((x >= 0) & (x < W), _bilinear_weight(x, j, Wp, scale_w), 0.0)
            b_dt += wx[None, :] * _columns(b_rows, x - x_first, C, BJ)  # [C, BJ]
        ptr_dt = dt_ptr + (n * C + offs_c[:, None]) * HW + (i * Wp + j)[None, :]
        tl.store(ptr_dt, b_dt, mask=(j < Wp)[None, :])
        # Weight partials: d w[c, tap] += sum_j dt[c, j] o[c, reflect(i + dh), reflect(j + dw)]
        # from aligned runs of 2 BJ o columns from j0 - BJ / 2 (holding j0 - 1 .. j0 + BJ).
        o_first = j0 - BJ // 2
        o_cols = o_first + tl.arange(0, 2 * BJ)  # [2 BJ]
        o_img = o_ptr + (n * C + offs_c[:, None]) * HW
        for dh in tl.static_range(3):
            row = reflect(i + dh - 1, Hp)
            b_o = tl.load(o_img + (row * Wp + o_cols)[None, :],
                          mask=((o_cols >= 0) & (o_cols < Wp))[None, :], other=0.0)  # fmt: skip
            b_o = b_o.to(tl.float32)  # [C, 2 BJ]
            for dw in tl.static_range(3):
                b_sh = _columns(b_o, reflect(j + dw - 1, Wp) - o_first, C, BJ)  # [C, BJ]
                contrib = tl.sum(b_dt * b_sh, axis=1)  # [C]
                acc += tl.where(offs_r[:, None] == dh * 3 + dw, contrib[None, :], 0.0)
        acc += tl.where(offs_r[:, None] == 9, tl.sum(b_dt, axis=1)[None, :], 0.0)
    # Row r < 9 is tap r of every channel (w[c, tap] at c * 9 + tap), row 9 the bias.
    is_tap = offs_r[:, None] < 9
    offs = tl.where(is_tap, offs_c[None, :] * 9 + offs_r[:, None], 9 * C + offs_c[None, :])
    tl.store(part_ptr + pid.to(tl.int64) * part_stride + offs, acc, mask=(offs_r < 10)[:, None])


@triton.jit
def _columns(t, idx, C: tl.constexpr, BJ: tl.constexpr):
    """t [C, K] read at columns idx [BJ] -> [C, BJ] (idx clamped into t: unused there)."""
    idx = tl.minimum(tl.maximum(idx, 0), t.shape[1] - 1)
    return tl.gather(t, tl.broadcast_to(idx[None, :], [C, BJ]), axis=1)


@triton.jit(do_not_specialize=["tiles_per_row"])
def esam_prop_bwd_do_kernel(
    dt_ptr, pw_ptr, do_ptr,
    Hp, Wp, tiles_per_row,
    C: tl.constexpr, BJ: tl.constexpr,
):  # fmt: skip
    """dO (N, C, Hp, Wp) fp32 = adjoint of dw3x3_reflect at dt (N, C, Hp, Wp) fp32; pw
    (C, 9) fp32.

    One program per row tile (row a, columns b0 .. b0 + BJ - 1, [C, pixels] tiles). For
    tap row dh the dt rows that reach row a are a - dh (on the grid) and, through the
    reflection, 0 (dh = -1, a = 1) or Hp - 1 (dh = +1, a = Hp - 2): loaded as aligned
    runs of 2 BJ columns from b0 - BJ / 2 (16 B a lane), summed per column tap with the
    tap weights, then the column adjoint taken the same way by gathers in registers.
    """
    n, a, b0, b = row_tile(tl.program_id(0), Hp, tiles_per_row, BJ)
    offs_c = tl.arange(0, C)
    HW = Hp * Wp
    first = b0 - BJ // 2
    cols = first + tl.arange(0, 2 * BJ)  # [2 BJ]
    in_cols = (cols >= 0) & (cols < Wp)
    dt_img = dt_ptr + (n * C + offs_c[:, None]) * HW
    b_w = _tap_table(pw_ptr, offs_c, C)  # [16, C]
    acc_l = tl.zeros([C, 2 * BJ], dtype=tl.float32)  # tap column dw = -1, by dt column
    acc_m = tl.zeros([C, 2 * BJ], dtype=tl.float32)
    acc_r = tl.zeros([C, 2 * BJ], dtype=tl.float32)
    for dh in tl.static_range(3):
        r0 = a - (dh - 1)
        # Scalar row conditions as column bounds (the interpreter rejects scalar masks).
        lim0 = tl.where((r0 >= 0) & (r0 < Hp), Wp, 0)
        b_t = tl.load(dt_img + (r0 * Wp + cols)[None, :],
                      mask=((cols >= 0) & (cols < lim0))[None, :], other=0.0)  # fmt: skip
        if dh != 1:  # the reflected source row, when there is one
            r1 = 0 if dh == 0 else Hp - 1
            lim1 = tl.where(a == (1 if dh == 0 else Hp - 2), Wp, 0)
            b_t += tl.load(dt_img + (r1 * Wp + cols)[None, :],
                           mask=((cols >= 0) & (cols < lim1))[None, :], other=0.0)  # fmt: skip
        acc_l += _tap(b_w, dh * 3)[:, None] * b_t  # [C, 2 BJ]
        acc_m += _tap(b_w, dh * 3 + 1)[:, None] * b_t
        acc_r += _tap(b_w, dh * 3 + 2)[:, None] * b_t
    acc_l = tl.where(in_cols[None, :], acc_l, 0.0)
    acc_r = tl.where(in_cols[None, :], acc_r, 0.0)
    # Columns: b gets tap dw from b - dw, and from 0 (dw = -1, b = 1) or Wp - 1 (dw = +1,
    # b = Wp - 2); columns outside the grid hold 0 above.
    b_do = _columns(acc_m, b - first, C, BJ)
    b_do += _columns(acc_l, b + 1 - first, C, BJ)
    b_do += tl.where((b == 1)[None, :], _columns(acc_l, b * 0 - first, C, BJ), 0.0)
    b_do += _columns(acc_r, b - 1 - first, C, BJ)
    b_do += tl.where((b == Wp - 2)[None, :], _columns(acc_r, b * 0 + Wp - 1 - first, C, BJ),
                     0.0)  # fmt: skip
    tl.store(do_ptr + (n * C + offs_c[:, None]) * HW + (a * Wp + b)[None, :], b_do,
             mask=(b < Wp)[None, :])  # fmt: skip


@triton.jit
def _folded(dq_ptr, dkvw_ptr, part, n, images, y, x, Hh, Wh, Hp, Wp, blocks_h, blocks_w,
            offs_c, C: tl.constexpr, BLOCK: tl.constexpr, HALO: tl.constexpr,
            BW: tl.constexpr):  # fmt: skip
    """g[part] at sampled row y, columns x: [C, BW] fp32, the gradient of one projection
    (q, k, v) summed onto the real sampled pixels (the fold and reflect-pad adjoints).

    dq (N, C, Hp, Wp) fp32; dkvw (2, N, C * WIN^2, blocks) fp32: the dK and dV windows
    (`F.fold` layout). A real pixel (y, x) sums the padded pixels that reflect onto it
    (itself and its mirror past the bottom / right edge, 2 Hh - 2 - y when that lies in
    the padding rows Hh .. Hp - 1), and for k, v each of those over the windows that hold
    it ((2 NB + 1)^2 candidates, NB = ceil(HALO / BLOCK) blocks away). Rows are scalars:
    a mirror row or window row that does not exist is skipped, not masked.
    """
    WIN: tl.constexpr = BLOCK + 2 * HALO
    NB: tl.constexpr = (HALO + BLOCK - 1) // BLOCK
    SIDE: tl.constexpr = 2 * NB + 1
    blocks = blocks_h * blocks_w
    ym, xm = 2 * Hh - 2 - y, 2 * Wh - 2 - x
    in_x, ok_xm = x < Wh, (xm >= Wh) & (xm < Wp)
    b_g = tl.zeros([C, BW], dtype=tl.float32)
    dq_img = dq_ptr + (n * C + offs_c[:, None]) * (Hp * Wp)  # [C, 1]
    kv = tl.maximum(part - 1, 0)  # part 1: the dK windows, part 2: dV
    win_img = dkvw_ptr + ((kv * images + n) * C + offs_c[:, None]) * (WIN * WIN) * blocks
    for corner in range(4):
        py = tl.where(corner // 2 == 1, ym, y)
        if (corner // 2 == 0) or ((ym >= Hh) and (ym < Hp)):
            px = tl.where(corner % 2 == 1, xm, x)  # [BW]
            valid = in_x & (ok_xm | (corner % 2 == 0))
            if part == 0:
                b_g += tl.load(dq_img + (py * Wp + px)[None, :], mask=valid[None, :], other=0.0)
            else:
                for e in range(SIDE * SIDE):
                    bh = py // BLOCK + (e // SIDE - NB)  # the window's block row (scalar)
                    r = py - bh * BLOCK + HALO  # the pixel's row in the window
                    if (bh >= 0) and (bh < blocks_h) and (r >= 0) and (r < WIN):
                        bw = px // BLOCK + (e % SIDE - NB)
                        s = px - bw * BLOCK + HALO
                        ok = valid & (bw >= 0) & (bw < blocks_w) & (s >= 0) & (s < WIN)
                        offs = (r * WIN + s) * blocks + bh * blocks_w + bw  # [BW]
                        b_g += tl.load(win_img + offs[None, :], mask=ok[None, :], other=0.0)
    return b_g


@triton.jit
def _first_max(top_l, top_r, bot_l, bot_r):
    """Max of each 2x2 window (v's dtype) and the index 0..3 of its first maximum in
    row-major order (strictly greater replaces, NaN wins: PyTorch's max_pool2d)."""
    b_max = top_l
    arg = tl.zeros(b_max.shape, dtype=tl.int32)
    for k in tl.static_range(1, 4):
        if k == 1:
            b_v = top_r
        elif k == 2:
            b_v = bot_l
        else:
            b_v = bot_r
        take = (b_v > b_max) | (b_v != b_v)
        b_max = tl.where(take, b_v, b_max)
        arg = tl.where(take, k, arg)
    return b_max, arg


@triton.jit
def _store_dv(dv_ptr, dout_ptr, b_du, arg, n, y, x0, Wh, HWh, offs_c, C: tl.constexpr,
              BW: tl.constexpr, ADD_INPUT: tl.constexpr):  # fmt: skip
    """The max-pool adjoint of du [C, BW] (fp32) on input rows 2y, 2y + 1 (+ dout): each
    row one contiguous [C, 2 BW] run of dv, the windows' left and right columns
    interleaved. dv, dout: (N, C, 2 Hh, 2 Wh) contiguous."""
    W = 2 * Wh
    cols = 2 * x0 + tl.arange(0, 2 * BW)  # [2 BW]
    mask = (cols < W)[None, :]
    img = n * C * (4 * HWh) + offs_c[:, None] * (4 * HWh)  # [C, 1] int64
    for r in tl.static_range(2):
        b_l = tl.where(arg == 2 * r, b_du, 0.0)  # [C, BW]
        b_r = tl.where(arg == 2 * r + 1, b_du, 0.0)
        b_dv = tl.reshape(tl.join(b_l, b_r), [C, 2 * BW])  # [C, 2 BW], left/right interleaved
        offs = img + ((2 * y + r) * W + cols)[None, :]
        if ADD_INPUT:
            b_dv += tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dv_ptr + offs, b_dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_tiles", "tiles_per_row"])
def esam_qkv_bwd_kernel(
    dq_ptr, dkvw_ptr, w_ptr, v_ptr, dout_ptr, dv_ptr, part_ptr,
    Hh, Wh, Hp, Wp, blocks_h, blocks_w, images, num_tiles, tiles_per_row, part_stride,
    C: tl.constexpr, BW: tl.constexpr, BLOCK: tl.constexpr, HALO: tl.constexpr,
    ADD_INPUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """The fold, qkv 1x1 and max-pool backward in one pass (persistent).

    dq, dkvw: the attention backward's (`_folded`); w (3C, C) fp32; v, dout (N, C,
    2 Hh, 2 Wh) contiguous (so every build knows the unit pixel stride: with strides as
    arguments the unspecialised builds spilled on sm_80 under triton 3.6). Programs loop
    over row tiles of the sampled grid (row y, columns x0 .. x0 + BW - 1); per tile, with
    v's 2x2 windows loaded once and g, the gradient of the sampled grid's three
    projections, gathered from dq and the windows in registers:
      dv (N, C, H, W contiguous, v's dtype) = max-pool adjoint of g W (+ dout),
      dW_qkv[part] += g[part]^T u (u = the window maxima), three fp32 [C, C] accumulators,
    stored as this program's partials ([3C, C] at row pid, part_stride apart). g never
    reaches memory: a fold kernel wrote it (fp32, 3C / 4 per input pixel) for this one to
    read, 63 MB a call at the training workload, and a dx and a dw kernel before that
    read it twice and v four times.
    """
    pid = tl.program_id(0)
    offs_c = tl.arange(0, C).to(tl.int64)
    HWh = Hh * Wh
    # dW^T [C_in, C_out] of q, k, v: u is the dots' left operand as loaded (no transpose)
    acc_q = tl.zeros([C, C], dtype=tl.float32)
    acc_k = tl.zeros([C, C], dtype=tl.float32)
    acc_v = tl.zeros([C, C], dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        n, y, x0, x = row_tile(tile, Hh, tiles_per_row, BW)
        row_v = v_ptr + n * C * (4 * HWh) + (2 * y) * (2 * Wh)
        top_l, top_r, bot_l, bot_r = _windows(row_v, 2 * Wh, x0, 2 * Wh, offs_c, 4 * HWh, 1, C,
                                              BW)  # fmt: skip
        b_u, arg = _first_max(top_l, top_r, bot_l, bot_r)  # [C_in, BW]
        b_du = tl.zeros([C, BW], dtype=tl.float32)
        b_uf = b_u.to(tl.float32)
        # A runtime loop: unrolled (static_range), the three parts' loads were issued
        # together, their operand tiles all live, and sm_80 spilled 250-500 bytes.
        for part in range(3):
            b_g = _folded(dq_ptr, dkvw_ptr, part, n, images, y, x, Hh, Wh, Hp, Wp, blocks_h,
                          blocks_w, offs_c, C, BLOCK, HALO, BW)  # [C_out, BW]  # fmt: skip
            ptr_w = w_ptr + (part * C + offs_c[None, :]) * C + offs_c[:, None]
            b_wt = tl.load(ptr_w)  # [C_in, C_out]
            b_du += tl.dot(b_wt, b_g, input_precision=DOT_PRECISION)  # [C_in, BW]
            b_dw = tl.dot(b_uf, tl.trans(b_g), input_precision=DOT_PRECISION)  # [C_in, C_out]
            if part == 0:
                acc_q += b_dw
            elif part == 1:
                acc_k += b_dw
            else:
                acc_v += b_dw
        _store_dv(dv_ptr, dout_ptr, b_du, arg, n, y, x0, Wh, HWh, offs_c, C, BW, ADD_INPUT)
    ptr_part = part_ptr + pid.to(tl.int64) * part_stride + offs_c[None, :] * C + offs_c[:, None]
    tl.store(ptr_part, acc_q)
    tl.store(ptr_part + C * C, acc_k)
    tl.store(ptr_part + 2 * C * C, acc_v)


# ---------------------------------------------------------------------------------------
# Configs and launchers


def bwd_config(kernel: str, channels: int, dtype: torch.dtype, block: int = 8,
               halo: int = 1) -> KernelConfig:  # fmt: skip
    """The config a launcher runs `kernel` ("dt", "do", "qkv") with.

    Pixel tiles of BLOCK_P x C; the gathers of "dt" (36 per pixel) and of the fold in
    "qkv" (up to 36 per projection) run in runtime loops. The fp32 dots of "qkv" are one
    TF32 product, as the MSGM backward (and cuDNN's): "tf32x3" spilled ~1 KB in its dv
    half alone.
    """
    del dtype  # every gradient here is fp32 until the final cast
    block_p = {"dt": 16, "do": 16, "qkv": 16}[kernel]
    # "qkv" runs row tiles of BW sampled pixels (2 BW input pixels a row).
    # "dt" row tiles of BJ quarter-res pixels (a multiple of 16: its o runs start at
    # j0 - BJ / 2, 8-aligned).
    key = {"qkv": "BW", "dt": "BJ", "do": "BJ"}.get(kernel, "BLOCK_P")
    constexprs = {"C": channels, key: block_p}
    if kernel == "qkv":
        constexprs.update(BLOCK=block, HALO=halo, DOT_PRECISION="tf32")
    # "qkv" holds three [C, C] dW accumulators, a [C, C] weight tile, g, du and the pool
    # argmax (its dv half alone spilled on 4 warps).
    # "dt" holds a [C, 4 BJ] run of dout rows (with [C, BJ] dt): 4 warps spilled under
    # triton 3.6 on sm_80.
    # "dt" is capped at check-kernels' 232 headroom: its unspecialised (strided) build
    # reached 239 on sm_90; ptxas fits it without spills.
    warps = 8 if kernel in ("qkv", "dt") else 4
    maxnreg = 232 if kernel in ("dt", "qkv") else None
    return KernelConfig(constexprs, num_warps=warps, num_stages=1, maxnreg=maxnreg)


def _launch(kernel, grid, cfg: KernelConfig, *args, **extra):
    kernel[grid](*args, **cfg.launch_options(), **cfg.constexprs, **extra)


def _own_partials(device, columns: int) -> torch.Tensor:
    return empty((max_programs(device), columns), dtype=torch.float32, device=device)


def prop_bwd(dout: torch.Tensor, o: torch.Tensor, prop_weight: torch.Tensor,
             part: torch.Tensor | None = None):  # fmt: skip
    """dO (fp32) of LocalProp; the partials of d prop weight (C, 1, 3, 3) then d prop bias
    (C,) go to part, a [programs, 10 C] fp32 view of the op's partials buffer. Without
    part: (dO, d prop weight, d prop bias), reduced here.

    dout: (N, C, H, W) any strides; o: (N, C, Hp, Wp) as saved by the forward.
    """
    if part is None:
        c = o.shape[1]
        part = _own_partials(dout.device, 10 * c)
        d_o = prop_bwd(dout, o, prop_weight, part)
        flat = sum_partials(part)
        return d_o, flat[: 9 * c].view(c, 1, 3, 3), flat[9 * c :]
    n, c, h, w = dout.shape
    hp, wp = o.shape[-2:]
    o = o.contiguous()
    f32 = dict(dtype=torch.float32, device=dout.device)
    cfg = bwd_config("dt", c, o.dtype)
    tiles_per_row = cdiv(wp, cfg.constexprs["BJ"])
    num_tiles = n * hp * tiles_per_row
    dt = empty((n, c, hp, wp), **f32)
    _launch(esam_prop_bwd_dt_kernel, (part.shape[0],), cfg, dout, o, dt, part, h, w, hp, wp,
            num_tiles, tiles_per_row, part.stride(0), *dout.stride(), (hp - 1) / (2 * hp - 1),
            (wp - 1) / (2 * wp - 1))  # fmt: skip
    cfg = bwd_config("do", c, o.dtype)
    tiles_per_row = cdiv(wp, cfg.constexprs["BJ"])
    d_o = empty((n, c, hp, wp), **f32)
    weight = prop_weight.float().contiguous()  # (C, 1, 3, 3): a view of an fp32 parameter
    _launch(esam_prop_bwd_do_kernel, (n * hp * tiles_per_row,), cfg, dt, weight, d_o, hp, wp,
            tiles_per_row)  # fmt: skip
    return d_o


def qkv_bwd(dq: torch.Tensor, dkvw: torch.Tensor, v: torch.Tensor, qkv_weight: torch.Tensor,
            dout: torch.Tensor | None, part: torch.Tensor | None = None, *, block: int,
            halo: int):  # fmt: skip
    """dv (N, C, H, W) in v's dtype from the attention backward's dq (N, C, Hp, Wp) and dK,
    dV windows dkvw (2, N, C * win^2, blocks), fp32; the partials of dW_qkv (3C, C) go to
    part, a [programs, 3 C^2] fp32 view of the op's partials buffer. Without part: (dv,
    dW_qkv), reduced here.

    dout, when given, is added to dv (the residual of ESAM(v) + v).
    """
    if part is None:
        c = v.shape[1]
        part = _own_partials(v.device, 3 * c * c)
        dv = qkv_bwd(dq, dkvw, v, qkv_weight, dout, part, block=block, halo=halo)
        return dv, sum_partials(part).view(3 * c, c)
    n, c, hp, wp = dq.shape
    hh, wh = v.shape[2] // 2, v.shape[3] // 2
    weight = qkv_weight.float().reshape(3 * c, c).contiguous()
    cfg = bwd_config("qkv", c, v.dtype, block, halo)
    tiles_per_row = cdiv(wh, cfg.constexprs["BW"])
    v = v.contiguous()  # the fused step's maps are; a strided input costs one copy
    dv = empty(v.shape, dtype=v.dtype, device=v.device)
    d = v if dout is None else dout.contiguous()  # not read without the residual
    _launch(esam_qkv_bwd_kernel, (part.shape[0],), cfg, dq.contiguous(), dkvw.contiguous(),
            weight, v, d, dv, part, hh, wh, hp, wp, hp // block, wp // block, n,
            n * hh * tiles_per_row, tiles_per_row, part.stride(0),
            ADD_INPUT=dout is not None)  # fmt: skip
    return dv


# ---------------------------------------------------------------------------------------
# Registry: the configs above at the released ESAM (C = 64, block 8, halo 1).


def _register(kernel, name: str, pointers: str, scalars: tuple, floats=(), extras=(None,)):
    fields = [p.split(":") for p in pointers.split()]
    # Kernels with only fp32 pointers compile the same for every activation dtype.
    dtypes = KERNEL_DTYPES if ":dt" in pointers else (torch.float32,)
    configs = tuple(
        DtypeConfig.of(bwd_config(name, 64, dt), dt, extra) for extra in extras for dt in dtypes
    )
    register(KernelSpec(kernel.__name__, kernel, dtype_signature(fields, scalars, floats), configs))


def _STRIDES(prefix: str) -> tuple[str, ...]:
    return tuple(f"s{prefix}_{axis}" for axis in "nchw")


_register(
    esam_prop_bwd_dt_kernel, "dt", "dout_ptr:dt o_ptr:dt dt_ptr part_ptr",
    ("H", "W", "Hp", "Wp", "num_tiles", "tiles_per_row", "part_stride", *_STRIDES("d")),
    ("scale_h", "scale_w"),
)  # fmt: skip
_register(esam_prop_bwd_do_kernel, "do", "dt_ptr pw_ptr do_ptr", ("Hp", "Wp", "tiles_per_row"))
_register(
    esam_qkv_bwd_kernel, "qkv",
    "dq_ptr dkvw_ptr w_ptr v_ptr:dt dout_ptr:dt dv_ptr:dt part_ptr",
    ("Hh", "Wh", "Hp", "Wp", "blocks_h", "blocks_w", "images", "num_tiles", "tiles_per_row",
     "part_stride"),
    extras=({"ADD_INPUT": True}, {"ADD_INPUT": False}),
)  # fmt: skip

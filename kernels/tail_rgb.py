"""The tail's last layer, fused: reflect-padded 3x3 conv C -> 3, + bias, + skip, fwd and bwd.

    out[n, o, y, x] = b[o] + skip[n, o, y, x]
                      + sum_{c, dy, dx} w[o, c, dy, dx] f[n, c, refl(y+dy-1), refl(x+dx-1)]
    refl(r) = (S-1) - |S-1-|r||   (reflect padding by one pixel; S = H or W, S >= 2)

The skip is an (N, 3, H, W) map or, as SSIU adds its input, the bilinear upsampling of
the low-resolution image (N, 3, H / s, W / s) computed in the epilogue (`_bilinear`: four
taps a pixel, L1 hits; the image is 1 / s^2 of a full-resolution map). Either may be
fp32 with 16-bit features (autocast): the output is then fp32 and the backward reads its
fp32 gradient (no cast launch).

Floors (C = 64, per full-resolution pixel; bf16 / fp32):
- forward: read f once (128 / 256 B) + skip (6 / 12 B; the image 12 / s^2 in fp32),
  write out (6 / 12 B): 140 / 280 B;
  3 * 9 * C = 1,728 MACs. The PyTorch path it replaces (reflect pad, cuDNN conv, add)
  reads and writes f once more for the padded copy and the output twice more: about
  2.9x the floor's bytes.
- backward: read f (dW) and dout, write df: 262 / 524 B; 2 * 1,728 MACs.

Where it runs: after an x3 stage, without stages, and (forward) in fp32. After an x2
stage its pieces run inside that stage's kernels (`ssiu.kernels.tail`: `tap_weights`,
`rgb_epilogue` forward, `dout_rows`, `tap_grads`, `store_partials` backward), and the
C-channel full-resolution map f never exists.

Strategy (both directions): a program owns BLOCK_X pixels of one row y (lanes along the
contiguous pixel axis: f, df, dout, skip and out move 16 B a lane when the w-stride is 1).
Rows are reflected as scalars. Columns are not shifted in memory (a tile shifted by one
pixel is misaligned: 2 B a lane); instead the small C -> 3 products are formed at the
aligned pixels and shifted in registers with `tl.gather`:
- forward: for each of the 3 input rows, G_dy = f_row [X, C] @ Wk_dy [C, 16] where column
  dx*3 + o of Wk_dy is w[o, :, dy, dx] (9 of 16 used: `tl.dot` needs N >= 16; the dot is
  cheap next to the bytes). G = sum_dy G_dy, and out[x, o] = G[refl(x-1), o] + G[x, 3+o]
  + G[refl(x+1), 6+o]: the two neighbours come from one gather each, the two columns
  just outside the tile (x0-1, x0+BLOCK_X) from a [C] x [C, 16] product each (halo).
- backward: the adjoint of the same map. For f-row y and tap row dy the output rows that
  read it are Y = y+1-dy (if inside) and, at the reflected borders, Y = 0 (dy = 0, y = 1)
  or Y = H-1 (dy = 2, y = H-2). Their dout rows, summed, give D_dy [X, 16] (column
  dx*3 + o holds dout channel o); by columns E_dy[x, dx=0] = D[x+1] + [x == 1] D[x-1],
  E_dy[x, dx=1] = D[x], E_dy[x, dx=2] = D[x-1] + [x == W-2] D[x+1] (two gathers).
  df[x, :] = sum_dy E_dy @ Wk_dy^T, dW_dy += E_dy^T @ f_row, db = sum of dout. One
  persistent kernel (one program per SM: one wave), fp32 partials of dW and db per
  program packed in the parameters' order, reduced by `partials.sum_partials` (no
  atomics; with the stages' partials in `ssiu.ops.fused_tail`). The skip's gradient is
  dout.

SASS (sass tool, training-workload specialisation: w-strides 1, sizes and strides
multiples of 16; triton 3.9; C = 64):
- fwd bf16: sm_90 108 regs, sm_80 114; f: LDG 16B x18 (tile and halo runs); the fp32
  weight gathers and bias LDG 4B x27; out stored as one [BLOCK_X, 4] tile (the three RGB
  rows, channel 3 masked): STG 4B x1 (was three [BLOCK_X] stores, one pixel a lane,
  2 B).
- fwd fp32 (32-pixel tiles, 4 warps, "tf32"): no spills on sm_90 / sm_80 in
  `ssiu check-kernels`; "tf32x3" spilled at every tile tried (the six halo dots).
- bwd bf16 (8 warps): sm_90 173 regs, sm_80 174, no spills; f, df: 16 B; each dout row
  with its halo columns as one aligned [2 BLOCK_X, 16] run, LDG 16B, shifted by gathers
  (the halo columns loaded alone were [16, 16] tiles over 256 lanes: LDG 2B x10); the
  partial stores STG 4B x10 (once per program). fp32 (32-pixel tiles): check-kernels
  sm_90 145 regs, sm_80 176, no spills.
Bytes against the floor: the forward reads f once from DRAM (the halo runs are
neighbour tiles' data, L2 hits), so about 1.0x its floor; the backward reads f and dout
once and writes df, about 1.0x (plus the [programs, 27 C + 3] partials).

Precision: f and the weights enter `tl.dot` in f's dtype (fp32 as "tf32" on a GPU, ~1e-3
relative like cuDNN's default fp32 convs; exact in the interpreter), accumulation and the
gathers in fp32; weights arrive fp32, cast in-kernel. Image bases int64, in-image int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ssiu.kernels.common import KERNEL_DTYPES, DtypeConfig, cdiv, dtype_signature, empty
from ssiu.kernels.indexing import row_tile
from ssiu.kernels.partials import persistent_programs, sum_partials
from ssiu.kernels.registry import KernelConfig, KernelSpec, register

TAPS = 16  # the 9 (dx, o) columns of one tap row, padded to tl.dot's minimum N

# The skip `rgb_epilogue` adds (constexpr SKIP): none, an (N, 3, H, W) map, or PyTorch's
# bilinear upsampling (align_corners=False) of an (N, 3, IH, IW) image to H x W. Launchers
# pass the int (`.value`).
SKIP_NONE, SKIP_MAP, SKIP_IMAGE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _reflect(r, S):
    """Reflect padding by one: -1 -> 1, S -> S-2 (S >= 2)."""
    return (S - 1) - tl.abs(S - 1 - tl.abs(r))


@triton.jit
def tap_weights(w_ptr, dy, C: tl.constexpr, dtype):
    """Wk_dy [C, TAPS]: column dx*3 + o = w[o, :, dy, dx] (w (3, C, 3, 3) fp32), 0 past 9."""
    col = tl.arange(0, 16)
    offs_c = tl.arange(0, C)
    offs = (col % 3)[None, :] * (C * 9) + offs_c[:, None] * 9 + dy * 3 + (col // 3)[None, :]
    return tl.load(w_ptr + offs, mask=(col < 9)[None, :], other=0.0).to(dtype)


@triton.jit
def _lookup(t, left, right, k, X: tl.constexpr):
    """t [X, 16] read at tile positions k [X] in -1..X: -1 -> left [16], X -> right [16]."""
    idx = tl.minimum(tl.maximum(k, 0), X - 1)[:, None] + tl.zeros_like(t).to(tl.int32)
    out = tl.gather(t, idx, axis=0)
    out = tl.where((k == -1)[:, None], left[None, :], out)
    return tl.where((k == X)[:, None], right[None, :], out)


@triton.jit
def _halo_g(f_row, xs, W, sf_c, sf_w, w_k, pick, offs_c, PRECISION: tl.constexpr):
    """G of one column outside the tile: the aligned 16 columns xs [16] around it are
    loaded like the tile (16 B a lane; neighbour tiles' data, L2 hits), multiplied by
    Wk_dy, and row `pick` kept. [16] fp32; 0 when that column is outside the image."""
    ptr = f_row + offs_c[None, :] * sf_c + (xs * sf_w)[:, None]
    b_f = tl.load(ptr, mask=((xs >= 0) & (xs < W))[:, None], other=0.0)  # [16, C]
    return pick_row(tl.dot(b_f, w_k, input_precision=PRECISION), pick)


@triton.jit
def pick_row(t, pick):
    """Row `pick` of t [16, 16]: [16]."""
    return tl.sum(tl.where((tl.arange(0, 16) == pick)[:, None], t, 0.0), axis=0)


@triton.jit
def _rgb(b_t, col, o):
    """Output channel o of b_t [X, 16] (column dx*3 + o holds its tap dx): [X] fp32."""
    return tl.sum(tl.where((col % 3 == o) & (col < 9), b_t, 0.0), axis=1)


@triton.jit
def tail_rgb_fwd_kernel(
    f_ptr, w_ptr, b_ptr, skip_ptr, out_ptr,
    H, W, tiles_per_row,
    sf_n, sf_c, sf_h, sf_w, ss_n, ss_c, ss_h, ss_w, IH, IW, inv_scale,
    C: tl.constexpr, BLOCK_X: tl.constexpr, SKIP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out (N, 3, H, W contiguous) = conv3x3_reflect(f) + b (+ the skip, see
    `rgb_epilogue`)."""
    n, y, x0, x = row_tile(tl.program_id(0), H, tiles_per_row, BLOCK_X)
    dtype = f_ptr.dtype.element_ty
    offs_c = tl.arange(0, C)
    mask_x = x < W
    b_g = tl.zeros([BLOCK_X, 16], dtype=tl.float32)  # G: column dx*3 + o
    g_left = tl.zeros([16], dtype=tl.float32)  # G at column x0 - 1
    g_right = tl.zeros([16], dtype=tl.float32)  # G at column x0 + BLOCK_X
    for dy in tl.static_range(3):
        f_row = f_ptr + n * sf_n + _reflect(y + dy - 1, H) * sf_h
        ptr_f = f_row + offs_c[None, :] * sf_c + (x * sf_w)[:, None]
        b_f = tl.load(ptr_f, mask=mask_x[:, None], other=0.0)  # [X, C]
        w_k = tap_weights(w_ptr, dy, C, dtype)  # [C, 16]
        b_g += tl.dot(b_f, w_k, input_precision=PRECISION)
        halo = tl.arange(0, 16)
        g_left += _halo_g(f_row, x0 - 16 + halo, W, sf_c, sf_w, w_k, 15, offs_c, PRECISION)
        g_right += _halo_g(f_row, x0 + BLOCK_X + halo, W, sf_c, sf_w, w_k, 0, offs_c,
                           PRECISION)  # fmt: skip
    skip = (skip_ptr, ss_n, ss_c, ss_h, ss_w, IH, IW, inv_scale)
    rgb_epilogue(b_g, g_left, g_right, n, y, x0, x, H, W, b_ptr, skip, out_ptr, BLOCK_X, SKIP)


@triton.jit
def _bilinear(img, y, x, IH, IW, inv_scale, si_c, si_h, si_w, offs_o, mask):
    """The bilinear upsampling of img (channels at si_c, IH x IW) at output row y, columns
    x [X], as PyTorch computes it with scale_factor s (inv_scale = 1 / s in fp32): source
    max((d + 0.5) / s - 0.5, 0), its floor and the next pixel (clamped), weights in fp32.
    [X, 4] fp32 (the lanes mask leaves out: 0)."""
    sy = tl.maximum((y + 0.5) * inv_scale - 0.5, 0.0)
    y0 = sy.to(tl.int32)  # floor: sy >= 0
    ly = sy - y0
    y1 = y0 + (y0 < IH - 1)
    sx = tl.maximum((x + 0.5) * inv_scale - 0.5, 0.0)  # [X]
    x0 = sx.to(tl.int32)
    lx = sx[:, None] - x0[:, None]
    x1 = x0 + (x0 < IW - 1)
    row0 = img + offs_o[None, :] * si_c + y0 * si_h
    row1 = img + offs_o[None, :] * si_c + y1 * si_h
    a = tl.load(row0 + (x0 * si_w)[:, None], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(row0 + (x1 * si_w)[:, None], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(row1 + (x0 * si_w)[:, None], mask=mask, other=0.0).to(tl.float32)
    d = tl.load(row1 + (x1 * si_w)[:, None], mask=mask, other=0.0).to(tl.float32)
    return (1.0 - ly) * ((1.0 - lx) * a + lx * b) + ly * ((1.0 - lx) * c + lx * d)


@triton.jit
def rgb_epilogue(
    b_g, g_left, g_right, n, y, x0, x, H, W, b_ptr, skip, out_ptr,
    X: tl.constexpr, SKIP: tl.constexpr,
):  # fmt: skip
    """Output row y at columns x = x0 + [0, X) from G [X, 16] (summed over the tap rows)
    and G at the columns just outside (g_left at x0 - 1, g_right at x0 + X): out[x, o] =
    G[refl(x-1), o] + G[x, 3+o] + G[refl(x+1), 6+o] + b[o] + the skip, summed in fp32 and
    stored to the contiguous (N, 3, H, W) out in its dtype. skip: (pointer, its n, c, h,
    w strides, IH, IW, inv_scale), the last three read by SKIP_IMAGE only."""
    skip_ptr, ss_n, ss_c, ss_h, ss_w, IH, IW, inv_scale = skip
    mask_x = x < W
    g_minus = _lookup(b_g, g_left, g_right, _reflect(x - 1, W) - x0, X)  # G[refl(x-1)]
    g_plus = _lookup(b_g, g_left, g_right, _reflect(x + 1, W) - x0, X)  # G[refl(x+1)]
    col = tl.arange(0, 16)[None, :]
    b_t = tl.where(col < 3, g_minus, tl.where(col < 6, b_g, g_plus))  # [X, 16]
    # The three RGB rows as one [X, 4] tile (channel 3 masked): per-channel [X] stores
    # put one pixel on each lane (2 bytes in 16-bit).
    # join(join(a, c), join(b, d)) [X, 2, 2] flattens to a, b, c, d.
    b_1 = _rgb(b_t, col, 1)
    b_o = tl.join(tl.join(_rgb(b_t, col, 0), _rgb(b_t, col, 2)), tl.join(b_1, tl.zeros_like(b_1)))
    b_o = tl.reshape(b_o, [X, 4])  # [X, 4]
    offs_o = tl.arange(0, 4)
    mask = mask_x[:, None] & (offs_o < 3)[None, :]
    b_o += tl.load(b_ptr + offs_o, mask=offs_o < 3, other=0.0)[None, :]
    if SKIP == SKIP_MAP:
        s_ptr = skip_ptr + n * ss_n + offs_o[None, :] * ss_c + y * ss_h + (x * ss_w)[:, None]
        b_o += tl.load(s_ptr, mask=mask, other=0.0).to(tl.float32)
    if SKIP == SKIP_IMAGE:
        b_o += _bilinear(skip_ptr + n * ss_n, y, x, IH, IW, inv_scale, ss_c, ss_h, ss_w, offs_o,
                         mask)  # fmt: skip
    out_img = out_ptr + n * 3 * H * W + y * W
    tl.store(out_img + offs_o[None, :] * (H * W) + x[:, None],
             b_o.to(out_ptr.dtype.element_ty), mask=mask)  # fmt: skip


@triton.jit
def _dout_taps(d_img, yy, H, xx, W, sd_c, sd_h, sd_w):
    """dout[o, yy, xx] at column dx*3 + o of an [xx, 16] tile (0 past column 9 and outside
    the image: yy = -1 reads nothing)."""
    col = tl.arange(0, 16)
    yv = xx * 0 + yy
    inside = (xx >= 0) & (xx < W) & (yv >= 0) & (yv < H)
    ptr = d_img + yy * sd_h + (col % 3)[None, :] * sd_c + (xx * sd_w)[:, None]
    return tl.load(ptr, mask=inside[:, None] & (col < 9)[None, :], other=0.0).to(tl.float32)


@triton.jit
def dout_rows(d_img, y, dy, H, xx, W, sd_c, sd_h, sd_w):
    """Sum of the dout rows whose tap row dy reads f-row y (see the module doc)."""
    b_d = _dout_taps(d_img, y + 1 - dy, H, xx, W, sd_c, sd_h, sd_w)
    if dy == 0:  # refl(-1) = 1: output row 0 reads f-row 1
        b_d += _dout_taps(d_img, tl.where(y == 1, 0, -1), H, xx, W, sd_c, sd_h, sd_w)
    if dy == 2:  # refl(H) = H - 2: output row H-1 reads f-row H-2
        b_d += _dout_taps(d_img, tl.where(y == H - 2, H - 1, -1), H, xx, W, sd_c, sd_h, sd_w)
    return b_d


@triton.jit
def _rows(t, idx):
    """t [K, 16] at rows idx [X] (all within t): [X, 16]."""
    return tl.gather(t, idx[:, None] + tl.zeros([idx.shape[0], 16], dtype=tl.int32), axis=0)


@triton.jit
def tap_grads(b_run, at, x, W, mask_x, dtype):
    """(E_dy, D) at the f-pixels of columns x [X] of one f-row, given b_run [K, 16], the
    `dout_rows` of that row and tap row dy over a column run holding x - 1 .. x + 1 at
    positions at - 1 .. at + 1. D [X, 16] fp32 is the run at x; E_dy [X, 16] in `dtype`:
    column dx*3 + o holds the dout of channel o reaching f-pixel x through tap (dy, dx),
    reflected at the borders (see the module doc); zero where mask_x is False."""
    col = tl.arange(0, 16)[None, :]
    b_d = _rows(b_run, at)  # D[x]
    d_plus = _rows(b_run, at + 1)  # D[x+1] (0 past the image)
    d_minus = _rows(b_run, at - 1)  # D[x-1] (0 before it)
    e0 = d_plus + tl.where((x == 1)[:, None], d_minus, 0.0)
    e2 = d_minus + tl.where((x == W - 2)[:, None], d_plus, 0.0)
    b_e = tl.where(col < 3, e0, tl.where(col < 6, b_d, e2))
    return tl.where(mask_x[:, None], b_e, 0.0).to(dtype), b_d


@triton.jit
def store_partials(part, acc_w0, acc_w1, acc_w2, acc_b, C: tl.constexpr):
    """One program's fp32 partials at `part`, in the parameters' order: w (3, C, 3, 3) from
    the tap rows' [16, C] accumulators (row dx*3 + o), then b (3,) from acc_b [16]
    (column 3 + o)."""
    col = tl.arange(0, 16)
    offs_c = tl.arange(0, C)
    w_offs = (col % 3)[:, None] * (C * 9) + offs_c[None, :] * 9 + (col // 3)[:, None]
    w_mask = (col < 9)[:, None]
    tl.store(part + w_offs, acc_w0, mask=w_mask)
    tl.store(part + w_offs + 3, acc_w1, mask=w_mask)
    tl.store(part + w_offs + 6, acc_w2, mask=w_mask)
    tl.store(part + 27 * C + col - 3, acc_b, mask=(col >= 3) & (col < 6))


@triton.jit
def tail_rgb_bwd_kernel(
    f_ptr, w_ptr, dout_ptr, df_ptr, part_ptr,
    H, W, tiles_per_row, num_tiles, num_programs, part_stride,
    sf_n, sf_c, sf_h, sf_w, sd_n, sd_c, sd_h, sd_w,
    C: tl.constexpr, BLOCK_X: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """df (N, C, H, W contiguous) and, per program, fp32 partials of dW (3, C, 3, 3) and
    db (3,) at part_ptr + pid * part_stride (27 C + 3 floats: a row of a buffer other ops
    may share), over tiles pid, pid + num_programs, ... (none: zeros)."""
    pid = tl.program_id(0)
    dtype = f_ptr.dtype.element_ty
    offs_c = tl.arange(0, C)
    k = tl.arange(0, BLOCK_X)
    acc_w0 = tl.zeros([16, C], dtype=tl.float32)  # dW of tap row dy = 0, row dx*3 + o
    acc_w1 = tl.zeros([16, C], dtype=tl.float32)
    acc_w2 = tl.zeros([16, C], dtype=tl.float32)
    acc_b = tl.zeros([16], dtype=tl.float32)  # db[o] at column 3 + o
    for tile in range(pid, num_tiles, num_programs):
        n, y, x0, x = row_tile(tile, H, tiles_per_row, BLOCK_X)
        mask_x = x < W
        xe = x0 - BLOCK_X // 2 + tl.arange(0, 2 * BLOCK_X)  # [2 X]
        f_img = f_ptr + n * sf_n + y * sf_h
        ptr_f = f_img + offs_c[None, :] * sf_c + (x * sf_w)[:, None]
        b_f = tl.load(ptr_f, mask=mask_x[:, None], other=0.0)  # [X, C]
        d_img = dout_ptr + n * sd_n
        b_df = tl.zeros([BLOCK_X, C], dtype=tl.float32)
        for dy in tl.static_range(3):
            # The dout rows at the 2 X columns from x0 - X / 2: the tile and its halo
            # columns x0 - 1, x0 + X in one aligned run (16-byte lanes; the halo columns
            # loaded alone were [16, 16] tiles over 256 lanes, 2 bytes a lane).
            b_run = dout_rows(d_img, y, dy, H, xe, W, sd_c, sd_h, sd_w)  # [2 X, 16]
            b_e, b_d = tap_grads(b_run, k + BLOCK_X // 2, x, W, mask_x, dtype)  # [X, 16]
            w_k = tap_weights(w_ptr, dy, C, dtype)  # [C, 16]
            b_df += tl.dot(b_e, tl.trans(w_k), input_precision=PRECISION)
            acc = tl.dot(tl.trans(b_e), b_f, input_precision=PRECISION)  # [16, C]
            if dy == 0:
                acc_w0 += acc
            elif dy == 1:
                acc_w1 += acc
                acc_b += tl.sum(b_d, axis=0)  # row y's own dout, each output row once
            else:
                acc_w2 += acc
        df = df_ptr + n * C * H * W + y * W
        tl.store(df + offs_c[None, :] * (H * W) + x[:, None], b_df.to(dtype),
                 mask=mask_x[:, None])  # fmt: skip
    store_partials(part_ptr + pid.to(tl.int64) * part_stride, acc_w0, acc_w1, acc_w2, acc_b, C)


# ---------------------------------------------------------------------------------------
# Configs and launchers


def tail_rgb_config(channels: int, dtype: torch.dtype, kernel: str) -> KernelConfig:
    """The config a launcher runs `kernel` ("fwd" or "bwd") with, chosen by
    `ssiu check-kernels` at C = 64 (no spills): row tiles of 64 pixels for 16-bit data,
    32 for fp32 (halved per doubling of C above 64); 4 warps forward, 8 backward (three
    [16, C] fp32 accumulators plus the [X, C] tile and its gradient). fp32 dots run in
    TF32 in both directions: "tf32x3" spilled in the forward at any tile tried (its
    six halo dots). The interpreter computes every dot exactly."""
    wide = dtype == torch.float32
    block_x = max(16, (32 if wide else 64) * 64 // max(64, channels))
    precision = "tf32" if wide else "ieee"
    constexprs = {"C": channels, "BLOCK_X": block_x, "PRECISION": precision}
    # The backward is capped at check-kernels' 232 headroom: its unspecialised (strided)
    # 16-bit build reached 241 on sm_80; ptxas fits it without spills. The forward's
    # unspecialised 16-bit builds reach 244-251 on sm_80 under triton 3.9 (capped, they
    # spill; on 8 warps the [X, 4] output tile has one pixel a lane: 2-byte stores); the
    # launched (stride-1) builds use 108-114.
    warps = 4 if kernel == "fwd" else 8
    maxnreg = None if kernel == "fwd" else 232
    return KernelConfig(constexprs, num_warps=warps, num_stages=1, maxnreg=maxnreg)


# Resident CTAs per SM of tail_rgb_bwd_kernel: 1 (8 warps at 145-217 registers in
# `ssiu check-kernels`, 16-bit and fp32, sm_90 and sm_80: 256 x 200 > 64K / 2).
_BWD_CTAS_PER_SM = 1


def gradients_size(channels: int) -> int:
    """Floats of the packed gradient (and of a row of the partials): w (3, C, 3, 3), b (3,)."""
    return 27 * channels + 3


def partials_rows(device: torch.device) -> int:
    """Programs (partial rows) of tail_rgb_bwd_kernel: one wave."""
    return persistent_programs(device, _BWD_CTAS_PER_SM)


def skip_arguments(out: torch.Tensor, skip: torch.Tensor | None, image: torch.Tensor | None):
    """(SKIP, the rgb_epilogue skip arguments: pointer, its n, c, h, w strides, IH, IW,
    inv_scale) for out (N, 3, H, W) plus the map skip (N, 3, H, W), plus the bilinear
    upsampling of image (N, 3, H / s, W / s), or plus nothing."""
    if skip is not None:
        return SKIP_MAP.value, (skip, *skip.stride(), 1, 1, 1.0)
    if image is not None:
        ih, iw = image.shape[-2:]
        # PyTorch's source-index scale for scale_factor s: 1 / s, rounded to fp32.
        return SKIP_IMAGE.value, (image, *image.stride(), ih, iw, 1.0 / (out.shape[-1] // iw))
    return SKIP_NONE.value, (out, 0, 0, 0, 0, 1, 1, 1.0)  # out: a placeholder pointer


def output_dtype(f: torch.Tensor, skip: torch.Tensor | None, image: torch.Tensor | None):
    """The tail's output dtype: f's promoted with the skip's (autocast: bf16 + fp32 -> fp32),
    as the unfused `conv(f) + skip` gives."""
    extra = skip if skip is not None else image
    return f.dtype if extra is None else torch.promote_types(f.dtype, extra.dtype)


def tail_rgb_fwd(f: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 skip: torch.Tensor | None, image: torch.Tensor | None = None
                 ) -> torch.Tensor:  # fmt: skip
    """conv3x3_reflect(f, weight, bias) + skip or + bilinear_upsample(image) (or neither).
    f (N, C, H, W) any strides, H, W >= 2; weight (3, C, 3, 3), bias (3,); skip (N, 3, H,
    W) or image (N, 3, H / s, W / s), each f's dtype or fp32. Returns (N, 3, H, W)
    contiguous in `output_dtype`."""
    n, c, h, w = f.shape
    cfg = tail_rgb_config(c, f.dtype, "fwd")
    tiles_per_row = cdiv(w, cfg.constexprs["BLOCK_X"])
    out = empty((n, 3, h, w), dtype=output_dtype(f, skip, image), device=f.device)
    mode, skip_args = skip_arguments(out, skip, image)
    tail_rgb_fwd_kernel[(n * h * tiles_per_row,)](
        f, weight.to(torch.float32).contiguous(), bias.to(torch.float32).contiguous(),
        skip_args[0], out, h, w, tiles_per_row, *f.stride(), *skip_args[1:], SKIP=mode,
        **cfg.launch_options(), **cfg.constexprs,
    )  # fmt: skip
    return out


def rgb_dout(dout: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tail output's gradient as the backward kernels read it: in `dtype` (the
    features') or fp32, the dtype of an output with an fp32 skip (autocast), read as it
    is (fp32 lanes; a cast would be a launch and a 16-bit copy)."""
    return dout if dout.dtype in (dtype, torch.float32) else dout.to(dtype)


def tail_rgb_bwd(dout: torch.Tensor, f: torch.Tensor, weight: torch.Tensor,
                 partials: torch.Tensor | None = None) -> list[torch.Tensor]:  # fmt: skip
    """[df, dparams]: df contiguous in f's dtype; dparams the fp32 gradients of weight
    (3, C, 3, 3) and bias (3,) packed flat in that order. dout: see `rgb_dout`.

    partials: a [programs, gradients_size(C)] fp32 view (unit column stride) of a buffer
    shared with other ops: one program per row writes its partials there (programs
    without a tile write zeros) and dparams is None (the caller reduces it once)."""
    n, c, h, w = f.shape
    cfg = tail_rgb_config(c, f.dtype, "bwd")
    tiles_per_row = cdiv(w, cfg.constexprs["BLOCK_X"])
    num_tiles = n * h * tiles_per_row
    part = partials
    if part is None:
        programs = min(num_tiles, partials_rows(f.device))
        part = empty((programs, gradients_size(c)), dtype=torch.float32, device=f.device)
    programs = part.shape[0]
    df = empty((n, c, h, w), dtype=f.dtype, device=f.device)
    dout = rgb_dout(dout, f.dtype)
    tail_rgb_bwd_kernel[(programs,)](
        f, weight.to(torch.float32).contiguous(), dout, df, part,
        h, w, tiles_per_row, num_tiles, programs, part.stride(0), *f.stride(), *dout.stride(),
        **cfg.launch_options(), **cfg.constexprs,
    )  # fmt: skip
    return [df, sum_partials(part) if partials is None else None]


# ---------------------------------------------------------------------------------------
# Registry: every (kernel, config) the launchers above can pick for C = 64.

_F = ("sf_n", "sf_c", "sf_h", "sf_w")
_D = ("sd_n", "sd_c", "sd_h", "sd_w")
# 16-bit features with an fp32 skip (map or image) and so an fp32 output, and in the
# backward an fp32 output gradient: the autocast builds.
_WIDE_SKIP = ("skip_ptr", "out_ptr")
register(
    KernelSpec(
        name=tail_rgb_fwd_kernel.__name__,
        fn=tail_rgb_fwd_kernel,
        signature=dtype_signature(
            [["f_ptr", "dt"], ["w_ptr"], ["b_ptr"], ["skip_ptr", "dt"], ["out_ptr", "dt"]],
            ("H", "W", "tiles_per_row", *_F, "ss_n", "ss_c", "ss_h", "ss_w", "IH", "IW"),
            floats=("inv_scale",),
        ),
        configs=tuple(
            DtypeConfig.of(tail_rgb_config(64, dt, "fwd"), dt, {"SKIP": mode.value}, wide)
            for dt in KERNEL_DTYPES
            for mode in (SKIP_NONE, SKIP_MAP, SKIP_IMAGE)
            for wide in ((), _WIDE_SKIP)
            if not (wide and (dt == torch.float32 or mode == SKIP_NONE))
        ),
    )
)
register(
    KernelSpec(
        name=tail_rgb_bwd_kernel.__name__,
        fn=tail_rgb_bwd_kernel,
        signature=dtype_signature(
            [["f_ptr", "dt"], ["w_ptr"], ["dout_ptr", "dt"], ["df_ptr", "dt"], ["part_ptr"]],
            ("H", "W", "tiles_per_row", "num_tiles", "num_programs", "part_stride", *_F, *_D),
        ),
        configs=tuple(
            DtypeConfig.of(tail_rgb_config(64, dt, "bwd"), dt, fp32_pointers=wide)
            for dt in KERNEL_DTYPES
            for wide in ((), ("dout_ptr",))
            if not (wide and dt == torch.float32)
        ),
    )
)

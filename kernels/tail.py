"""Fused upsampling stage of the tail: 1x1 (C -> C*r*r) + PixelShuffle(r) + GELU, fwd and bwd.

    z[n, c*r*r + i*r + j, y, x] = (W x[n, :, y, x])[c*r*r + i*r + j] + b[c*r*r + i*r + j]
    out[n, c, y*r + i, x*r + j] = GELU_erf(z[n, c*r*r + i*r + j, y, x])

Strategy
--------
Forward (`upshuffle_fwd_kernel`): one program per tile of BLOCK_P input pixels (flattened
h*w of one image), all C channels: a [BLOCK_P, C] tile. For each of the r*r sub-pixel
positions (i, j) it takes the C weight rows c*r*r + i*r + j as a [C, C] matrix, does one
`tl.dot`, applies GELU and stores straight into the shuffled (N, C, h*r, w*r) output at
rows y*r + i, columns x*r + j: neither the pre-shuffle map nor a shuffle pass exists.
(The r stores of one output row land r elements apart and fill each other's sectors
in L2.) x4 runs the kernel twice (two x2 stages).

Backward, two kernels, recomputing z from x (only the input is saved):
  1. `upshuffle_bwd_dx_kernel`, per input tile: for every (i, j), dz = GELU'(z) * dout
     at the shuffled positions, dx += dz @ W_ij. Writes dx.
  2. `upshuffle_bwd_dw_kernel`, programs (chunk, i*r + j): each loops over the tiles of
     its chunk for one sub-pixel position and accumulates the fp32 partial sums
     dW_ij = sum dz^T x ([C, C]) and db_ij, reduced by the launcher (no atomics). The r*r
     programs of a chunk read the same x tiles at about the same time (cache hits).
Splitting dW by sub-pixel keeps one [C, C] accumulator per program; r*r of them (9 at
x3) would not fit in registers.

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
    dtype_signature,
    empty,
    max_programs,
)
from ssiu.kernels.registry import KernelConfig, KernelSpec, register

FACTORS = (2, 3)  # PixelShuffle factors a stage runs (x4 = two x2 stages)


@triton.jit
def _gelu_and_grad(z):
    """GELU (erf form) of z and its derivative, fp32."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    return z * cdf, cdf + z * pdf


@triton.jit
def _input_tile(tile, tiles_per_image, HW, W, x_ptr, sx_n, sx_c, sx_h, sx_w, offs_c,
                BLOCK_P: tl.constexpr):  # fmt: skip
    """Image index (int64), row and column (int32), mask and x tile [BLOCK_P, C]."""
    n = tl.cast(tile, tl.int64) // tiles_per_image
    offs_p = (tile % tiles_per_image) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    y, x = offs_p // W, offs_p % W
    ptr_x = x_ptr + n * sx_n + (y * sx_h + x * sx_w)[:, None] + offs_c[None, :] * sx_c
    b_x = tl.load(ptr_x, mask=mask_p[:, None], other=0.0)  # [BLOCK_P, C]
    return n, y, x, mask_p, b_x


@triton.jit
def _preact(b_x, w_ptr, b_ptr, sub, offs_c, C: tl.constexpr, RR: tl.constexpr,
            PRECISION: tl.constexpr):  # fmt: skip
    """z at sub-pixel `sub` = i*r + j: x [BLOCK_P, C] @ W_sub^T + b_sub, fp32."""
    rows = offs_c * RR + sub  # weight rows of output channels c at this sub-pixel
    w_t = tl.load(w_ptr + rows[None, :] * C + offs_c[:, None])  # [C_in, C_out]
    b_z = tl.dot(b_x, w_t, input_precision=PRECISION)  # [BLOCK_P, C]
    return b_z + tl.load(b_ptr + rows)[None, :]


@triton.jit
def upshuffle_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    H, W, tiles_per_image,
    sx_n, sx_c, sx_h, sx_w,
    C: tl.constexpr, R: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out (N, C, H*R, W*R contiguous) = GELU(PixelShuffle_R(1x1(x))); x strided."""
    HW = H * W
    offs_c = tl.arange(0, C)
    n, y, x, mask_p, b_x = _input_tile(tl.program_id(0), tiles_per_image, HW, W, x_ptr,
                                       sx_n, sx_c, sx_h, sx_w, offs_c, BLOCK_P)  # fmt: skip
    WO = W * R
    out_img = out_ptr + n * C * HW * (R * R)  # int64 image offset
    for i in tl.static_range(R):
        for j in tl.static_range(R):
            b_z = _preact(b_x, w_ptr, b_ptr, i * R + j, offs_c, C, R * R, PRECISION)
            b_g, _ = _gelu_and_grad(b_z)
            offs_o = offs_c[None, :] * (HW * R * R) + ((y * R + i) * WO + x * R + j)[:, None]
            tl.store(out_img + offs_o, b_g.to(out_ptr.dtype.element_ty), mask=mask_p[:, None])


@triton.jit
def upshuffle_bwd_dx_kernel(
    x_ptr, w_ptr, b_ptr, dout_ptr, dx_ptr,
    H, W, tiles_per_image,
    sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
    C: tl.constexpr, R: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dx (N, C, H, W contiguous, x's dtype) = sum over (i, j) of (GELU'(z) * dout) @ W_ij."""
    HW = H * W
    offs_c = tl.arange(0, C)
    dtype = x_ptr.dtype.element_ty
    n, y, x, mask_p, b_x = _input_tile(tl.program_id(0), tiles_per_image, HW, W, x_ptr,
                                       sx_n, sx_c, sx_h, sx_w, offs_c, BLOCK_P)  # fmt: skip
    dout_img = dout_ptr + n * sd_n
    b_dx = tl.zeros([BLOCK_P, C], dtype=tl.float32)
    for i in tl.static_range(R):
        for j in tl.static_range(R):
            b_z = _preact(b_x, w_ptr, b_ptr, i * R + j, offs_c, C, R * R, PRECISION)
            _, b_dg = _gelu_and_grad(b_z)
            offs_d = offs_c[None, :] * sd_c + ((y * R + i) * sd_h + (x * R + j) * sd_w)[:, None]
            b_do = tl.load(dout_img + offs_d, mask=mask_p[:, None], other=0.0)
            b_dz = (b_dg * b_do.to(tl.float32)).to(dtype)  # [BLOCK_P, C]
            rows = offs_c * (R * R) + (i * R + j)
            w = tl.load(w_ptr + rows[:, None] * C + offs_c[None, :])  # [C_out, C_in]
            b_dx += tl.dot(b_dz, w, input_precision=PRECISION)
    offs_x = offs_c[None, :] * HW + (y * W + x)[:, None]
    tl.store(dx_ptr + n * C * HW + offs_x, b_dx.to(dtype), mask=mask_p[:, None])


@triton.jit
def upshuffle_bwd_dw_kernel(
    x_ptr, w_ptr, b_ptr, dout_ptr, dw_part_ptr, db_part_ptr,
    H, W, tiles_per_image, num_tiles, num_chunks,
    sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
    C: tl.constexpr, R: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Program pid = chunk * R*R + sub accumulates, over tiles chunk, chunk + num_chunks, ...,
    the fp32 partials dW[rows c*R*R + sub] ([C, C]) and db at dw_part[chunk, sub]."""
    pid = tl.program_id(0)
    chunk = pid // (R * R)
    sub = pid % (R * R)
    i = sub // R
    j = sub % R
    HW = H * W
    offs_c = tl.arange(0, C)
    dtype = x_ptr.dtype.element_ty
    acc_w = tl.zeros([C, C], dtype=tl.float32)
    acc_b = tl.zeros([C], dtype=tl.float32)
    for tile in range(chunk, num_tiles, num_chunks):
        n, y, x, mask_p, b_x = _input_tile(tile, tiles_per_image, HW, W, x_ptr,
                                           sx_n, sx_c, sx_h, sx_w, offs_c, BLOCK_P)  # fmt: skip
        b_z = _preact(b_x, w_ptr, b_ptr, sub, offs_c, C, R * R, PRECISION)
        _, b_dg = _gelu_and_grad(b_z)
        offs_d = offs_c[None, :] * sd_c + ((y * R + i) * sd_h + (x * R + j) * sd_w)[:, None]
        b_do = tl.load(dout_ptr + n * sd_n + offs_d, mask=mask_p[:, None], other=0.0)
        b_dz = b_dg * b_do.to(tl.float32)  # [BLOCK_P, C]; 0 at masked pixels
        acc_w += tl.dot(tl.trans(b_dz.to(dtype)), b_x, input_precision=PRECISION)
        acc_b += tl.sum(b_dz, axis=0)
    pid64 = pid.to(tl.int64)  # = chunk * R*R + sub: the partials are [num_chunks, R*R, ...]
    tl.store(dw_part_ptr + pid64 * C * C + offs_c[:, None] * C + offs_c[None, :], acc_w)
    tl.store(db_part_ptr + pid64 * C + offs_c, acc_b)


# ---------------------------------------------------------------------------------------
# Configs and launchers


def upshuffle_config(channels: int, dtype: torch.dtype, factor: int, kernel: str) -> KernelConfig:
    """The config a launcher runs `kernel` ("fwd", "bwd_dx", "bwd_dw") with.

    Chosen so no config spills on sm_90 / sm_80 at C = 64 (`ssiu check-kernels`): 32-pixel
    tiles for 16-bit inputs, 16 for fp32; 4 warps for the forward, 8 for the backward
    kernels. fp32 dots use TF32 ("ieee" fp32 dots run on FMA units and spill): "tf32x3"
    (about fp32 accuracy) in the forward, "tf32" in the backward, where tf32x3 spills.
    The interpreter computes every dot exactly.
    """
    wide = dtype == torch.float32
    block_p = 16 if wide else 32
    block_p = max(16, min(block_p, block_p * 64 // channels))
    warps = 8 if wide or kernel != "fwd" else 4
    precision = ("tf32x3" if kernel == "fwd" else "tf32") if wide else "ieee"
    constexprs = {"C": channels, "R": factor, "BLOCK_P": block_p, "PRECISION": precision}
    return KernelConfig(constexprs, num_warps=warps, num_stages=1)


def _weight(weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype):
    c_out, c_in = weight.shape[:2]
    return weight.reshape(c_out, c_in).to(dtype).contiguous(), bias.to(torch.float32).contiguous()


def upshuffle_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, factor: int):
    """GELU(PixelShuffle_r(conv1x1(x, weight, bias))). x: (N, C, H, W) any strides;
    weight (C*r*r, C, 1, 1), bias (C*r*r,). Returns (N, C, H*r, W*r) contiguous."""
    n, c, h, w = x.shape
    cfg = upshuffle_config(c, x.dtype, factor, "fwd")
    tiles_per_image = cdiv(h * w, cfg.constexprs["BLOCK_P"])
    out = empty((n, c, h * factor, w * factor), dtype=x.dtype, device=x.device)
    upshuffle_fwd_kernel[(n * tiles_per_image,)](
        x, *_weight(weight, bias, x.dtype), out, h, w, tiles_per_image, *x.stride(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )  # fmt: skip
    return out


def upshuffle_bwd(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  factor: int) -> list[torch.Tensor]:  # fmt: skip
    """[dx, dweight, dbias]: dx contiguous in x's dtype, the others in their dtype/shape."""
    n, c, h, w = x.shape
    rr = factor * factor
    w2d, b32 = _weight(weight, bias, x.dtype)
    dout = dout.to(x.dtype)

    cfg = upshuffle_config(c, x.dtype, factor, "bwd_dx")
    tiles_per_image = cdiv(h * w, cfg.constexprs["BLOCK_P"])
    dx = empty((n, c, h, w), dtype=x.dtype, device=x.device)
    upshuffle_bwd_dx_kernel[(n * tiles_per_image,)](
        x, w2d, b32, dout, dx, h, w, tiles_per_image, *x.stride(), *dout.stride(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )  # fmt: skip

    cfg = upshuffle_config(c, x.dtype, factor, "bwd_dw")
    tiles_per_image = cdiv(h * w, cfg.constexprs["BLOCK_P"])
    num_tiles = n * tiles_per_image
    chunks = min(num_tiles, max(1, max_programs(x.device) // rr))
    dw_part = empty((chunks, rr, c, c), dtype=torch.float32, device=x.device)
    db_part = empty((chunks, rr, c), dtype=torch.float32, device=x.device)
    upshuffle_bwd_dw_kernel[(chunks * rr,)](
        x, w2d, b32, dout, dw_part, db_part, h, w, tiles_per_image, num_tiles, chunks,
        *x.stride(), *dout.stride(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )  # fmt: skip
    # [sub, C_out, C_in] -> weight rows c * r*r + sub: (C_out, sub, C_in) order.
    dweight = dw_part.sum(0).transpose(0, 1).reshape(weight.shape).to(weight.dtype)
    dbias = db_part.sum(0).t().reshape(bias.shape).to(bias.dtype)
    return [dx, dweight, dbias]


# ---------------------------------------------------------------------------------------
# Registry: every (kernel, config) the launchers above can pick for C = 64, r = 2 and 3.

_X = ("sx_n", "sx_c", "sx_h", "sx_w")
_D = ("sd_n", "sd_c", "sd_h", "sd_w")
for _kernel, _name, _pointers, _scalars in (
    (upshuffle_fwd_kernel, "fwd", "x_ptr:dt w_ptr:dt b_ptr out_ptr:dt",
     ("H", "W", "tiles_per_image", *_X)),
    (upshuffle_bwd_dx_kernel, "bwd_dx", "x_ptr:dt w_ptr:dt b_ptr dout_ptr:dt dx_ptr:dt",
     ("H", "W", "tiles_per_image", *_X, *_D)),
    (upshuffle_bwd_dw_kernel, "bwd_dw", "x_ptr:dt w_ptr:dt b_ptr dout_ptr:dt dw_part_ptr "
     "db_part_ptr", ("H", "W", "tiles_per_image", "num_tiles", "num_chunks", *_X, *_D)),
):  # fmt: skip
    register(
        KernelSpec(
            name=_kernel.__name__,
            fn=_kernel,
            signature=dtype_signature([p.split(":") for p in _pointers.split()], _scalars),
            configs=tuple(
                DtypeConfig.of(upshuffle_config(64, dt, r, _name), dt)
                for dt in KERNEL_DTYPES
                for r in FACTORS
            ),
        )
    )

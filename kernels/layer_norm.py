"""Fused per-pixel LayerNorm over channels (the step LN of SS-ReM), forward and backward.

    y = (x - mean_c(x)) * rstd * weight + bias,   rstd = 1 / sqrt(var_c(x) + eps)

with the biased variance over the C channels of each pixel. x is (N, C, H, W).

Strategy: one program per tile of BLOCK_P pixels of one image, all C channels in
registers as a [BLOCK_P, C] tile; statistics in fp32. The backward recomputes mean and
rstd from x (nothing is saved but the inputs) and uses

    x_hat = (x - mean) * rstd,   g = dy * weight
    dx    = rstd * (g - mean_c(g) - x_hat * mean_c(g * x_hat))
    dweight = sum over pixels of dy * x_hat,   dbias = sum over pixels of dy

with dweight/dbias as fp32 per-program partial sums (programs loop over tiles, one wave)
in one buffer, reduced in a fixed order by one `partials.sum_partials` launch. x and dy may have any
strides; outputs are contiguous.
Image index and base offsets are int64; offsets inside an image int32, or int64 in the
INT64_INDEX variant the launcher picks for images of 2**31 elements or more.
Statistics and the affine step are fp32 for every input dtype; tolerances as in
ssiu.testing.TOLERANCES.

Memory access: with a unit column stride (what the JIT sees for NCHW maps) and W a
multiple of 16, the flat pixel offsets h * sx_h + w stay provably contiguous in runs of
16, so loads and stores put lanes on pixels and move 16 bytes each (the SASS of the bf16
and fp32 forward and backward at W = 64 has no 2-byte global access; the 4-byte ones are
the [C] weight/bias loads and the partial-sum stores). Floor per pixel at C = 64, bf16:
forward 256 bytes (read x, write y), backward 384 (read x, dy; write dx), both reached
(x is recomputed, not re-read); about 10 FLOPs per element.

Not fused into the MSGM prologue: the normalised map feeds two MSGMs and the ESAM input,
so it is written once here and read by each consumer (a prologue would recompute it in
both MSGMs). In the fused SS-ReM step the backward is an epilogue instead
(`normalized`, `normalized_grad` in `msgm_bwd_dx_kernel` with HAS_LN: the last MSGM
backward of the step produces d a_n tile by tile), so `layer_norm2d_bwd_kernel` runs only
for the LayerNorm alone (`ops.layer_norm2d`).
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
    needs_int64_index,
)
from ssiu.kernels.partials import persistent_programs, sum_partials
from ssiu.kernels.registry import KernelConfig, KernelSpec, register


@triton.jit
def _normalize(x_ptr, tile, tiles_per_image, HW, W, sx_n, sx_c, sx_h, sx_w, eps,
               C: tl.constexpr, BLOCK_P: tl.constexpr, INT64_INDEX: tl.constexpr):  # fmt: skip
    """Load one pixel tile and return (x_hat, rstd, offsets...) in fp32.

    The image index n is int64; offsets inside the image are int32 unless INT64_INDEX.
    """
    tile = tl.cast(tile, tl.int64)
    n = tile // tiles_per_image
    if INT64_INDEX:
        offs_p = (tile % tiles_per_image) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
        offs_c = tl.arange(0, C).to(tl.int64)
    else:
        offs_p = (tile % tiles_per_image).to(tl.int32) * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.arange(0, C)
    mask_p = offs_p < HW
    h, w = offs_p // W, offs_p % W
    ptr_x = x_ptr + n * sx_n + ((h * sx_h + w * sx_w)[:, None] + offs_c[None, :] * sx_c)
    b_x = tl.load(ptr_x, mask=mask_p[:, None], other=0.0).to(tl.float32)  # [BLOCK_P, C]
    b_xhat, rstd = normalized(b_x, eps, C)
    return b_xhat, rstd, n, offs_p, offs_c, mask_p, h, w


@triton.jit
def normalized(b_x, eps, C: tl.constexpr):
    """(x_hat [P, C], rstd [P]) of an fp32 [P, C] tile, normalised over its channels."""
    mean = tl.sum(b_x, axis=1) / C  # [P]
    b_xc = b_x - mean[:, None]
    rstd = 1.0 / tl.sqrt(tl.sum(b_xc * b_xc, axis=1) / C + eps)  # [P]
    return b_xc * rstd[:, None], rstd


@triton.jit
def normalized_grad(b_xhat, rstd, b_dy, b_w, C: tl.constexpr):
    """dx [P, C] fp32 of the LayerNorm of a tile (`normalized`'s x_hat, rstd) from its
    output gradient b_dy [P, C] fp32 and weight b_w [C]."""
    b_g = b_dy * b_w[None, :]
    mean_g = tl.sum(b_g, axis=1) / C  # [P]
    mean_gx = tl.sum(b_g * b_xhat, axis=1) / C
    return (b_g - mean_g[:, None] - b_xhat * mean_gx[:, None]) * rstd[:, None]


@triton.jit
def layer_norm2d_fwd_kernel(
    x_ptr, weight_ptr, bias_ptr, y_ptr,
    H, W, tiles_per_image, sx_n, sx_c, sx_h, sx_w, eps,
    C: tl.constexpr, BLOCK_P: tl.constexpr, INT64_INDEX: tl.constexpr,
):  # fmt: skip
    """y (contiguous NCHW, x's dtype) = LayerNorm over channels of x (strided)."""
    HW = H * W
    b_xhat, _, n, offs_p, offs_c, mask_p, _, _ = _normalize(
        x_ptr, tl.program_id(0), tiles_per_image, HW, W, sx_n, sx_c, sx_h, sx_w, eps,
        C, BLOCK_P, INT64_INDEX,
    )  # fmt: skip
    b_w = tl.load(weight_ptr + offs_c)  # [C] fp32
    b_b = tl.load(bias_ptr + offs_c)
    b_y = b_xhat * b_w[None, :] + b_b[None, :]  # [BLOCK_P, C]
    ptr_y = y_ptr + n * C * HW + (offs_c[None, :] * HW + offs_p[:, None])
    tl.store(ptr_y, b_y.to(y_ptr.dtype.element_ty), mask=mask_p[:, None])


@triton.jit
def layer_norm2d_bwd_kernel(
    x_ptr, dy_ptr, weight_ptr, dx_ptr, dweight_part_ptr, dbias_part_ptr,
    H, W, tiles_per_image, num_tiles, part_stride,
    sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w, eps,
    C: tl.constexpr, BLOCK_P: tl.constexpr, INT64_INDEX: tl.constexpr,
):  # fmt: skip
    """dx (contiguous NCHW) and this program's fp32 partial sums of dweight and dbias (row
    pid of partial buffers with row stride part_stride)."""
    pid = tl.program_id(0)
    HW = H * W
    offs_w = tl.arange(0, C)
    b_w = tl.load(weight_ptr + offs_w)  # [C] fp32
    acc_w = tl.zeros([C], dtype=tl.float32)
    acc_b = tl.zeros([C], dtype=tl.float32)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        b_xhat, rstd, n, offs_p, offs_c, mask_p, h, w = _normalize(
            x_ptr, tile, tiles_per_image, HW, W, sx_n, sx_c, sx_h, sx_w, eps, C, BLOCK_P,
            INT64_INDEX,
        )  # fmt: skip
        ptr_dy = dy_ptr + n * sd_n + ((h * sd_h + w * sd_w)[:, None] + offs_c[None, :] * sd_c)
        b_dy = tl.load(ptr_dy, mask=mask_p[:, None], other=0.0).to(tl.float32)  # [BLOCK_P, C]
        acc_w += tl.sum(b_dy * b_xhat, axis=0)
        acc_b += tl.sum(b_dy, axis=0)
        b_dx = normalized_grad(b_xhat, rstd, b_dy, b_w, C)
        ptr_dx = dx_ptr + n * C * HW + (offs_c[None, :] * HW + offs_p[:, None])
        tl.store(ptr_dx, b_dx.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None])
    pid64 = pid.to(tl.int64)
    tl.store(dweight_part_ptr + pid64 * part_stride + offs_w, acc_w)
    tl.store(dbias_part_ptr + pid64 * part_stride + offs_w, acc_b)


def layer_norm2d_config(
    channels: int, dtype: torch.dtype, kernel: str, int64_index: bool = False
) -> KernelConfig:
    """Tiles of about 4K elements (BLOCK_P = 64 for C = 64); `kernel` is "fwd" or "bwd".

    The backward holds x_hat, dy and weight * dy as fp32 tiles: 8 warps keep it well
    under the register limit (4 warps: about 250 registers a thread on sm_90). Its
    INT64_INDEX variant (images of 2**31 elements or more, see `needs_int64_index`) takes
    tiles of about 2K elements: at 4K, Triton 3.6 (torch 2.11's pin) spills about 150
    bytes on sm_90 with 8 warps (1 or 2 stages; 48-56 bytes with 16 warps), where Triton
    3.9 does not; at 2K both compile spill-free on sm_90 and sm_80 (`ssiu check-kernels`).
    """
    elements = 2048 if kernel == "bwd" and int64_index else 4096
    block_p = max(16, min(128, elements // channels))
    num_warps = 8 if kernel == "bwd" else 4
    return KernelConfig({"C": channels, "BLOCK_P": block_p}, num_warps=num_warps, num_stages=1)


# Resident CTAs per SM of the backward (8 warps at 80 registers: 3), one wave of programs.
_BWD_CTAS_PER_SM = 3


def _geometry(x: torch.Tensor, block_p: int):
    n, _, h, w = x.shape
    tiles_per_image = cdiv(h * w, block_p)
    return tiles_per_image, n * tiles_per_image


def layer_norm2d_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    """x: (N, C, H, W) any strides; weight, bias: (C,). Returns y, contiguous, x's dtype."""
    n, c, h, w = x.shape
    int64_index = needs_int64_index(x)
    cfg = layer_norm2d_config(c, x.dtype, "fwd", int64_index)
    tiles_per_image, num_tiles = _geometry(x, cfg.constexprs["BLOCK_P"])
    y = empty((n, c, h, w), dtype=x.dtype, device=x.device)
    layer_norm2d_fwd_kernel[(num_tiles,)](
        x, weight.float().contiguous(), bias.float().contiguous(), y,
        h, w, tiles_per_image, *x.stride(), eps, INT64_INDEX=int64_index,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.constexprs,
    )  # fmt: skip
    return y


def layer_norm2d_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float,
    partials: torch.Tensor | None = None,
):  # fmt: skip
    """(dx, [dweight, dbias] packed flat in fp32); dx contiguous in x's dtype.

    partials: a [programs, 2C] fp32 view (unit column stride) of a buffer shared with
    other ops: the kernel writes its partial sums there and returns None for the
    gradients (the caller reduces the whole buffer once).
    """
    n, c, h, w = x.shape
    int64_index = needs_int64_index(x, dy)
    cfg = layer_norm2d_config(c, x.dtype, "bwd", int64_index)
    tiles_per_image, num_tiles = _geometry(x, cfg.constexprs["BLOCK_P"])
    if partials is None:
        programs = min(num_tiles, persistent_programs(x.device, _BWD_CTAS_PER_SM))
        part = empty((programs, 2 * c), dtype=torch.float32, device=x.device)
    else:
        part = partials  # extra programs find no tile and write zero partials
        programs = part.shape[0]
    dx = empty((n, c, h, w), dtype=x.dtype, device=x.device)
    layer_norm2d_bwd_kernel[(programs,)](
        x, dy, weight.float().contiguous(), dx, part[:, :c], part[:, c:],
        h, w, tiles_per_image, num_tiles, part.stride(0), *x.stride(), *dy.stride(), eps,
        INT64_INDEX=int64_index, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **cfg.constexprs,
    )  # fmt: skip
    return dx, (sum_partials(part) if partials is None else None)  # [2C]: dweight, dbias


_STRIDES = ("sx_n", "sx_c", "sx_h", "sx_w")
_SPECS = (
    (
        layer_norm2d_fwd_kernel,
        "fwd",
        "x_ptr:dt weight_ptr bias_ptr y_ptr:dt",
        ("H", "W", "tiles_per_image", *_STRIDES),
    ),
    (
        layer_norm2d_bwd_kernel,
        "bwd",
        "x_ptr:dt dy_ptr:dt weight_ptr dx_ptr:dt dweight_part_ptr dbias_part_ptr",
        (
            "H",
            "W",
            "tiles_per_image",
            "num_tiles",
            "part_stride",
            *_STRIDES,
            "sd_n",
            "sd_c",
            "sd_h",
            "sd_w",
        ),
    ),
)
for _kernel, _kind, _pointers, _scalars in _SPECS:
    register(
        KernelSpec(
            name=_kernel.__name__,
            fn=_kernel,
            signature=dtype_signature(
                [p.split(":") for p in _pointers.split()],
                _scalars,
                floats=("eps",),
                wide=[s for s in _scalars if s.startswith("s")],
            ),
            configs=tuple(
                DtypeConfig.of(layer_norm2d_config(64, dt, _kind, wide), dt, {"INT64_INDEX": wide})
                for dt in KERNEL_DTYPES
                for wide in (False, True)
            ),
        )
    )

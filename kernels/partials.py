"""Deterministic second-stage reduction of per-program fp32 weight-gradient partials.

A persistent backward kernel writes, per program, all the parameter-gradient partials of
its op packed in one row of a [programs, total] fp32 buffer. One launch of
`sum_partials_kernel` sums the rows in a fixed order (row 0, 1, ...) into a [total] fp32
vector: one reduction per op instead of one `sum` launch per parameter, no atomics, and
the same bits on every run. The caller hands out views of the vector per parameter
(outside the custom op, whose outputs may not alias each other). A second [rows_b,
total_b] block, summed over its own rows into the columns after the first's, lets ops
whose persistent kernels run different program counts share the one launch (the fused
tail: the upsampling stages' dW programs and the RGB 3x3's).

Bytes: reads programs * total * 4, writes total * 4 (about 4.3 MB read for MoE-FS at
132 programs; the kernels' activations move GBs). Lanes run along the packed columns,
contiguous, 16 B per lane.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ssiu.kernels.common import cdiv, empty, per_sm_programs
from ssiu.kernels.registry import KernelConfig, KernelSpec, register

BLOCK = 1024  # columns per program: 4 warps x 32 lanes x 8 fp32 (two 16 B loads a lane)


@triton.jit
def sum_partials_kernel(part_ptr, out_ptr, rows, total, part_b_ptr, rows_b, total_b,
                        BLOCK: tl.constexpr):  # fmt: skip
    """out[k] = sum over r = 0, 1, ..., rows - 1 (in that order) of part[r, k] (k < total),
    then out[total + k] = the same sum over the rows of part_b [rows_b, total_b] (k <
    total_b; rows_b = 0: no second block). Two blocks so that ops whose kernels run
    different program counts (one wave each) still share one reduction.

    int32 offsets: the launcher checks rows * total, rows_b * total_b < 2**31.
    """
    start = tl.program_id(0) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # Each loop keeps one stride for the whole block (contiguous, wide loads); a block
    # straddling the two parts runs both, masked.
    mask = offs < total
    for r in range(tl.where(start < total, rows, 0)):
        acc += tl.load(part_ptr + r * total + offs, mask=mask, other=0.0)
    offs_b = offs - total
    mask_b = (offs_b >= 0) & (offs_b < total_b)
    for r in range(tl.where(start + BLOCK > total, rows_b, 0)):
        acc += tl.load(part_b_ptr + r * total_b + offs_b, mask=mask_b, other=0.0)
    tl.store(out_ptr + offs, acc, mask=offs < total + total_b)


def persistent_programs(device: torch.device, ctas_per_sm: int) -> int:
    """Programs of a persistent weight-gradient kernel: as many as fit the GPU at once
    (ctas_per_sm per SM, from the config's registers), so every program runs in one wave
    and the partials are no larger than needed (modelled GPUs included). The interpreter
    gets a handful, so the tests run the tile loop."""
    return per_sm_programs(device, ctas_per_sm)


def sum_partials(part: torch.Tensor, part_b: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, ...] contiguous fp32 partials -> their fp32 sum over rows, flat [total];
    with part_b ([rows_b, ...] contiguous fp32), that sum followed by part_b's over its
    rows, [total + total_b], in the same one launch."""
    blocks = [(t.shape[0], t.numel() // t.shape[0]) for t in (part, part_b) if t is not None]
    if any(t.numel() >= 2**31 for t in (part, part_b) if t is not None):
        raise ValueError(f"sum_partials addresses with int32; got blocks {blocks}")
    (rows, total), (rows_b, total_b) = blocks[0], (blocks + [(0, 0)])[1]
    out = empty((total + total_b,), dtype=torch.float32, device=part.device)
    sum_partials_kernel[(cdiv(total + total_b, BLOCK),)](
        part, out, rows, total, part if part_b is None else part_b, rows_b, total_b,
        BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
    return out


def split_flat(flat: torch.Tensor, like) -> list[torch.Tensor]:
    """Views of consecutive pieces of `flat` shaped (and cast) like each tensor of `like`."""
    out, start = [], 0
    for p in like:
        out.append(flat[start : start + p.numel()].view(p.shape).to(p.dtype))
        start += p.numel()
    return out


register(
    KernelSpec(
        name=sum_partials_kernel.__name__,
        fn=sum_partials_kernel,
        signature={
            "part_ptr": "*fp32",
            "out_ptr": "*fp32",
            "rows": "i32",
            "total": "i32",
            "part_b_ptr": "*fp32",
            "rows_b": "i32",
            "total_b": "i32",
        },
        configs=(KernelConfig({"BLOCK": BLOCK}, num_warps=4, num_stages=1),),
    )
)

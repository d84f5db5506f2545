"""MSGM row tiles at C = 64: the column taps made by shift dots over the halo chunks.

The kernels tile each image row by BLOCK_P pixels (C = 64: 16 in fp32; fp16/bf16 on
sm_90, the tiles the CPU runs, 64 in the forward and 32 in the backward, on sm_80 32 and
16) and move the neighbour taps in registers (16-bit: 1x1_c once per row chunk, then the
column sums shifted). These widths hit the corner cases: a last tile of a single pixel
(its +1 tap reflects onto the previous tile's last column) and a row narrower than a tile.
"""

from __future__ import annotations

import pytest
import torch
from ssiu.kernels.common import modelled_arch

import ssiu.ops.fused  # noqa: F401  (registers the ssiu:: custom ops)
from ssiu.ops import MSGMParams, msgm
from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter

SHAPES = MSGMParams(
    (64, 64, 1, 1), (64,), (64, 64, 1, 1), (64,), (64, 1, 3, 3), (64,),
    (64, 64, 1, 1), (64,), (64, 64, 1, 1), (64,),
)  # fmt: skip


def _run(x, params, residual, dout, dtype, backend):
    leaves = [t.to(dtype).requires_grad_() for t in (x, *params, residual)]
    out = msgm(leaves[0], MSGMParams(*leaves[1:-1]), leaves[-1], backend=backend)
    return out, torch.autograd.grad(out, leaves, dout.to(dtype))


def _check(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    rnd = lambda s, scale=1.0: (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(
        dtype
    )
    x, res, dout = rnd(shape), rnd(shape), rnd(shape)
    params = [rnd(s, 0.2 if len(s) == 1 else 2.0 / (9 if s[1] == 1 else 64) ** 0.5) for s in SHAPES]
    ref_out, ref_grads = _run(x, params, res, dout, torch.float64, "torch")
    out, grads = _run(x, params, res, dout, dtype, "triton")
    assert_close_to_reference(out, ref_out, dtype, "out")
    names = ("x",) + MSGMParams._fields + ("residual",)
    for name, g, ref in zip(names, grads, ref_grads, strict=True):
        assert_close_to_reference(g, ref, dtype, f"d{name}")


@pytest.mark.parametrize(
    "shape",
    [
        (1, 64, 2, 17),  # fp32 tiles of 16: the last tile holds column 16 alone
        (1, 64, 3, 5),  # a row narrower than a tile, three tap rows with reflection
    ],
)
def test_fp32_c64_row_tiles(shape):
    _check(shape, torch.float32)


def test_fp16_c64_last_tiles_of_one_pixel():
    """sm_90 tiles: W = 65 puts one pixel in the last tile of the forward (64) and of the
    backward kernels (32)."""
    _check((1, 64, 2, 65), torch.float16)


def test_fp16_c64_sm80_tiles_width_of_two_tiles_plus_one():
    """sm_80 tiles (forward 32, backward 16): W = 33 puts one pixel in the last tile."""
    with modelled_arch(80):
        _check((1, 64, 2, 33), torch.float16)


@pytest.mark.parametrize("shape", [(1, 64, 3, 2), (2, 64, 2, 3)])
def test_fp16_c64_rows_of_two_and_three_pixels(shape):
    """Every column tap reflects inside one tile; the halo chunks hold no image pixel."""
    _check(shape, torch.float16)

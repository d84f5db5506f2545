"""ESAM LocalProp on row tiles (ssiu.kernels.esam `prop_fwd`, ssiu.kernels.esam_bwd
`prop_bwd`) against float64 PyTorch: rows of several tiles (a partial last one), the
smallest grids (Hp = 4), crops of 0..2 pixels, v and dout strided.

Kernels run through the Triton interpreter on CPU; outputs are NaN-poisoned (conftest).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssiu.kernels import esam as K
from ssiu.kernels import esam_bwd as KB

from ssiu.ops.msgm import depthwise3x3_reflect
from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter

# (Hp, Wp, H, W): W = 142, 150 take three 64-pixel tiles (o runs past one chunk); fp16
# at the small grid only in the default run (the interpreter is slow in fp16).
SLOW = pytest.mark.slow
CASES = [
    ((4, 72, 8, 142), torch.float32),
    ((8, 80, 6, 150), torch.float32),
    ((4, 8, 6, 14), torch.float32),
    ((4, 8, 6, 14), torch.float16),
    pytest.param((4, 72, 8, 142), torch.float16, marks=SLOW),
    pytest.param((8, 80, 6, 150), torch.float16, marks=SLOW),
]


def _source(size_out, size_in):
    """Source index pairs and weights of bilinear x2 (align_corners=True) with the
    coordinates in fp32, as the kernels and PyTorch's fp32 upsampling compute them: at
    W ~ 150 they differ from float64 coordinates by ~1e-5 (beyond fp32 tolerances)."""
    scale = torch.tensor((size_in - 1) / (2 * size_in - 1), dtype=torch.float32)
    src = torch.arange(size_out, dtype=torch.float32) * scale
    i0 = src.long()
    lam = (src - i0.float()).double()
    return i0, torch.clamp(i0 + 1, max=size_in - 1), lam


def _localprop(o, weight, bias, h, w):
    t = depthwise3x3_reflect(o, weight, bias)
    y0, y1, ly = _source(h, t.shape[2])
    x0, x1, lx = _source(w, t.shape[3])
    rows = t[:, :, y0] * (1 - ly)[:, None] + t[:, :, y1] * ly[:, None]
    return rows[..., x0] * (1 - lx) + rows[..., x1] * lx


def test_fp32_coordinates_are_pytorchs_bilinear():
    """The reference's interpolation (identity 3x3: centre tap 1) is F.interpolate's."""
    t = torch.randn(1, 2, 5, 9, dtype=torch.float64)
    identity = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    identity[:, :, 1, 1] = 1
    want = F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)
    got = _localprop(t, identity, torch.zeros(2, dtype=torch.float64), 10, 18)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)  # fp32 vs float64 coordinates


@pytest.mark.parametrize("grid, dtype", CASES)
def test_prop_fwd_row_tiles(grid, dtype):
    hp, wp, h, w = grid
    c = 32
    o = torch.randn(2, c, hp, wp).to(dtype)
    weight, bias = torch.randn(c, 1, 3, 3) / 3, torch.randn(c)
    v = torch.randn(2, c, w, h).to(dtype).transpose(2, 3)  # strided: the generic loads
    want = _localprop(o.double(), weight.double(), bias.double(), h, w) + v.double()
    for vv in (v, v.contiguous()):
        got = K.prop_fwd(o, weight, bias, vv, add_input=True)
        assert_close_to_reference(got, want, dtype, "out")
    got = K.prop_fwd(o, weight, bias, v, add_input=False)
    assert_close_to_reference(got, want - v.double(), dtype, "out (no residual)")


@pytest.mark.parametrize("hp, wp, h, w", [(4, 40, 8, 78), (8, 24, 14, 48)])
def test_prop_bwd_row_tiles(hp, wp, h, w):
    """dO, d weight, d bias at rows of several 16-pixel tiles (a partial last one)."""
    c = 16
    o = torch.randn(2, c, hp, wp)
    weight, bias = torch.randn(c, 1, 3, 3), torch.randn(c)
    dout = torch.randn(2, c, h, w)
    inputs = [t.double().requires_grad_() for t in (o, weight, bias)]
    want = torch.autograd.grad(_localprop(*inputs, h, w), inputs, dout.double())
    for d in (dout, dout.transpose(2, 3).contiguous().transpose(2, 3)):
        got = KB.prop_bwd(d, o, weight)
        for name, g, ref in zip(("do", "dweight", "dbias"), got, want, strict=True):
            assert_close_to_reference(g, ref, torch.float32, name)

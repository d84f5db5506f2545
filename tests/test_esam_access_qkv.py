"""The ESAM qkv kernels on row tiles (ssiu.kernels.esam `qkv_fwd`, ssiu.kernels.esam_bwd
`qkv_bwd`) against float64 PyTorch, at grids where a row takes several tiles: the last
tile of a row is moved left to end at Wp (overlapping its neighbour) and reflects the
padded columns from its own pixels, so these shapes check that overlap and that gather.

Kernels run through the Triton interpreter on CPU; outputs are NaN-poisoned (conftest).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssiu.kernels import esam as K
from ssiu.kernels import esam_bwd as KB
from test_esam_backward import qkv_bwd_inputs, qkv_bwd_reference

from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter

# (C, H, W): C = 32 fp32 runs 32-pixel row tiles; 16 runs 64 (`esam_config`).
#   Wh = 33 -> Wp = 40: tiles at 0 and 8 (overlapping), 7 padded columns.
#   Wh = 36 -> Wp = 72 at C = 32: tiles at 0, 32 and 40; pad rows 5 -> 8.
#   Wh = 65 -> Wp = 72 at C = 16: tiles at 0 and 8.
SHAPES = [(32, 10, 66), (32, 10, 144), (16, 12, 130)]


def _reference_qkv(v, weight, block):
    hh, wh, hp, wp = K.padded_grid(v.shape[2], v.shape[3], block)
    u = F.pad(F.max_pool2d(v.double(), 2), (0, wp - wh, 0, hp - hh), mode="reflect")
    return F.conv2d(u, weight.double())


@pytest.mark.parametrize("c, h, w", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qkv_fwd_row_tiles(c, h, w, dtype):
    v = torch.randn(2, c, h, w).to(dtype)
    weight = (torch.randn(3 * c, c, 1, 1) * c**-0.5).to(dtype)
    got = K.qkv_fwd(v, weight, 8)
    assert_close_to_reference(got, _reference_qkv(v, weight, 8), dtype, "qkv")


def test_qkv_fwd_strided_input():
    c, h, w = 32, 10, 66
    v = torch.randn(1, c, w, h).transpose(2, 3)  # width stride != 1: the generic loads
    weight = torch.randn(3 * c, c, 1, 1) * c**-0.5
    assert_close_to_reference(K.qkv_fwd(v, weight, 8), _reference_qkv(v, weight, 8),
                              torch.float32, "qkv")  # fmt: skip


@pytest.mark.parametrize("add_input", [True, False])
@pytest.mark.parametrize("c, h, w", [(16, 6, 130), (16, 6, 36)])
def test_qkv_bwd_row_tiles(c, h, w, add_input):
    """dv and dW at sampled rows of several 16-pixel tiles (a partial last one), with
    ties in the 2x2 windows (the gradient goes to the first maximum), v strided; the
    fold of the k, v windows (block 4, halo 1) on the same rows."""
    n, block, halo = 2, 4, 1
    v, weight, dq, dkw, dvw = qkv_bwd_inputs(n, c, h, w, block, halo)
    dout = torch.randn(n, c, h, w) if add_input else None
    want_dv, want_dw = qkv_bwd_reference(v, weight, dq, dkw, dvw, dout, block, halo)
    for vv in (v, v.contiguous()):  # the generic loads, and the contiguous rows of the GPU path
        dv, dw = KB.qkv_bwd(dq, torch.stack([dkw, dvw]), vv, weight, dout, block=block,
                            halo=halo)  # fmt: skip
        assert_close_to_reference(dv, want_dv, torch.float32, "dv")
        assert_close_to_reference(dw.reshape(weight.shape), want_dw, torch.float32, "dW")

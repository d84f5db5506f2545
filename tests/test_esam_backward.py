"""The ESAM backward kernels (ssiu.kernels.esam_bwd): each adjoint against PyTorch autograd
in float64, the released geometry (C = 64, 4 heads, block 8, halo 1) end to end, and
determinism (same inputs, bit-identical gradients).

Kernels run through the Triton interpreter on CPU (fp32); outputs are NaN-poisoned.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssiu.kernels import esam_bwd as KB

from ssiu.ops import ESAMParams, esam
from ssiu.ops.msgm import depthwise3x3_reflect
from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter


def _grads(fn, inputs, dout):
    inputs = [t.detach().double().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs), inputs, dout.double())


@pytest.mark.parametrize("hp, wp, h, w", [(8, 16, 12, 30), (4, 8, 8, 14), (16, 8, 30, 16)])
def test_prop_bwd_is_the_localprop_adjoint(hp, wp, h, w):
    """dO, d weight, d bias of crop(bilinear_x2_ac(dw3x3_reflect(o) + b)), small grids
    (Hp = 4: the bilinear candidate window at its tightest) and crops of 0..2 pixels."""
    c = 16
    o = torch.randn(2, c, hp, wp)
    weight, bias = torch.randn(c, 1, 3, 3), torch.randn(c)
    dout = torch.randn(2, c, h, w)

    def localprop(o, weight, bias):
        t = depthwise3x3_reflect(o, weight, bias)
        return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)[..., :h, :w]

    want = _grads(localprop, [o, weight, bias], dout)
    strided = dout.transpose(2, 3).contiguous().transpose(2, 3)  # dout may be any layout
    got = KB.prop_bwd(strided, o, weight)
    for name, g, ref in zip(("do", "dweight", "dbias"), got, want, strict=True):
        assert_close_to_reference(g, ref, torch.float32, name)


def qkv_bwd_reference(v, weight, dq, dkw, dvw, dout, block, halo):
    """float64 dv, dW of u = max_pool_2x2(v), qkv = 1x1(reflect_pad(u)) to whole blocks,
    split into q and the k, v windows (`F.unfold`, zero outside the grid), (+ v when dout
    is given): what `qkv_bwd` computes from the attention backward's dq, dK, dV windows."""
    c, hh, wh = v.shape[1], v.shape[2] // 2, v.shape[3] // 2
    hp, wp = dq.shape[-2:]
    win = block + 2 * halo

    def forward(v, weight):
        u = F.pad(F.max_pool2d(v, 2), (0, wp - wh, 0, hp - hh), mode="reflect")
        q, k, vv = F.conv2d(u, weight).split(c, dim=1)
        unfold = lambda t: F.unfold(t, win, stride=block, padding=halo)  # noqa: E731
        return q, unfold(k), unfold(vv), v

    vd = v.double().requires_grad_()
    wd = weight.double().requires_grad_()
    outs, grads = list(forward(vd, wd)), [dq.double(), dkw.double(), dvw.double()]
    if dout is None:
        outs.pop()
    else:
        grads.append(dout.double())
    return torch.autograd.grad(outs, [vd, wd], grads)


def qkv_bwd_inputs(n, c, h, w, block, halo):
    """v with many ties in its 2x2 windows, strided; weight; dq and the dK, dV windows."""
    hh, wh = h // 2, w // 2
    hp, wp = -(-hh // block) * block, -(-wh // block) * block
    win, blocks = block + 2 * halo, (hp // block) * (wp // block)
    v = torch.randint(-2, 3, (n, c, h, w)).float()
    v = v.transpose(2, 3).contiguous().transpose(2, 3)
    weight = torch.randn(3 * c, c, 1, 1)
    dq = torch.randn(n, c, hp, wp)
    dkw, dvw = torch.randn(2, n, c * win * win, blocks)
    return v, weight, dq, dkw, dvw


@pytest.mark.parametrize(
    "block, halo, add_input", [(8, 1, True), (4, 3, False), (4, 5, True)]
)  # fmt: skip
def test_qkv_bwd_is_the_fold_projection_and_max_pool_adjoint(block, halo, add_input):
    """dv and dW through the fold of the k, v windows and the reflect pad (halo 5 > block
    reaches the windows of blocks two away; 5 x 11 sampled pixels pad to whole blocks),
    the qkv 1x1 and the max-pool with ties (the gradient goes to the first maximum in
    row-major order, as PyTorch) (+ v)."""
    n, c, h, w = 2, 16, 10, 22
    v, weight, dq, dkw, dvw = qkv_bwd_inputs(n, c, h, w, block, halo)
    dout = torch.randn(n, c, h, w) if add_input else None
    want_dv, want_dw = qkv_bwd_reference(v, weight, dq, dkw, dvw, dout, block, halo)
    dv, dw = KB.qkv_bwd(dq, torch.stack([dkw, dvw]), v, weight, dout, block=block, halo=halo)
    assert dv.dtype == v.dtype and dv.is_contiguous()
    assert_close_to_reference(dv, want_dv, torch.float32, "dv")
    assert_close_to_reference(dw.reshape(weight.shape), want_dw, torch.float32, "dW")


def _released_inputs(shape):
    c, heads, win = 64, 4, 10
    v = torch.randn(shape)
    params = [
        torch.randn(3 * c, c, 1, 1) * c**-0.5,
        torch.randn(win, c // heads // 2),
        torch.randn(win, c // heads // 2),
        torch.randn(c, 1, 3, 3) / 3,
        torch.randn(c),
    ]
    return v, params, torch.randn(shape)


def _run(v, params, dout, backend, topk):
    v = v.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    out = esam(v, ESAMParams(*params), heads=4, block=8, halo=1, topk=topk, backend=backend)
    return out, torch.autograd.grad(out, [v, *params], dout)


@pytest.mark.parametrize("topk", [pytest.param(None, marks=pytest.mark.slow), 16])
def test_released_geometry_against_float64(topk):
    """C = 64, 4 heads of 16, block 8, halo 1; a 9x13 sampled grid (odd, padded to 16x16)."""
    v, params, dout = _released_inputs((1, 64, 18, 26))
    ref_out, ref_grads = _run(v.double(), [p.double() for p in params], dout.double(), "torch",
                              topk)  # fmt: skip
    out, grads = _run(v, params, dout, "triton", topk)
    assert_close_to_reference(out, ref_out, torch.float32, "out")
    names = ("v", *ESAMParams._fields)
    for name, g, ref in zip(names, grads, ref_grads, strict=True):
        assert_close_to_reference(g, ref, torch.float32, f"d{name}")


def test_backward_is_deterministic():
    """Same inputs, two backward passes: every gradient bit-identical (no atomics)."""
    v, params, dout = _released_inputs((2, 64, 16, 18))  # 8x9 grid: 2 blocks, mirrored column
    first = _run(v, params, dout, "triton", 16)[1]
    second = _run(v, params, dout, "triton", 16)[1]
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)

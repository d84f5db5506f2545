"""Fused step LayerNorm (ssiu::layer_norm2d_fwd / _bwd) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import ssiu.ops.fused  # noqa: F401  (registers the ssiu:: custom ops)
from ssiu.modules import LayerNorm2d
from ssiu.ops import layer_norm2d
from ssiu.ops.layer_norm import EPS
from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter


def inputs(n, c, h, w, dtype, device="cpu"):
    """x (with a per-pixel offset, so the mean matters), weight, bias, dy; float64 holders."""
    rnd = lambda t: t.to(dtype).to(torch.float64).to(device)
    x = rnd(torch.randn(n, c, h, w, dtype=torch.float64) * 2 + torch.randn(n, 1, h, w) * 3)
    weight = rnd(1 + 0.5 * torch.randn(c, dtype=torch.float64))
    bias = rnd(0.5 * torch.randn(c, dtype=torch.float64))
    dy = rnd(torch.randn(n, c, h, w, dtype=torch.float64))
    return x, weight, bias, dy


def run(x, weight, bias, dy, backend):
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = layer_norm2d(*leaves, EPS, backend=backend)
    return y, torch.autograd.grad(y, leaves, dy)


def check(shape, dtype, layout=lambda t: t, device="cpu"):
    x, weight, bias, dy = inputs(*shape, dtype=dtype, device=device)
    ref_y, ref_grads = run(x, weight, bias, dy, "torch")
    y, grads = run(layout(x.to(dtype)), weight.to(dtype), bias.to(dtype), layout(dy.to(dtype)),
                   "triton")  # fmt: skip
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close_to_reference(y, ref_y, dtype, "y", precision="layer_norm.fwd")
    for name, g, ref in zip(("dx", "dweight", "dbias"), grads, ref_grads, strict=True):
        assert_close_to_reference(g, ref, dtype, name, precision="layer_norm.bwd")


@pytest.mark.parametrize(
    "shape",
    [
        (2, 16, 5, 7),  # partial tile
        (1, 64, 11, 13),  # C = 64, tiles across rows
        (3, 64, 9, 16),  # 9 tiles on 4 programs: the backward's tile loop
        (3, 32, 2, 3),
        (1, 16, 1, 1),  # a single pixel
    ],
)
def test_fp32_forward_and_gradients(shape):
    check(shape, torch.float32)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda t: t.contiguous(memory_format=torch.channels_last), id="channels_last"),
        pytest.param(lambda t: torch.stack([t, -t], dim=-1)[..., 0], id="strided_view"),
    ],
)
def test_fp32_non_contiguous(layout):
    check((2, 16, 6, 5), torch.float32, layout)


@pytest.mark.parametrize("shape", [(1, 64, 5, 7), (2, 32, 3, 2)])
def test_fp16_in_interpreter(shape):
    check(shape, torch.float16)


@pytest.mark.parametrize("contiguous", [True, False])
def test_opcheck(contiguous):
    x, weight, bias, dy = (t.float() for t in inputs(2, 16, 3, 5, torch.float32))
    if not contiguous:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    torch.library.opcheck(torch.ops.ssiu.layer_norm2d_fwd, (*leaves, EPS))
    torch.library.opcheck(torch.ops.ssiu.layer_norm2d_bwd, (dy, x.detach(), weight.detach(), EPS))


@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    module = LayerNorm2d(16)
    module.backend = "triton"
    with torch.no_grad():
        module.weight.add_(torch.randn(16) * 0.3)
        module.bias.add_(torch.randn(16) * 0.3)
    x = torch.randn(2, 16, 5, 3, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        out_c = compiled(x)
    grads_c = torch.autograd.grad(out_c.square().sum(), [x, module.weight, module.bias])
    out_e = module(x)
    grads_e = torch.autograd.grad(out_e.square().sum(), [x, module.weight, module.bias])
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 67, 80), (40, 64, 64, 64), (1, 64, 2, 3)])
def test_gpu_against_float64(dtype, shape):
    check(shape, dtype, device="cuda")

"""The fused SS-ReM step (`ops.ssrem_step`, backend "triton") against the float64 reference
composition, forward and every gradient, through the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

import ssiu
from ssiu import ops
from ssiu.modules import SSReMStep
from ssiu.testing import assert_close_to_reference, tolerance

pytestmark = pytest.mark.interpreter


def make_step(channels: int, heads: int, block: int, topk: int | None) -> SSReMStep:
    """A float64 step with every parameter random at unit scale (no zero-initialised
    layer, so no gradient vanishes by construction)."""
    config = ssiu.SSIUConfig(scale=2, channels=channels, heads=heads, block=block, halo=1,
                             attn_topk=topk)  # fmt: skip
    step = SSReMStep(config).double()
    with torch.no_grad():
        for name, p in step.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 0
            p.copy_(torch.randn_like(p) * (fan_in**-0.5 if fan_in else 0.2))
            if name == "norm.weight":
                p.add_(1.0)
    return step


def leaves_and_grads(step, a, y, dout):
    a, y = a.clone().requires_grad_(), y.clone().requires_grad_()
    out = step(a, y)
    names = ["a", "y"] + [n for n, _ in step.named_parameters()]
    grads = torch.autograd.grad(out, [a, y, *step.parameters()], dout)
    return out, dict(zip(names, grads, strict=True))


def check_step(channels, heads, block, topk, shape, dtype):
    torch.manual_seed(0)
    reference = make_step(channels, heads, block, topk)
    fused = make_step(channels, heads, block, topk).to(dtype)
    fused.load_state_dict(reference.state_dict())
    for module in fused.modules():
        module.backend = "triton"
    a = torch.randn(shape, dtype=torch.float64)
    y = torch.randn(shape, dtype=torch.float64)
    dout = torch.randn(shape, dtype=torch.float64)
    ref_out, ref_grads = leaves_and_grads(reference, a, y, dout)
    out, grads = leaves_and_grads(fused, a.to(dtype), y.to(dtype), dout.to(dtype))
    # The step chains six ops (LayerNorm, four MSGMs, ESAM), each rounding between them
    # and each within its own per-element bound: their errors add, so the step gets
    # twice the single-op bound of the dtype's row.
    tol = tolerance(dtype)
    loose = dict(atol=2 * tol.floor * tol.u, rtol=2 * tol.elem * tol.u)
    assert_close_to_reference(out, ref_out, dtype, "step output", **loose)
    for name, g in grads.items():
        assert g.dtype == dtype
        assert_close_to_reference(g, ref_grads[name], dtype, f"d{name}", **loose)


@pytest.mark.parametrize("topk", [None, 10], ids=["dense", "topk10"])
def test_fp32_forward_and_all_gradients(topk):
    check_step(32, 2, 4, topk, (2, 32, 10, 14), torch.float32)


def test_fp16_forward_and_all_gradients():
    check_step(32, 2, 4, 10, (1, 32, 8, 10), torch.float16)


def test_c64_production_geometry():
    """C = 64, 4 heads, block 8, halo 1 (the released step), at a small odd-ish map."""
    check_step(64, 4, 8, 40, (1, 64, 16, 18), torch.float32)


def test_fake_outputs_match_real_ones():
    """The fake implementations give the shapes and dtypes the kernels return."""
    from ssiu.ops import fused_step

    torch.manual_seed(0)
    step = make_step(32, 2, 4, None).float()
    a, y = torch.randn(1, 32, 8, 8), torch.randn(1, 32, 8, 8)
    flat = fused_step.flatten(step.params())
    args = (2, 4, 1, 0)  # heads, block, halo, topk (dense)
    real = fused_step.step_fwd(a, y, flat, *args)
    fake = fused_step._step_fwd_fake(
        a.to("meta"), y.to("meta"), [p.to("meta") for p in flat], *args
    )
    assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]
    saved = [a] + real[1:]
    real_b = fused_step.step_bwd(real[0], saved, flat, *args)
    meta = lambda ts: [t.to("meta") for t in ts]
    fake_b = fused_step._step_bwd_fake(real[0].to("meta"), meta(saved), meta(flat), *args)
    assert [(t.shape, t.dtype) for t in real_b] == [(t.shape, t.dtype) for t in fake_b]


def test_backends():
    """ "auto" on CPU is the reference; "triton" raises for a geometry the kernels lack."""
    step = make_step(32, 2, 4, None).float()
    a, y = torch.randn(1, 32, 8, 8), torch.randn(1, 32, 8, 8)
    expected = ops.ssrem_step_reference(a, y, step.params(), step.geometry())
    step.backend = "auto"
    torch.testing.assert_close(step(a, y), expected, rtol=0, atol=0)
    config = ssiu.SSIUConfig(scale=2, channels=16, heads=2, block=4, halo=1)
    small = SSReMStep(config)
    small.backend = "triton"
    with pytest.raises(ValueError, match="fused"):
        small(torch.randn(1, 16, 8, 8), torch.randn(1, 16, 8, 8))
    with pytest.raises(ValueError, match="y must match a"):
        ops.ssrem_step(a, y[:, :, :4], step.params(), step.geometry(), backend="torch")


@pytest.mark.slow
def test_compiled_fused_step_has_no_graph_break():
    """torch.compile(fullgraph=True) traces the step op forward and backward (aot_eager:
    the graph Inductor would see, without its C++ compile) to the eager results exactly."""
    torch.manual_seed(0)
    step = make_step(32, 2, 4, 10).float()
    for module in step.modules():
        module.backend = "triton"
    a = torch.randn(1, 32, 8, 10, requires_grad=True)
    y = torch.randn(1, 32, 8, 10, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    leaves = [a, y, *step.parameters()]
    grads_c = torch.autograd.grad(compiled(a, y).square().sum(), leaves)
    grads_e = torch.autograd.grad(step(a, y).square().sum(), leaves)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)

"""Fused MoE-FS (ssiu::moe_fs_fwd / ssiu::moe_fs_bwd) against the float64 reference.

On CPU the kernels run through the Triton interpreter (fp32, fp16); bf16 and the GPU
paths are marked `gpu`. Launcher outputs are NaN-poisoned (conftest), so an element a
kernel does not write fails.
"""

from __future__ import annotations

import pytest
import torch

import ssiu.ops.fused_moe  # noqa: F401  (registers the ssiu:: custom ops)
from ssiu.ops.moe import MoEParams, moe_fs, moe_fs_reference, moe_gate_weights
from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter

PARAM_NAMES = ("w1", "w2", "w3", "b1", "b2", "b3", "fuse_weight", "fuse_bias")


def make_params(c: int) -> list[torch.Tensor]:
    """Gate/fuse weights (float64) in the flat order of the custom ops; gates are scaled
    up so the softmax is far from uniform and top-k really selects."""
    gates = [torch.randn(c, c, 1, 1, dtype=torch.float64) * 2 * c**-0.5 for _ in range(3)]
    biases = [torch.randn(c, dtype=torch.float64) for _ in range(3)]
    fuse = torch.randn(c, c, 1, 1, dtype=torch.float64) * c**-0.5
    return [*gates, *biases, fuse, 0.2 * torch.randn(c, dtype=torch.float64)]


def as_params(flat) -> MoEParams:
    return MoEParams(tuple(flat[0:3]), tuple(flat[3:6]), flat[6], flat[7])


def inputs(n, c, h, w, dtype, device="cpu"):
    """experts, params, residual, dout: rounded to `dtype`, held in float64."""
    rnd = lambda t: t.to(dtype).to(torch.float64).to(device)
    experts = [rnd(torch.randn(n, c, h, w, dtype=torch.float64)) for _ in range(3)]
    params = [rnd(p) for p in make_params(c)]
    residual = rnd(torch.randn(n, c, h, w, dtype=torch.float64))
    dout = rnd(torch.randn(n, c, h, w, dtype=torch.float64))
    return experts, params, residual, dout


def run(experts, params, residual, dout, topk, backend):
    experts = [e.detach().requires_grad_() for e in experts]
    params = [p.detach().requires_grad_() for p in params]
    res = None if residual is None else residual.detach().requires_grad_()
    out = moe_fs(tuple(experts), as_params(params), topk=topk, residual=res, backend=backend)
    leaves = experts + params + ([res] if res is not None else [])
    return out, torch.autograd.grad(out, leaves, dout)


def check(experts, params, residual, dout, topk, dtype, *, layout=lambda t: t, tol=None):
    ref_out, ref_grads = run(experts, params, residual, dout, topk, "torch")
    cast = lambda t: None if t is None else layout(t.to(dtype))
    out, grads = run(
        [cast(e) for e in experts], [p.to(dtype) for p in params], cast(residual),
        cast(dout), topk, "triton",
    )  # fmt: skip
    tol = tol or {}
    assert out.dtype == dtype
    assert_close_to_reference(out, ref_out, dtype, "out", precision="moe_fs.fwd", **tol)
    names = ("e1", "e2", "e3") + PARAM_NAMES + (("residual",) if residual is not None else ())
    for name, g, ref in zip(names, grads, ref_grads, strict=True):
        assert g.dtype == dtype, name
        assert_close_to_reference(g, ref, dtype, f"d{name}", precision="moe_fs.bwd", **tol)


@pytest.mark.parametrize("topk", [1, 2, 3])
@pytest.mark.parametrize(
    "shape, residual",
    [((2, 16, 5, 7), True), ((1, 32, 6, 11), False)],  # odd sizes, partial tiles, batch 2
)
def test_fp32_forward_and_all_gradients(shape, residual, topk):
    experts, params, res, dout = inputs(*shape, torch.float32)
    check(experts, params, res if residual else None, dout, topk, torch.float32)


@pytest.mark.parametrize("topk", [1, 2])
def test_ties_are_kept(topk):
    """Equal logits: gates 1 and 2 identical (zero weights, one bias), so p1 == p2 exactly.

    Channels where the tie is the largest keep both experts at top-1; where it is the
    smallest, top-2 keeps all three. The kernel and the reference agree on every one.
    """
    experts, params, res, dout = inputs(2, 16, 3, 5, torch.float32)
    bias = torch.linspace(-2, 2, 16, dtype=torch.float64)
    params[0] = params[1] = torch.zeros_like(params[0])
    params[3] = params[4] = bias
    params[2] = torch.zeros_like(params[2])
    params[5] = torch.zeros_like(bias)  # expert 3 logit 0: ties win for bias > 0
    check(experts, params, res, dout, topk, torch.float32)
    # The tie really is kept: with top-1, channels with bias > 0 mix both experts 1, 2.
    out = moe_fs_reference(tuple(experts), as_params(params), topk=topk)
    p = torch.softmax(torch.stack([bias, bias, torch.zeros_like(bias)]), 0)
    kept = p >= p.topk(topk, 0).values[-1]
    assert kept[:2, bias > 0].all() and torch.isfinite(out).all()


def test_topk1_still_trains_the_gates():
    experts, params, _, dout = inputs(1, 16, 4, 4, torch.float32)
    _, grads = run([e.float() for e in experts], [p.float() for p in params], None,
                   dout.float(), 1, "triton")  # fmt: skip
    for name, g in zip(PARAM_NAMES[:6], grads[3:9], strict=True):
        assert g.abs().max() > 0, f"d{name} is zero"


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda t: t.contiguous(memory_format=torch.channels_last), id="channels_last"),
        pytest.param(lambda t: torch.stack([t, -t], dim=-1)[..., 0], id="strided_view"),
    ],
)
def test_fp32_non_contiguous_inputs(layout):
    experts, params, res, dout = inputs(2, 16, 3, 5, torch.float32)
    check(experts, params, res, dout, 2, torch.float32, layout=layout)


def test_experts_with_different_strides():
    experts, params, res, dout = inputs(1, 16, 3, 5, torch.float32)
    ref_out, _ = run(experts, params, res, dout, 3, "torch")
    mixed = [experts[0].float(), experts[1].float().contiguous(memory_format=torch.channels_last),
             experts[2].float()]  # fmt: skip
    out = moe_fs(tuple(mixed), as_params([p.float() for p in params]), residual=res.float(),
                 backend="triton")  # fmt: skip
    assert_close_to_reference(out, ref_out, torch.float32, "out")


def test_expanded_grad_output():
    """A stride-0 incoming gradient (from .sum()) is read through its strides."""
    experts, params, res, _ = inputs(1, 16, 3, 4, torch.float32)
    ref = moe_fs_reference(tuple(e.requires_grad_() for e in experts), as_params(params)).sum()
    ref_grads = torch.autograd.grad(ref, experts)
    e32 = [e.detach().float().requires_grad_() for e in experts]
    out = moe_fs(tuple(e32), as_params([p.float() for p in params]), backend="triton").sum()
    for i, (g, r) in enumerate(zip(torch.autograd.grad(out, e32), ref_grads, strict=True)):
        assert_close_to_reference(g, r, torch.float32, f"de{i + 1}")


@pytest.mark.parametrize("dtype, topk", [(torch.float32, 2), (torch.float16, 1)])
def test_c64_forward_and_all_gradients(dtype, topk):
    """C = 64, the width the kernels are built for; odd 5x7 map, partial tile."""
    experts, params, res, dout = inputs(1, 64, 5, 7, dtype)
    check(experts, params, res, dout, topk, dtype)


def test_fp16_in_interpreter():
    experts, params, res, dout = inputs(1, 16, 5, 7, torch.float16)
    check(experts, params, res, dout, 2, torch.float16)


def test_rejects_what_the_kernel_cannot_run():
    experts, params, _, _ = inputs(1, 24, 2, 2, torch.float32)
    with pytest.raises(ValueError, match="power-of-two"):
        moe_fs(tuple(e.float() for e in experts), as_params([p.float() for p in params]),
               backend="triton")  # fmt: skip
    experts, params, _, _ = inputs(1, 16, 2, 2, torch.float64)
    with pytest.raises(TypeError, match="fused moe_fs runs"):
        moe_fs(tuple(experts), as_params(params), backend="triton")


def test_opcheck_contiguous_and_not():
    experts, params, res, _ = inputs(1, 16, 3, 5, torch.float32)
    f32 = lambda ts: [t.float().requires_grad_() for t in ts]
    op = torch.ops.ssiu.moe_fs_fwd.default
    torch.library.opcheck(op, (f32(experts), res.float().requires_grad_(), f32(params), 1))
    strided = [
        e.float().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_() for e in experts
    ]
    torch.library.opcheck(op, (strided, None, f32(params), 3))


def test_compile_fullgraph_forward_and_backward():
    """torch.compile(fullgraph=True) traces the custom ops forward and backward; "aot_eager"
    is what Inductor would see, without the C++ compile time on a small CPU."""
    experts, params, res, dout = inputs(2, 16, 3, 5, torch.float32)
    flat = [p.float() for p in params]

    def f(e1, e2, e3, residual):
        return moe_fs((e1, e2, e3), as_params(flat), topk=2, residual=residual, backend="triton")

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        leaves = [e.float().requires_grad_() for e in experts] + [res.float().requires_grad_()]
        out = compiled(*leaves)
        grads = torch.autograd.grad(out, leaves, dout.float())
    eager_leaves = [t.detach().requires_grad_() for t in leaves]
    eager = f(*eager_leaves)
    eager_grads = torch.autograd.grad(eager, eager_leaves, dout.float())
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_int64_image_offsets(sparse_view):
    """Image n = 2 starts 2**31 + 32 elements in, with an image stride that itself fits
    int32 (so Triton passes it as i32): the kernels must form n * stride in int64 (an
    int32 product wraps and reads elsewhere)."""
    shape, stride = (3, 16, 3, 5), 2**30 + 16
    experts, params, res, dout = inputs(*shape, torch.float32)
    n, c, h, w = shape
    big = [sparse_view(shape, (stride, h * w, w, 1), t.float()) for t in [*experts, res, dout]]
    assert big[0].stride(0) * (shape[0] - 1) >= 2**31
    ref_out, ref_grads = run(experts, params, res, dout, 2, "torch")
    out, grads = run(big[:3], [p.float() for p in params], big[3], big[4], 2, "triton")
    assert_close_to_reference(out, ref_out, torch.float32, "out")
    for name, g, ref in zip(("e1", "e2", "e3"), grads[:3], ref_grads[:3], strict=True):
        assert_close_to_reference(g, ref, torch.float32, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("topk", [1, 3])
def test_gpu_dtypes(dtype, topk):
    experts, params, res, dout = inputs(2, 64, 37, 29, dtype, device="cuda")
    check(experts, params, res, dout, topk, dtype)


@pytest.mark.gpu
def test_gpu_int64_image_offsets():
    """A real batch past 2**31 elements per tensor (bf16, ~4.3 GB each map)."""
    n, c, h, w = 33, 64, 1024, 1024
    torch.cuda.empty_cache()
    experts = [torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    assert experts[0].numel() > 2**31
    params = [p.to("cuda", torch.bfloat16) for p in make_params(c)]
    out = moe_fs(tuple(experts), as_params(params), topk=2, backend="triton")
    last = [e[-1:].double() for e in experts]
    params64 = [p.double() for p in params]
    ref = moe_fs_reference(tuple(last), as_params(params64), topk=2)
    # The kernel's fp32 logits may select the other expert where two gate weights are
    # within fp32 rounding: on the first GPU run, 1 pixel of 1M. Such pixels are excluded
    # (their fuse 1x1 spreads the flip over all channels); everywhere else must match.
    tie = near_tie_pixels(last, params64, topk=2, eps=1e-5)
    assert tie.float().mean() < 0.05  # about 2% at C = 64
    got = torch.where(tie, ref, out[-1:].double())
    assert_close_to_reference(got, ref, torch.bfloat16, "out[last image]")


def near_tie_pixels(experts, params, topk: int, eps: float) -> torch.Tensor:
    """(N, 1, H, W) bool: pixels where, in some channel, the k-th and (k+1)-th largest
    softmax weights of the float64 reference are closer than eps (a top-k selection that
    rounding may flip)."""
    p = moe_gate_weights(tuple(experts), as_params(params)).sort(dim=0, descending=True).values
    return (p[topk - 1] - p[topk] < eps).any(dim=1, keepdim=True)

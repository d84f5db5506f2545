"""Fused tail (ssiu::tail_fwd / ssiu::tail_bwd; one stage: ssiu::upshuffle_fwd / _bwd) and
the whole model with the fused MoE-FS and tail, against the float64 reference.

On CPU the kernels run through the Triton interpreter (fp32, fp16); bf16 and the GPU
paths are marked `gpu`. Launcher outputs are NaN-poisoned (conftest).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ssiu
import ssiu.ops.fused_tail  # noqa: F401  (registers the ssiu:: custom ops)
from ssiu.modules import MoEFS, Tail, upsample_stages
from ssiu.ops.tail import TailParams, tail
from ssiu.testing import assert_close_to_reference, assert_model_matches_float64

pytestmark = pytest.mark.interpreter


def make_params(c: int, factors) -> list[torch.Tensor]:
    """[up weights..., up biases..., rgb weight, rgb bias], float64, at unit scale."""
    ws = [torch.randn(c * r * r, c, 1, 1, dtype=torch.float64) * c**-0.5 for r in factors]
    bs = [0.5 * torch.randn(c * r * r, dtype=torch.float64) for r in factors]
    rgb = torch.randn(3, c, 3, 3, dtype=torch.float64) * (9 * c) ** -0.5
    return [*ws, *bs, rgb, 0.1 * torch.randn(3, dtype=torch.float64)]


def as_params(flat, stages: int) -> TailParams:
    return TailParams(tuple(flat[:stages]), tuple(flat[stages : 2 * stages]), flat[-2], flat[-1])


def inputs(n, c, h, w, factors, dtype, device="cpu"):
    """f, params, skip, dout rounded to `dtype`, held in float64."""
    rnd = lambda t: t.to(dtype).to(torch.float64).to(device)
    s = 1
    for r in factors:
        s *= r
    f = rnd(torch.randn(n, c, h, w, dtype=torch.float64))
    params = [rnd(p) for p in make_params(c, factors)]
    skip = rnd(torch.randn(n, 3, h * s, w * s, dtype=torch.float64))
    dout = rnd(torch.randn(n, 3, h * s, w * s, dtype=torch.float64))
    return f, params, skip, dout


def run(f, params, skip, dout, factors, backend):
    f = f.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    skip = None if skip is None else skip.detach().requires_grad_()
    out = tail(f, as_params(params, len(factors)), factors=factors, skip=skip, backend=backend)
    leaves = [f, *params] + ([skip] if skip is not None else [])
    return out, torch.autograd.grad(out, leaves, dout)


def check(f, params, skip, dout, factors, dtype, *, layout=lambda t: t, tol=None):
    ref_out, ref_grads = run(f, params, skip, dout, factors, "torch")
    cast = lambda t: None if t is None else layout(t.to(dtype))
    out, grads = run(cast(f), [p.to(dtype) for p in params], cast(skip), cast(dout), factors,
                     "triton")  # fmt: skip
    tol = tol or {}
    assert out.dtype == dtype
    assert_close_to_reference(out, ref_out, dtype, "out", precision="tail.fwd", **tol)
    k = len(factors)
    names = ["f"] + [f"up_weight{i}" for i in range(k)] + [f"up_bias{i}" for i in range(k)]
    names += ["rgb_weight", "rgb_bias"] + (["skip"] if skip is not None else [])
    for name, g, ref in zip(names, grads, ref_grads, strict=True):
        assert g.dtype == dtype, name
        assert_close_to_reference(g, ref, dtype, f"d{name}", precision="tail.bwd", **tol)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_fp32_tail_forward_and_all_gradients(scale):
    factors = upsample_stages(scale)
    f, params, skip, dout = inputs(2, 16, 5, 3, factors, torch.float32)  # odd, batch 2
    check(f, params, skip, dout, factors, torch.float32)


def test_fp32_stage_c32_without_skip():
    f, params, _, dout = inputs(1, 32, 3, 7, (2,), torch.float32)
    check(f, params, None, dout, (2,), torch.float32)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda t: t.contiguous(memory_format=torch.channels_last), id="channels_last"),
        pytest.param(lambda t: torch.stack([t, -t], dim=-1)[..., 0], id="strided_view"),
    ],
)
def test_fp32_non_contiguous_inputs(layout):
    f, params, skip, dout = inputs(2, 16, 3, 4, (3,), torch.float32)
    check(f, params, skip, dout, (3,), torch.float32, layout=layout)


@pytest.mark.parametrize(
    "dtype, factors", [(torch.float32, (2,)), (torch.float16, (3,)), (torch.float16, (2,))]
)
def test_c64_forward_and_all_gradients(dtype, factors):
    """C = 64, the width the kernels are built for; odd 3x5 map, partial tile, x2 and x3
    (16-bit x2: the stage and the final 3x3 in one kernel both ways)."""
    f, params, skip, dout = inputs(1, 64, 3, 5, factors, dtype)
    check(f, params, skip, dout, factors, dtype)


def test_fp16_in_interpreter():
    f, params, skip, dout = inputs(1, 16, 3, 5, (2,), torch.float16)
    check(f, params, skip, dout, (2,), torch.float16)


def test_rejects_what_the_kernel_cannot_run():
    f, params, _, _ = inputs(1, 24, 2, 2, (2,), torch.float32)
    with pytest.raises(ValueError, match="power-of-two"):
        tail(f.float(), as_params([p.float() for p in params], 1), factors=(2,), backend="triton")
    f, params, _, _ = inputs(1, 16, 2, 2, (2,), torch.float32)
    with pytest.raises(TypeError, match="fused tail runs"):
        tail(f, as_params(params, 1), factors=(2,), backend="triton")


@pytest.mark.parametrize("factor", [2, 3])
def test_opcheck_contiguous_and_not(factor):
    c = 16
    x = torch.randn(1, c, 3, 2)
    if factor == 3:
        x = x.transpose(2, 3).contiguous().transpose(2, 3)  # non-contiguous
    w = torch.randn(c * factor * factor, c, 1, 1) * c**-0.5
    b = torch.randn(c * factor * factor)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), factor)
    torch.library.opcheck(torch.ops.ssiu.upshuffle_fwd.default, args)


def test_compile_fullgraph_forward_and_backward():
    """The x4 tail (one op: two stages + the 3x3 + skip) under torch.compile(fullgraph=True)."""
    factors = (2, 2)
    f, params, skip, dout = inputs(1, 16, 3, 4, factors, torch.float32)
    flat = [p.float().requires_grad_() for p in params]

    def fn(f, skip, *flat):
        return tail(f, as_params(list(flat), 2), factors=factors, skip=skip, backend="triton")

    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        leaves = [f.float().requires_grad_(), skip.float().requires_grad_(), *flat]
        out = compiled(*leaves)
        grads = torch.autograd.grad(out, leaves, dout.float())
    eager_leaves = [t.detach().requires_grad_() for t in leaves]
    eager = fn(*eager_leaves)
    eager_grads = torch.autograd.grad(eager, eager_leaves, dout.float())
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e)


def test_int64_image_offsets(sparse_view):
    """Image n = 2 of x and dout starts 2**31 + 32 elements in (the stride fits int32): the
    kernels must form n * stride in int64."""
    c, factor, stride = 16, 2, 2**30 + 16
    x = torch.randn(3, c, 3, 2)
    dout = torch.randn(3, c, 6, 4)
    w = torch.randn(c * 4, c, 1, 1) * c**-0.5
    b = torch.randn(c * 4)
    big_x = sparse_view(x.shape, (stride, 3 * 2, 2, 1), x)
    big_d = sparse_view(dout.shape, (stride, 6 * 4, 4, 1), dout)
    assert big_x.stride(0) * 2 >= 2**31
    xr = x.double().requires_grad_()
    ref = F.gelu(F.pixel_shuffle(F.conv2d(xr, w.double(), b.double()), factor))
    (ref_dx,) = torch.autograd.grad(ref, xr, dout.double())
    big_x.requires_grad_()
    out, _ = torch.ops.ssiu.upshuffle_fwd(big_x, w, b, factor)
    (dx,) = torch.autograd.grad(out, big_x, big_d)
    assert_close_to_reference(out, ref, torch.float32, "out")
    assert_close_to_reference(dx, ref_dx, torch.float32, "dx")


# ---- the whole model ------------------------------------------------------------------

TINY = dict(channels=16, heads=2, steps=3)


@pytest.mark.parametrize(
    "scale, moe_topk",
    [(2, 1)] + [pytest.param(s, k, marks=pytest.mark.slow)
                for s in (2, 3, 4) for k in (1, 2, 3) if (s, k) != (2, 1)],
)  # fmt: skip
def test_model_with_fused_moe_and_tail_matches_float64(scale, moe_topk):
    """Same weights; MoE-FS and the tail on "triton" (fp32), the rest reference (fp32),
    against the whole reference in float64: output and every parameter gradient."""
    model = ssiu.build(scale, moe_topk=moe_topk, **TINY)
    with torch.no_grad():  # sharper gates, so top-k really drops experts
        for gate in model.moe.gates:
            gate.weight.mul_(4)
    assert_model_matches_float64(model, torch.rand(1, 3, 9, 10), fused=(MoEFS, Tail))


@pytest.mark.slow
def test_model_set_backend_triton_matches_torch():
    """model.set_backend("triton") (every fused op that accepts this config: LN, MSGM,
    ESAM with heads=1, MoE-FS, tail) against set_backend("torch") in float64, same weights."""
    model = ssiu.build(2, moe_topk=1, channels=16, heads=1, steps=3)
    assert_model_matches_float64(model, torch.rand(1, 3, 9, 10))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [3, 4])
def test_gpu_dtypes(dtype, scale):
    factors = upsample_stages(scale)
    f, params, skip, dout = inputs(2, 64, 19, 23, factors, dtype, device="cuda")
    check(f, params, skip, dout, factors, dtype)


@pytest.mark.gpu
def test_gpu_int64_image_offsets():
    """A stage output past 2**31 elements (bf16, 4.4 GB): images beyond it right."""
    n, c, h, w = 33, 64, 512, 512  # out: 33 * 64 * 1024 * 1024 = 2.2e9 elements
    torch.cuda.empty_cache()
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16)
    wt = (torch.randn(4 * c, c, 1, 1, device="cuda") * c**-0.5).bfloat16()
    b = torch.randn(4 * c, device="cuda").bfloat16()
    out, _ = torch.ops.ssiu.upshuffle_fwd(x, wt, b, 2)
    assert out.numel() > 2**31
    last = x[-1:].double()
    ref = F.gelu(F.pixel_shuffle(F.conv2d(last, wt.double(), b.double()), 2))
    assert_close_to_reference(out[-1:], ref, torch.bfloat16, "out[last image]")

"""Fused MSGM (ssiu::msgm_fwd / ssiu::msgm_bwd) against the float64 reference.

On CPU the kernels run through the Triton interpreter (fp32, fp16); bf16 and the GPU
paths are marked `gpu`. Every launcher output is NaN-poisoned (conftest), so an element
a kernel does not write fails.
"""

from __future__ import annotations

import pytest
import torch

import ssiu.ops.fused  # noqa: F401  (registers the ssiu:: custom ops)
from ssiu.modules import MSGM
from ssiu.ops import MSGMParams, msgm, msgm_reference
from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter

GRAD_NAMES = ("x",) + MSGMParams._fields


def make_params(c: int, dtype=torch.float64, device="cpu") -> list[torch.Tensor]:
    """Random MSGM weights at unit scale (std 1/sqrt(fan_in): activations stay O(1), as in a
    trained network), float64 leaves."""
    shapes = MSGMParams(
        (c, c, 1, 1), (c,), (c, c, 1, 1), (c,), (c, 1, 3, 3), (c,),
        (c, c, 1, 1), (c,), (c, c, 1, 1), (c,),
    )  # fmt: skip
    out = []
    for shape in shapes:
        fan_in = 9 if len(shape) == 4 and shape[1] == 1 else c
        scale = fan_in**-0.5 if len(shape) == 4 else 0.2
        out.append((torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device))
    return out


def run(x, params, residual, dout, backend):
    """Output and gradients (x, each param, residual) of one MSGM call."""
    x = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    res = None if residual is None else residual.detach().requires_grad_()
    out = msgm(x, MSGMParams(*params), res, backend=backend)
    leaves = [x, *params] + ([res] if res is not None else [])
    grads = torch.autograd.grad(out, leaves, dout)
    return out, grads


def check_against_float64(x, params, residual, dout, dtype, *, layout=lambda t: t):
    """Run the fused op in `dtype` (inputs passed through `layout`), compare to float64."""
    ref_out, ref_grads = run(x, params, residual, dout, "torch")
    cast = lambda t: None if t is None else layout(t.to(dtype))
    out, grads = run(cast(x), [p.to(dtype) for p in params], cast(residual), cast(dout), "triton")
    assert out.dtype == dtype
    assert_close_to_reference(out, ref_out, dtype, "out", precision="msgm.fwd")
    names = GRAD_NAMES + (("residual",) if residual is not None else ())
    for name, g, ref in zip(names, grads, ref_grads, strict=True):
        assert g.dtype == dtype, name
        assert_close_to_reference(g, ref, dtype, f"d{name}", precision="msgm.bwd")


def inputs(n, c, h, w, residual=True, device="cpu", dtype=torch.float64):
    """x, params, residual, dout rounded to `dtype` first, held in float64."""
    rnd = lambda t: t.to(dtype).to(torch.float64).to(device)
    x = rnd(torch.randn(n, c, h, w, dtype=torch.float64))
    params = [rnd(p) for p in make_params(c)]
    res = rnd(torch.randn(n, c, h, w, dtype=torch.float64)) if residual else None
    dout = rnd(torch.randn(n, c, h, w, dtype=torch.float64))
    return x, params, res, dout


@pytest.mark.parametrize(
    "shape, residual",
    [
        ((2, 16, 5, 7), True),  # odd sizes, batch > 1, partial last tile
        ((1, 16, 11, 13), False),  # tiles across rows
        ((2, 16, 13, 17), True),  # 8 tiles on 4 programs: the backward's tile loop
        ((1, 16, 2, 3), True),  # 2-pixel side: every row reflects
        ((1, 32, 3, 2), False),  # C = 32, 2-pixel width
        ((3, 16, 2, 2), True),  # smallest legal image
    ],
)
def test_fp32_forward_and_all_gradients(shape, residual):
    x, params, res, dout = inputs(*shape, residual=residual, dtype=torch.float32)
    check_against_float64(x, params, res, dout, torch.float32)


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param(lambda t: t.contiguous(memory_format=torch.channels_last), id="channels_last"),
        pytest.param(lambda t: torch.stack([t, -t], dim=-1)[..., 0], id="strided_view"),
        pytest.param(lambda t: t.transpose(2, 3).contiguous().transpose(2, 3), id="transposed"),
    ],
)
def test_fp32_non_contiguous_inputs(layout):
    x, params, res, dout = inputs(2, 16, 5, 6, dtype=torch.float32)
    check_against_float64(x, params, res, dout, torch.float32, layout=layout)


def test_fp32_expanded_grad_output():
    """A stride-0 incoming gradient (e.g. from .sum()) is read through its strides."""
    x, params, _, _ = inputs(1, 16, 4, 5, residual=False, dtype=torch.float32)
    ref = msgm_reference(x.requires_grad_(), MSGMParams(*params)).sum()
    (ref_dx,) = torch.autograd.grad(ref, x)
    x32 = x.detach().float().requires_grad_()
    out = msgm(x32, MSGMParams(*[p.float() for p in params]), backend="triton").sum()
    (dx,) = torch.autograd.grad(out, x32)
    assert_close_to_reference(dx, ref_dx, torch.float32, "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_c64_forward_and_all_gradients(dtype):
    """C = 64, the width the kernels are built and tuned for; odd 5x7 map, partial tile."""
    x, params, res, dout = inputs(1, 64, 5, 7, dtype=dtype)
    check_against_float64(x, params, res, dout, dtype)


def test_fp16_in_interpreter():
    x, params, res, dout = inputs(1, 16, 5, 7, dtype=torch.float16)
    check_against_float64(x, params, res, dout, torch.float16)


def test_weights_in_another_dtype_get_gradients_in_their_dtype():
    """Autocast hands fp32 weights to fp16 activations: grads come back fp32."""
    x, params, _, dout = inputs(1, 16, 3, 4, residual=False, dtype=torch.float16)
    xh = x.half().requires_grad_()
    ps = [p.float().requires_grad_() for p in params]
    out = msgm(xh, MSGMParams(*ps), backend="triton")
    grads = torch.autograd.grad(out, [xh, *ps], dout.half())
    assert out.dtype == torch.float16 and grads[0].dtype == torch.float16
    assert all(g.dtype == torch.float32 for g in grads[1:])
    ref_out, ref_grads = run(x, params, None, dout, "torch")
    assert_close_to_reference(out, ref_out, torch.float16, "out")
    for name, g, ref in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert_close_to_reference(g, ref, torch.float16, f"d{name}")


def test_rejects_what_the_kernel_cannot_run():
    x, params, _, _ = inputs(1, 24, 4, 4, residual=False)
    with pytest.raises(ValueError, match="power-of-two"):
        msgm(x.float(), MSGMParams(*[p.float() for p in params]), backend="triton")
    x, params, _, _ = inputs(1, 16, 4, 4, residual=False)
    with pytest.raises(TypeError, match="fused msgm runs"):
        msgm(x, MSGMParams(*params), backend="triton")


def test_fake_impl_on_meta_handles_int64_sized_maps():
    """Shapes past 2**31 elements go through the fake (meta) implementation unchanged."""
    c = 64
    x = torch.empty(16, c, 2048, 1100, device="meta")  # 2.3e9 elements
    assert x.numel() > 2**31
    params = [p.to("meta") for p in make_params(c, torch.float32)]
    out, w_lo = torch.ops.ssiu.msgm_fwd(x, params, x, None)
    assert out.shape == x.shape and out.device.type == "meta" and w_lo.shape == (4, c, c)
    dx, flat = torch.ops.ssiu.msgm_bwd(out, x, params, w_lo, None, None)
    assert dx.shape == x.shape and flat.shape == (sum(p.numel() for p in params),)


@pytest.mark.parametrize(
    "strides, int64_index",
    [
        # image 1 starts past element 2**31: int64 image base, int32 offsets inside
        pytest.param((2**31 + 64, 12, 4, 1), False, id="batch_stride"),
        # a row stride that puts the last row past 2**31: the INT64_INDEX variant
        pytest.param((64, 1, 2**30 + 16, 16), True, id="row_stride"),
    ],
)
def test_int64_offsets_past_2_31(sparse_view, strides, int64_index):
    from ssiu.kernels.common import needs_int64_index

    shape = (2, 16, 3, 4)
    x = sparse_view(shape, strides)
    assert needs_int64_index(x) == int64_index
    x_small = torch.randn(shape)
    x.copy_(x_small)
    params = make_params(16, torch.float32)
    p64 = MSGMParams(*[p.double() for p in params])
    xr = x_small.double().requires_grad_()
    ref = msgm_reference(xr, p64)
    (ref_dx,) = torch.autograd.grad(ref, xr, ref)
    xg = x.requires_grad_()
    out = msgm(xg, MSGMParams(*params), backend="triton")
    assert_close_to_reference(out, ref, torch.float32, "out")
    (dx,) = torch.autograd.grad(out, xg, ref.float())
    assert_close_to_reference(dx, ref_dx, torch.float32, "dx")


def test_int64_index_choice_on_meta_shapes():
    from ssiu.kernels.common import needs_int64_index

    assert not needs_int64_index(torch.empty(40, 64, 64, 64, device="meta"))
    assert not needs_int64_index(torch.empty(4096, 64, 128, 128, device="meta"))  # 4.3e9
    assert needs_int64_index(torch.empty(1, 64, 6000, 6000, device="meta"))  # one image 2.3e9
    wide = torch.empty(1, 64, 64, 64, device="meta").as_strided((1, 64, 64, 64), (1, 1, 2**26, 1))
    assert needs_int64_index(wide)


@pytest.mark.parametrize(
    "residual, contiguous",
    [(True, False)] + [pytest.param(r, c, marks=pytest.mark.slow)
                       for r, c in ((True, True), (False, True), (False, False))],
)  # fmt: skip
def test_opcheck(residual, contiguous):
    x, params, res, _ = inputs(1, 16, 3, 5, residual=residual)
    if contiguous:
        layout = lambda t: t
    else:
        layout = lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)
    x = layout(x.float()).requires_grad_()
    params = [p.float().requires_grad_() for p in params]
    res = None if res is None else layout(res.float()).requires_grad_()
    # With a residual, also the fused step's second residual and backward operands.
    res2 = None if res is None else torch.randn(x.shape, requires_grad=True)
    torch.library.opcheck(torch.ops.ssiu.msgm_fwd, (x, params, res, res2))
    _, w_lo = torch.ops.ssiu.msgm_fwd(x.detach(), [p.detach() for p in params], None, None)
    dout = layout(torch.randn(x.shape))
    extra = (None, None) if res is None else (torch.randn(x.shape), torch.randn(x.shape))
    args = (dout, x.detach(), [p.detach() for p in params], w_lo, *extra)
    torch.library.opcheck(torch.ops.ssiu.msgm_bwd, args)


@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward():
    """torch.compile of a module using the op: no graph break, same output and grads."""
    torch._dynamo.reset()
    module = MSGM(16).float()
    module.backend = "triton"
    x = torch.randn(1, 16, 5, 6, requires_grad=True)
    res = torch.randn(1, 16, 5, 6, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        out_c = compiled(x, res)
    grads_c = torch.autograd.grad(out_c.square().sum(), [x, res, *module.parameters()])
    out_e = module(x, res)
    grads_e = torch.autograd.grad(out_e.square().sum(), [x, res, *module.parameters()])
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)


# ---- GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 67, 80), (1, 64, 5, 65), (1, 64, 2, 3), (3, 32, 17, 9)])
def test_gpu_against_float64(dtype, shape):
    x, params, res, dout = inputs(*shape, device="cuda", dtype=dtype)
    check_against_float64(x, params, res, dout, dtype)


@pytest.mark.gpu
def test_gpu_bf16_about_as_close_as_eager_bf16():
    x, params, res, dout = inputs(2, 64, 48, 40, device="cuda", dtype=torch.bfloat16)
    ref_out, ref_grads = run(x, params, res, dout, "torch")
    bf = lambda t: t.to(torch.bfloat16)
    eager_out, eager_grads = run(bf(x), [bf(p) for p in params], bf(res), bf(dout), "torch")
    out, grads = run(bf(x), [bf(p) for p in params], bf(res), bf(dout), "triton")
    names = ("out", *GRAD_NAMES, "residual")
    for name, a, e, r in zip(names, (out, *grads), (eager_out, *eager_grads),
                             (ref_out, *ref_grads), strict=True):  # fmt: skip
        err = (a.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + 1e-3 * r.abs().max().item(), (name, err, eager_err)


def _fenced(shape, dtype, pad=4096):
    """A contiguous random map inside a NaN-filled buffer: any read past it poisons."""
    numel = torch.Size(shape).numel()
    buf = torch.full((numel + 2 * pad,), float("nan"), dtype=dtype)
    x = buf[pad : pad + numel].view(shape)
    x.copy_(torch.randn(shape))
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_nothing_read_past_the_maps(dtype):
    """Pixels past the row end of a tile (W not a multiple of the tile) must not load:
    the backward multiplies them by a zero dout, and 0 * NaN poisons the weight
    gradients (the fp32 border tap once read one element past the map)."""
    from ssiu.kernels import msgm as kernels

    torch.manual_seed(0)
    shape = (1, 32, 6, 10)
    params = [p.float() for p in make_params(32)]
    x, dout = _fenced(shape, dtype), _fenced(shape, dtype)
    out, w_lo = kernels.msgm_fwd(x, params, None)
    dx, grads = kernels.msgm_bwd(dout, x, params, w_lo, None, None)
    for name, t in (("out", out), ("dx", dx), ("weight gradients", grads)):
        assert not t.isnan().any(), f"{name}: NaN read from outside the maps"

"""Fused ESAM (ssiu::esam_fwd / ssiu::esam_bwd) against the float64 reference.

On CPU the kernels run through the Triton interpreter (fp32, fp16); bf16 and the GPU paths
are marked `gpu`. Every launcher output is NaN-poisoned (conftest), so an element a kernel
does not write fails. Shapes: C = 32 with 2 heads of 16 (tl.dot needs dims >= 16), block 8,
halo 1; v of 2x32x12x20 has a 6x10 sampled grid, reflect-padded to 8x16 (2 blocks).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssiu.kernels import esam as kernels

import ssiu
from ssiu.modules import ESAM
from ssiu.ops import ESAMParams, esam, fused_esam, halo_attention_reference
from ssiu.ops.esam import relative_position
from ssiu.testing import assert_close_to_reference, assert_model_matches_float64, output_and_grads

pytestmark = pytest.mark.interpreter

C, HEADS, BLOCK, HALO = 32, 2, 8, 1
WIN, D = BLOCK + 2 * HALO, C // HEADS
GRAD_NAMES = ("v",) + ESAMParams._fields
SLOW = pytest.mark.slow
# 99 < 100 keys: drops one key per query. 99 and 50 run in `make test-slow`.
TOPKS = [None, pytest.param(99, marks=SLOW), pytest.param(50, marks=SLOW), 16, 1]


def make_params(c=C, heads=HEADS, dtype=torch.float64) -> list[torch.Tensor]:
    d = c // heads
    return [
        (torch.randn(3 * c, c, 1, 1, dtype=torch.float64) * c**-0.5).to(dtype),
        torch.randn(WIN, d // 2, dtype=torch.float64).to(dtype),
        torch.randn(WIN, d // 2, dtype=torch.float64).to(dtype),
        (torch.randn(c, 1, 3, 3, dtype=torch.float64) / 3).to(dtype),
        torch.randn(c, dtype=torch.float64).to(dtype),
    ]


def run(v, params, dout, backend, topk, add_input=True, heads=HEADS):
    """Output and gradients (v, each parameter) of one ESAM call."""
    v = v.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    out = esam(v, ESAMParams(*params), heads=heads, block=BLOCK, halo=HALO, topk=topk,
               add_input=add_input, backend=backend)  # fmt: skip
    return out, torch.autograd.grad(out, [v, *params], dout)


def check_against_float64(v, params, dout, dtype, topk, *, add_input=True, layout=None,
                          atol=None, rtol=None):  # fmt: skip
    """v, params, dout: float64 values (already rounded to dtype); the op runs in dtype."""
    ref_out, ref_grads = run(v, params, dout, "torch", topk, add_input)
    layout = layout or (lambda t: t)
    out, grads = run(layout(v.to(dtype)), [p.to(dtype) for p in params], layout(dout.to(dtype)),
                     "triton", topk, add_input)  # fmt: skip
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close_to_reference(out, ref_out, dtype, "out", precision="esam.fwd", atol=atol,
                              rtol=rtol)  # fmt: skip
    # With one kept key per query the softmax is constant: the gradients of q and k (and
    # so of rel_h, rel_w) are exactly 0 in float64, cancellations of O(1) terms in fp32.
    scale = 1.0 if topk == 1 else 0.0
    for name, g, ref in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert g.dtype == dtype, name
        assert_close_to_reference(g, ref, dtype, f"d{name}", precision="esam.bwd", atol=atol,
                                  rtol=rtol, scale=scale)  # fmt: skip


def inputs(shape, dtype=torch.float64, device="cpu"):
    rnd = lambda t: t.to(dtype).to(torch.float64).to(device)
    v = rnd(torch.randn(shape, dtype=torch.float64))
    return v, [rnd(p) for p in make_params()], rnd(torch.randn(shape, dtype=torch.float64))


@pytest.mark.parametrize("topk", TOPKS)
def test_fp32_forward_and_all_gradients(topk):
    """Grid 6x10 (not whole blocks: reflect-padded to 8x16), batch 2."""
    v, params, dout = inputs((2, C, 12, 20))
    check_against_float64(v, params, dout, torch.float32, topk)


@pytest.mark.parametrize(
    "shape, topk, add_input",
    [
        pytest.param((1, C, 16, 16), 16, False, marks=SLOW),
        ((1, C, 34, 18), 50, True),
        pytest.param((1, C, 30, 14), None, True, marks=SLOW),
    ],
)
def test_fp32_other_grids(shape, topk, add_input):
    """One whole block; 17x9 -> 24x16 (pads of 7); 15x7 -> 16x8 (two block rows)."""
    v, params, dout = inputs(shape)
    check_against_float64(v, params, dout, torch.float32, topk, add_input=add_input)


@pytest.mark.parametrize("layout", ["transposed", pytest.param("sliced", marks=SLOW)])
def test_fp32_non_contiguous_inputs(layout):
    if layout == "transposed":
        fn = lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        fn = lambda t: t.repeat_interleave(2, dim=-1)[..., ::2]  # width stride 2
    v, params, dout = inputs((2, C, 12, 20))
    check_against_float64(v, params, dout, torch.float32, 16, layout=fn)


@pytest.mark.parametrize("topk", [pytest.param(50, marks=SLOW), 16, pytest.param(1, marks=SLOW)])
def test_ties_integer_valued_inputs(topk):
    """Integer-valued v and weights: the scores are exact multiples of 1/4 in fp32 and
    float64 alike, so many keys tie at the k-th score (all must be kept), and the 2x2
    max-pool windows tie too (the gradient goes to the first maximum, as in PyTorch)."""
    shape = (1, C, 12, 20)
    v = torch.randint(-1, 2, shape).double()
    qkv_w = torch.randint(-1, 2, (3 * C, C, 1, 1)).double() * (torch.rand(3 * C, C, 1, 1) < 0.1)
    rel_h = torch.randint(-1, 2, (WIN, D // 2)).double()
    rel_w = torch.randint(-1, 2, (WIN, D // 2)).double()
    _, _, _, pw, pb = make_params()
    params = [qkv_w, rel_h, rel_w, pw, pb]
    # The scores do tie at the threshold in this data (the test would be vacuous if not).
    u = F.pad(F.max_pool2d(v, 2), (0, 6, 0, 2), mode="reflect")
    q, k, val = F.conv2d(u, qkv_w).chunk(3, dim=1)
    k_win = F.unfold(k, WIN, stride=BLOCK, padding=HALO).reshape(1, HEADS, D, WIN, WIN, -1)
    rel = relative_position(rel_h, rel_w).permute(2, 0, 1)
    k_win = (k_win + rel[None, None, :, :, :, None]).flatten(3, 4)  # n, h, d, keys, blocks
    q_blk = F.unfold(q, BLOCK, stride=BLOCK).reshape(1, HEADS, D, BLOCK * BLOCK, -1)
    s = torch.einsum("nhdqb,nhdkb->nhbqk", q_blk * D**-0.5, k_win)
    kth = s.topk(topk, dim=-1).values[..., -1:]
    assert ((s == kth).sum(-1) > 1).any(), "no ties at the threshold"
    dout = torch.randn(shape, dtype=torch.float64)
    check_against_float64(v, params, dout, torch.float32, topk)


def test_maxpool_gradient_goes_to_first_maximum():
    """A constant v ties every 2x2 window: only the top-left element gets gradient."""
    v = torch.full((1, C, 16, 16), 0.5)
    params = [p.float() for p in make_params()]
    dout = torch.randn(1, C, 16, 16)
    _, grads = run(v, params, dout, "triton", None, add_input=False)
    dv = grads[0]
    mask = torch.zeros_like(dv, dtype=torch.bool)
    mask[:, :, ::2, ::2] = True
    assert (dv[~mask] == 0).all() and (dv[mask] != 0).any()
    vt = v.clone().requires_grad_()
    (want,) = torch.autograd.grad(F.max_pool2d(vt, 2), vt, torch.ones(1, C, 8, 8))
    assert ((want != 0) == mask).all()


def assert_about_as_close_as_eager(v, params, dout, dtype, topk, heads=HEADS):
    """The fused op in `dtype` is about as close to float64 as the eager reference in `dtype`.

    Used with top-k in low precision: rounding q, k to fp16/bf16 moves scores across the
    k-th largest, so both eager and fused select a few other keys than float64 does.
    """
    ref_out, ref_grads = run(v, params, dout, "torch", topk, heads=heads)
    low = lambda t: t.to(dtype)
    eager_out, eager_grads = run(low(v), [low(p) for p in params], low(dout), "torch", topk,
                                 heads=heads)  # fmt: skip
    out, grads = run(low(v), [low(p) for p in params], low(dout), "triton", topk, heads=heads)
    for name, a, e, r in zip(("out",) + GRAD_NAMES, (out, *grads), (eager_out, *eager_grads),
                             (ref_out, *ref_grads), strict=True):  # fmt: skip
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err = (a.double() - r).abs().max().item()
        eager_err = (e.double() - r).abs().max().item()
        assert err <= 2 * eager_err + 1e-3 * r.abs().max().item(), (name, err, eager_err)


@pytest.mark.parametrize("dtype, topk", [(torch.float32, 37), (torch.float16, None)])
def test_c64_released_dims(dtype, topk):
    """The released ESAM: C = 64, 4 heads of 16, block 8, halo 1; a 9x11 grid reflect-padded
    to 16x16 (4 blocks, partial at the bottom and right), batch 1."""
    rnd = lambda t: t.to(dtype).to(torch.float64)
    v = rnd(torch.randn(1, 64, 18, 22, dtype=torch.float64))
    params = [rnd(p) for p in make_params(64, 4)]
    dout = rnd(torch.randn(1, 64, 18, 22, dtype=torch.float64))
    ref_out, ref_grads = run(v, params, dout, "torch", topk, heads=4)
    low = lambda t: t.to(dtype)
    out, grads = run(low(v), [low(p) for p in params], low(dout), "triton", topk, heads=4)
    assert_close_to_reference(out, ref_out, dtype, "out", precision="esam.fwd")
    for name, g, ref in zip(GRAD_NAMES, grads, ref_grads, strict=True):
        assert_close_to_reference(g, ref, dtype, f"d{name}", precision="esam.bwd")


def test_fp16_dense_in_interpreter():
    v, params, dout = inputs((1, C, 12, 20), dtype=torch.float16)
    check_against_float64(v, params, dout, torch.float16, None)


def test_fp16_topk_about_as_close_as_eager_fp16():
    v, params, dout = inputs((1, C, 12, 20), dtype=torch.float16)
    assert_about_as_close_as_eager(v, params, dout, torch.float16, 16)


def test_fp16_scores_beyond_fp16_range_do_not_overflow():
    """Scores up to ~4e6 (> 65504, fp16's max) from fp16 q, k, v: the kernel accumulates
    them in fp32, exactly here (integer-valued q, k <= 1000: every partial sum is a multiple
    of 1/4 below 2^22), while the fp16 eager reference overflows its scores to inf and
    returns NaN."""
    n, hp, wp = 1, 8, 16
    q = torch.randint(-1000, 1001, (n, C, hp, wp)).double()
    k = torch.randint(-1000, 1001, (n, C, hp, wp)).double()
    val = torch.randn(n, C, hp, wp).half().double()
    rel_h = torch.randint(-3, 4, (WIN, D // 2)).double()
    rel_w = torch.randint(-3, 4, (WIN, D // 2)).double()
    for topk in (0, 16):
        want = halo_attention_reference(q, k, val, rel_h, rel_w, heads=HEADS, block=BLOCK,
                                        halo=HALO, topk=topk or None)  # fmt: skip
        qkv = torch.cat([q, k, val], dim=1).half()
        o, lse = kernels.attn_fwd(qkv, rel_h, rel_w, heads=HEADS, block=BLOCK, halo=HALO,
                                  topk=topk)  # fmt: skip
        assert o.dtype == torch.float16 and torch.isfinite(lse).all()
        assert_close_to_reference(o, want, torch.float16, f"o (topk={topk})")
    eager = halo_attention_reference(*(t.half() for t in (q, k, val, rel_h, rel_w)),
                                     heads=HEADS, block=BLOCK, halo=HALO, topk=None)  # fmt: skip
    assert not torch.isfinite(eager).all()


def test_rejects_what_the_kernels_cannot_run():
    v = torch.randn(1, 16, 16, 16)
    p16 = [p.float() for p in make_params(16, 2)]  # head_dim 8 < 16
    with pytest.raises(ValueError, match="backend='torch'"):
        esam(v, ESAMParams(*p16), heads=2, block=BLOCK, halo=HALO, backend="triton")
    v, params, _ = inputs((1, C, 16, 16))
    with pytest.raises(TypeError, match="backend='torch'"):
        esam(v, ESAMParams(*params), heads=HEADS, block=BLOCK, halo=HALO, backend="triton")


def test_fake_impl_on_meta():
    v = torch.empty(16, 64, 2048, 1100, device="meta")
    params = [p.float().to("meta") for p in make_params(64, 4)]
    out, o, lse, qkv = torch.ops.ssiu.esam_fwd(v, *params, 4, BLOCK, HALO, 16, True)
    assert out.shape == v.shape and o.shape == (16, 64, 1024, 552)
    # top-k: per (image, head) the log-sum-exps, then the thresholds
    assert lse.shape == (16, 4, 2 * 1024 * 552) and lse.dtype == torch.float32
    assert qkv.shape == (16, 3 * 64, 1024, 552)
    dv, flat = torch.ops.ssiu.esam_bwd(out, v, *params, o, lse, qkv, 4, BLOCK, HALO, 16, True)
    assert dv.shape == v.shape and flat.shape == (sum(p.numel() for p in params),)


def test_int64_offsets_past_2_31(sparse_view):
    """A view whose batch stride puts image 1 past element 2**31: int32 offsets would wrap.

    The storage is a sparse file mapped into memory, so only the touched pages are real.
    """
    shape = (2, C, 16, 16)
    v_small, params, dout = inputs(shape)
    v = sparse_view(shape, (2**31 + 64, 256, 16, 1), v_small)
    ref_out, ref_grads = run(v_small, params, dout, "torch", 16)
    out, grads = run(v, [p.float() for p in params], dout.float(), "triton", 16)
    assert_close_to_reference(out, ref_out, torch.float32, "out")
    assert_close_to_reference(grads[0], ref_grads[0], torch.float32, "dv")
    del v


@pytest.mark.parametrize("contiguous, topk", [pytest.param(True, 16, marks=SLOW), (False, 0)])
def test_opcheck(contiguous, topk):
    transposed = lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)
    layout = (lambda t: t) if contiguous else transposed
    v, params, dout = inputs((1, C, 16, 16))
    v = layout(v.float()).requires_grad_()
    params = [p.float().requires_grad_() for p in params]
    args = (v, *params, HEADS, BLOCK, HALO, topk, True)
    torch.library.opcheck(torch.ops.ssiu.esam_fwd, args)
    out, o, lse, qkv = torch.ops.ssiu.esam_fwd(*args)
    bwd_args = (layout(dout.float()), v.detach(), *[p.detach() for p in params], o, lse, qkv,
                HEADS, BLOCK, HALO, topk, True)  # fmt: skip
    torch.library.opcheck(torch.ops.ssiu.esam_bwd, bwd_args)


def test_dense_topk_is_the_dense_kernel():
    """attn_topk None and any k >= window^2 run the same (dense) kernel: topk argument 0."""
    assert [fused_esam.dense_topk(k, BLOCK, HALO) for k in (None, 100, 101, 99, 1)] == [
        0, 0, 0, 99, 1,
    ]  # fmt: skip


@pytest.mark.slow
def test_compile_fullgraph_forward_and_backward():
    """torch.compile of an ESAM module on the fused op: no graph break, same results."""
    torch._dynamo.reset()
    module = ESAM(ssiu.config.SSIUConfig(channels=C, heads=HEADS, attn_topk=16)).float()
    module.backend = "triton"
    v = torch.randn(1, C, 16, 18, requires_grad=True)
    compiled = torch.compile(module, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        out_c = compiled(v)
    grads_c = torch.autograd.grad(out_c.square().sum(), [v, *module.parameters()])
    out_e = module(v)
    grads_e = torch.autograd.grad(out_e.square().sum(), [v, *module.parameters()])
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("topk", [None, 99, 16, 1])
def test_whole_model_parity(topk):
    """ssiu.build(2, channels=32, heads=2, steps=3, attn_topk=k): fused (fp32) vs reference
    (float64, same weights), output and every parameter gradient."""
    torch.manual_seed(0)
    model = ssiu.build(2, channels=C, heads=HEADS, steps=3, attn_topk=topk)
    x = torch.rand(1, 3, 16, 16)
    scale = None
    if topk == 1:
        # One kept key: softmax is 1 for it, so the rel_h / rel_w gradients cancel to
        # exactly 0 in float64 and to fp32 rounding (~1e-8) in the kernels. Their scale is
        # the size of those gradients with two keys kept (the same weights).
        two = ssiu.build(2, channels=C, heads=HEADS, steps=3, attn_topk=2)
        two.load_state_dict(model.state_dict())
        _, grads = output_and_grads(two.double().set_backend("torch"), x.double())
        scale = {k: g.square().mean().sqrt().item() for k, g in grads.items() if "rel_" in k}
    assert_model_matches_float64(model, x, grad_atol=1e-4, grad_scale=scale)


# ---- GPU ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, C, 12, 20), (3, C, 68, 82)])
def test_gpu_dense_against_float64(dtype, shape):
    v, params, dout = inputs(shape, dtype=dtype, device="cuda")
    check_against_float64(v, params, dout, dtype, None)


@pytest.mark.gpu
@pytest.mark.parametrize("topk", [50, 16, 1])
def test_gpu_fp32_topk_against_float64(topk):
    """Small shape: with fp32 rounding a score within ~1e-6 of the k-th largest could
    select differently than float64; seed 0 has no such near tie here."""
    v, params, dout = inputs((2, C, 12, 20), device="cuda")
    check_against_float64(v, params, dout, torch.float32, topk)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("topk", [None, 16])
def test_gpu_released_dims_about_as_close_as_eager(dtype, topk):
    """C = 64, 4 heads of 16 (the released ESAM), 64x64 maps: 32x32 grid, 16 blocks."""
    rnd = lambda t: t.to(dtype).double().cuda()
    v = rnd(torch.randn(2, 64, 64, 64, dtype=torch.float64))
    params = [rnd(p) for p in make_params(64, 4)]
    dout = rnd(torch.randn(2, 64, 64, 64, dtype=torch.float64))
    assert_about_as_close_as_eager(v, params, dout, dtype, topk, heads=4)

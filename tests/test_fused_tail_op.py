"""The whole fused tail as one op pair (ssiu::tail_fwd / ssiu::tail_bwd): one weight-gradient
reduction per backward, every partial row written when the kernels run more programs than
there are tiles, and fp32 parity of every gradient at C = 64 (x4 and x3) against float64.

fp32 through the Triton interpreter (dots exact there); outputs NaN-poisoned (conftest).
"""

from __future__ import annotations

import collections

import pytest
import torch
from ssiu.kernels.common import modelled_arch, modelled_sm_count

import ssiu.ops.fused_tail  # noqa: F401  (registers the ssiu:: custom ops)
from ssiu.check_kernels import python_function
from ssiu.launch_capture import recording_launches
from ssiu.modules import upsample_stages
from ssiu.ops.tail import TailParams, tail
from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter


def tail_case(n, c, h, w, factors, seed=0):
    """f, [up weights, up biases, rgb weight, rgb bias], skip, dout: float64, exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().double()
    s = 1
    for r in factors:
        s *= r
    ws = [rnd(c * r * r, c, 1, 1) * c**-0.5 for r in factors]
    bs = [0.5 * rnd(c * r * r) for r in factors]
    params = [*ws, *bs, rnd(3, c, 3, 3) * (9 * c) ** -0.5, 0.1 * rnd(3)]
    return rnd(n, c, h, w), params, rnd(n, 3, h * s, w * s), rnd(n, 3, h * s, w * s)


def run_tail(f, params, skip, dout, factors, backend):
    """(out, gradients of f, every parameter and skip)."""
    leaves = [t.detach().requires_grad_() for t in (f, *params, skip)]
    k = len(factors)
    p = TailParams(tuple(leaves[1 : 1 + k]), tuple(leaves[1 + k : 1 + 2 * k]), *leaves[-3:-1])
    out = tail(leaves[0], p, factors=factors, skip=leaves[-1], backend=backend)
    return out, torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_training_step_reduces_the_weight_gradients_once(scale, dtype):
    """Forward and backward of the tail: one sum_partials launch for all its parameters;
    after an x2 stage no 3x3 backward kernel (the stage's backward kernels run it), and
    in 16-bit no 3x3 forward kernel either (recorded, not run: the count does not depend
    on the values)."""
    factors = upsample_stages(scale)
    f, params, skip, dout = tail_case(1, 16, 3, 4, factors)
    launches = collections.Counter()
    record = lambda kernel, *_: launches.update([python_function(kernel).__name__])
    with recording_launches(record):
        run_tail(f.to(dtype), [p.to(dtype) for p in params], skip.to(dtype), dout.to(dtype),
                 factors, "triton")  # fmt: skip
    k = len(factors)
    fused_bwd = factors[-1] == 2
    fused_fwd = fused_bwd and dtype != torch.float32
    assert launches == collections.Counter({
        "upshuffle_bwd_dx_kernel": k, "upshuffle_bwd_dw_kernel": k, "sum_partials_kernel": 1,
        "upshuffle_fwd_kernel": k - fused_fwd, "upshuffle_rgb_fwd_kernel": int(fused_fwd),
        "tail_rgb_fwd_kernel": int(not fused_fwd), "tail_rgb_bwd_kernel": int(not fused_bwd),
    })  # fmt: skip


@pytest.mark.parametrize(("scale", "sms"), [(4, 16), (3, 40)], ids=["x4", "x3"])
def test_c64_all_gradients_with_more_programs_than_tiles(scale, sms):
    """C = 64, odd 3x5 map, batch 2, fp32: output and the gradients of f, every weight and
    bias and the skip against float64. Counted for a GPU of `sms` SMs, the stages' dW
    kernels run more chunks than the first stage has row tiles and the 3x3's backward
    more programs than its tiles: their rows must be zeros (poisoned buffers, one
    reduction over all of them)."""
    factors = upsample_stages(scale)
    f, params, skip, dout = tail_case(2, 64, 3, 5, factors)
    ref_out, ref_grads = run_tail(f, params, skip, dout, factors, "torch")
    with modelled_sm_count(sms), modelled_arch(90):
        cast = [t.float() for t in (f, *params, skip, dout)]
        out, grads = run_tail(cast[0], cast[1:-2], cast[-2], cast[-1], factors, "triton")
    assert_close_to_reference(out, ref_out, torch.float32, "out", precision="tail.fwd")
    k = len(factors)
    names = ["f"] + [f"up_weight{i}" for i in range(k)] + [f"up_bias{i}" for i in range(k)]
    names += ["rgb_weight", "rgb_bias", "skip"]
    for name, g, ref in zip(names, grads, ref_grads, strict=True):
        assert g.dtype == torch.float32, name
        assert_close_to_reference(g, ref, torch.float32, f"d{name}", precision="tail.bwd")


@pytest.mark.parametrize(("factors", "image"), [((2, 2), False), ((3,), False), ((2, 2), True)],
                         ids=["x4", "x3", "x4-image"])  # fmt: skip
def test_opcheck_whole_tail(factors, image):
    """x4 on contiguous features, x3 on a non-contiguous view; x4 with the bilinear skip of
    an image that needs a gradient."""
    f, params, skip, _ = tail_case(1, 16, 2, 3, factors)
    f = f.float()
    if factors == (3,):
        f = f.transpose(2, 3).contiguous().transpose(2, 3)
    skip, img = skip.float(), None
    if image:
        skip, img = None, torch.rand(1, 3, 2, 3, requires_grad=True)
    args = (f.requires_grad_(), [p.float().requires_grad_() for p in params], skip, img,
            list(factors))  # fmt: skip
    torch.library.opcheck(torch.ops.ssiu.tail_fwd.default, args)


def test_backward_is_deterministic():
    factors = (2, 2)
    f, params, skip, dout = (t.float() if torch.is_tensor(t) else [p.float() for p in t]
                             for t in tail_case(1, 16, 3, 5, factors))  # fmt: skip
    runs = [run_tail(f, params, skip, dout, factors, "triton")[1] for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("factors", "h", "w", "dtype"),
    [((2,), 2, 37, torch.float32), ((2, 2), 2, 9, torch.float32), ((2,), 2, 37, torch.float16)],
    ids=["x2", "x4", "x2-fp16"],
)
def test_3x3_fused_into_the_last_stage(factors, h, w, dtype):
    """The last x2 stage's kernels run the final 3x3 (its adjoint in the backward, and in
    16-bit the forward too): rows of several tiles (the 3x3's column taps cross tile
    edges: 16-pixel tiles backward, 32 in the 16-bit forward), reflect borders, a strided
    output gradient; every gradient against float64. The stage's output (the 3x3's input,
    C channels at full resolution) is not saved for the backward."""
    f, params, skip, dout = tail_case(1, 16, h, w, factors, seed=3)
    ref_out, ref_grads = run_tail(f, params, skip, dout, factors, "torch")
    dout_t = dout.to(dtype).transpose(2, 3).contiguous().transpose(2, 3)  # column stride != 1
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: shapes.append(t.shape) or t, lambda t: t
    ):
        cast = [t.to(dtype) for t in (f, *params, skip)]
        out, grads = run_tail(cast[0], cast[1:-1], cast[-1], dout_t, factors, "triton")
    full = (1, 16, out.shape[2], out.shape[3])
    assert full not in shapes
    assert_close_to_reference(out, ref_out, dtype, "out", precision="tail.fwd")
    for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close_to_reference(g, ref, dtype, f"grad {i}", precision="tail.bwd")

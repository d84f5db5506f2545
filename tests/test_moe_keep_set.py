"""MoE-FS keep set: the forward saves its top-k selection, the backward uses it bit for bit.

The backward recomputes p from the experts, but with another dot precision and tile
shape than the forward on a GPU, so a near tie could flip if it reselected; it must take
the forward's keep set. The launchers are called directly (`kernels.moe`), through the
Triton interpreter, fp32, against float64 references.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssiu.kernels import moe as moe_kernels
from ssiu.kernels.partials import split_flat

from ssiu.ops.moe import MoEParams, moe_gate_weights
from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter

NAMES = ("w1", "b1", "w2", "b2", "w3", "b3", "fuse_weight", "fuse_bias")  # PACKED_ORDER


def draw(n, c, h, w):
    """experts, residual, dout (N, C, H, W) and params (flat op order: W1, W2, W3, b1, b2,
    b3, W_fuse, b_fuse), float64 values exact in fp32; gates scaled so top-k selects."""
    rnd = lambda *shape, s=1.0: (torch.randn(*shape, dtype=torch.float64) * s).float().double()
    experts = [rnd(n, c, h, w) for _ in range(3)]
    gates = [rnd(c, c, 1, 1, s=2 * c**-0.5) for _ in range(3)]
    params = [*gates, *(rnd(c) for _ in range(3)), rnd(c, c, 1, 1, s=c**-0.5), rnd(c, s=0.2)]
    return experts, rnd(n, c, h, w), rnd(n, c, h, w), params


def gate_softmax(experts, params):
    """p (3, N, C, H, W) of the flat op-order params."""
    return moe_gate_weights(experts, MoEParams(tuple(params[0:3]), tuple(params[3:6]), *params[6:]))


def reference_selection(p, topk):
    """Keep bits (uint8) of the float64 p, ties kept, and the gap between the k-th and the
    (k+1)-th largest p (how far each element is from a tie that could flip)."""
    ranked = p.sort(0, descending=True).values
    kept = p >= ranked[topk - 1]
    bits = sum(kept[i].to(torch.uint8) << i for i in range(3))
    return bits, ranked[topk - 1] - ranked[topk]


def reference_with_keep(experts, params, keep, residual, dout):
    """out and the gradients (d e1, d e2, d e3, then PACKED_ORDER) of MoE-FS with the keep
    set fixed to `keep`: q = p * keep, m = sum q e, out = fuse(m) + m + residual."""
    experts = [e.detach().requires_grad_() for e in experts]
    params = [t.detach().requires_grad_() for t in params]
    bits = torch.stack([(keep >> i) & 1 for i in range(3)]).double()
    mixed = (gate_softmax(experts, params) * bits * torch.stack(experts)).sum(0)
    out = F.conv2d(mixed, params[6], params[7]) + mixed + residual
    packed = [params[i] for i in moe_kernels.PACKED_ORDER]
    return out, torch.autograd.grad(out, experts + packed, dout)


def launch(experts, params, residual, topk):
    """The fp32 forward launcher: (out, w_lo, keep)."""
    f32 = lambda ts: [t.float() for t in ts]
    gate_w, gate_b, fuse = f32(params[0:3]), f32(params[3:6]), f32(params[6:8])
    return moe_kernels.moe_fs_fwd(f32(experts), gate_w, gate_b, *fuse, topk=topk,
                                  residual=residual.float())  # fmt: skip


def launch_bwd(dout, experts, params, topk, w_lo, keep):
    f32 = lambda ts: [t.float() for t in ts]
    gate_w, gate_b, fuse = f32(params[0:3]), f32(params[3:6]), f32(params[6:8])
    return moe_kernels.moe_fs_bwd(dout.float(), f32(experts), gate_w, gate_b, *fuse, topk=topk,
                                  w_lo=w_lo, keep=keep)  # fmt: skip


def move_selection(keep, topk, count, generator):
    """A copy of keep with the selection moved at `count` random (channel, pixel)s: one
    kept expert swapped for one that was not (the count of kept experts stays k)."""
    altered = keep.clone().view(-1)
    where = torch.randperm(altered.numel(), generator=generator)[:count]
    for idx in where.tolist():
        bits = int(altered[idx])
        kept = [i for i in range(3) if bits >> i & 1]
        dropped = [i for i in range(3) if not bits >> i & 1]
        if not dropped:  # a tie kept all three: keep only the first topk
            altered[idx] = (1 << topk) - 1
            continue
        altered[idx] = bits & ~(1 << kept[0]) | (1 << dropped[-1])
    return altered.view_as(keep)


@pytest.mark.parametrize("topk", [1, 2])
@pytest.mark.parametrize("shape", [(2, 16, 5, 7), (1, 64, 3, 5)])
def test_backward_uses_the_given_keep_set(shape, topk):
    """Gradients for a keep set that is NOT the one p selects (moved at a few channels and
    pixels) match the float64 reference with that same fixed set: a backward that
    reselected from its recomputed p would take the other experts there."""
    experts, residual, dout, params = draw(*shape)
    _, w_lo, keep = launch(experts, params, residual, topk)
    altered = move_selection(keep, topk, 12, torch.Generator().manual_seed(1))
    assert (altered != keep).sum() == 12
    de1, de2, de3, flat = launch_bwd(dout, experts, params, topk, w_lo, altered)
    _, ref_grads = reference_with_keep(experts, params, altered, residual, dout)
    pieces = split_flat(flat, ref_grads[3:])
    got = [de1, de2, de3, *pieces]
    for name, g, ref in zip(("e1", "e2", "e3", *NAMES), got, ref_grads, strict=True):
        assert_close_to_reference(g, ref, torch.float32, f"d{name}", precision="moe_fs.bwd")


@pytest.mark.parametrize("topk", [1, 2])
def test_forward_saves_the_reference_selection(topk):
    """The saved keep set is the float64 reference's top-k wherever p is not within
    rounding of a tie (nearly every element), and out is the reference's."""
    experts, residual, _, params = draw(2, 16, 6, 9)
    out, _, keep = launch(experts, params, residual, topk)
    assert keep.dtype == torch.uint8 and keep.shape == experts[0].shape and keep.is_contiguous()
    bits, gap = reference_selection(gate_softmax(experts, params), topk)
    clear = gap > 1e-5  # fp32 p is off by ~1e-7: these cannot flip
    assert clear.float().mean() > 0.99
    assert torch.equal(keep[clear], bits[clear])
    assert int(keep.max()) < 8 and (keep != 0).all()
    ref_out, _ = reference_with_keep(experts, params, bits, residual, torch.zeros_like(residual))
    assert_close_to_reference(out, ref_out, torch.float32, "out", precision="moe_fs.fwd")


def test_topk3_saves_no_keep_set():
    experts, residual, _, params = draw(1, 16, 3, 5)
    _, _, keep = launch(experts, params, residual, 3)
    assert keep.numel() == 0 and keep.dtype == torch.uint8


@pytest.mark.parametrize("topk", [1, 3])
def test_op_returns_and_fakes_the_keep_set(topk):
    """The custom op's third output is the keep set (0 elements at topk = 3), non-
    differentiable, with a fake of the same shape and dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import ssiu.ops.fused_moe  # noqa: F401  (registers the ssiu:: custom ops)

    experts, residual, _, params = draw(1, 16, 3, 5)
    experts, params = [e.float() for e in experts], [p.float() for p in params]
    residual = residual.float()
    op = torch.ops.ssiu.moe_fs_fwd.default
    real = op(experts, residual, params, topk)
    with FakeTensorMode() as mode:
        fakes = lambda ts: [mode.from_tensor(t) for t in ts]
        fake = op(fakes(experts), mode.from_tensor(residual), fakes(params), topk)
    for r, f in zip(real, fake, strict=True):
        assert (r.shape, r.dtype) == (f.shape, f.dtype)
    assert real[2].dtype == torch.uint8 and real[2].numel() == (0 if topk == 3 else 16 * 15)

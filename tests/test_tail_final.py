"""The fused final layer of the tail (ssiu::tail_fwd / _bwd with no upsampling stage:
reflect 3x3 C -> 3 + bias + skip), the row-tiled upsampling stages at widths spanning
several tiles, C = 64, and the packed weight-gradient reduction (ssiu.kernels.partials),
against float64 references.

fp32 through the Triton interpreter (dots exact there); outputs NaN-poisoned (conftest).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ssiu.kernels.partials import split_flat, sum_partials

import ssiu.ops.fused_moe  # noqa: F401  (registers the ssiu:: custom ops)
import ssiu.ops.fused_tail  # noqa: F401
from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter


def rgb_reference(f, w, b, skip):
    out = F.conv2d(F.pad(f, (1, 1, 1, 1), mode="reflect"), w, b)
    return out if skip is None else out + skip


def rgb_case(n, c, h, w, *, skip=True, seed=0):
    """f, weight, bias, skip (or None), dout: float64 values exact in fp32."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().double()
    f = rnd(n, c, h, w)
    weight = rnd(3, c, 3, 3) * (9 * c) ** -0.5
    return f, weight, rnd(3), rnd(n, 3, h, w) if skip else None, rnd(n, 3, h, w)


def check_rgb(f, weight, bias, skip, dout, layout=lambda t: t):
    leaves = [f, weight, bias] + ([skip] if skip is not None else [])
    ref_leaves = [t.detach().requires_grad_() for t in leaves]
    ref = rgb_reference(*ref_leaves[:3], ref_leaves[3] if skip is not None else None)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    ours = [layout(t.float()).detach().requires_grad_() for t in leaves]
    out = torch.ops.ssiu.tail_fwd(ours[0], ours[1:3], ours[3] if skip is not None else None, None,
                                  [])  # fmt: skip
    out = out[0]
    grads = torch.autograd.grad(out, ours, dout.float())
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_close_to_reference(out, ref, torch.float32, "out")
    names = ["f", "weight", "bias", "skip"]
    for name, got, want in zip(names, grads, ref_grads, strict=False):
        assert got.dtype == torch.float32, name
        assert_close_to_reference(got, want, torch.float32, f"d{name}")


@pytest.mark.parametrize(
    "shape",
    [(2, 16, 5, 7), (1, 16, 2, 2), (1, 16, 3, 2), (1, 16, 4, 70)],
    ids=["odd", "2x2", "3x2", "two_tiles"],
)
def test_rgb_forward_and_all_gradients(shape):
    """Reflect borders on both axes, the smallest map, and the halo between row tiles."""
    check_rgb(*rgb_case(*shape))


def test_rgb_without_skip_and_c64():
    check_rgb(*rgb_case(1, 64, 3, 5, skip=False))


def test_rgb_strided_features():
    """A non-contiguous f (channels_last) takes the same kernels through its strides."""
    channels_last = lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    check_rgb(*rgb_case(1, 16, 4, 5), layout=channels_last)


def test_rgb_backward_is_deterministic():
    f, weight, bias, skip, dout = (t.float() for t in rgb_case(1, 16, 6, 9))
    runs = [torch.ops.ssiu.tail_bwd(dout, [f], [weight, bias], []) for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_rgb_opcheck():
    f, weight, bias, skip, _ = (t.float() for t in rgb_case(1, 16, 3, 4))
    args = (f.requires_grad_(), [weight.requires_grad_(), bias.requires_grad_()], skip, None, [])
    torch.library.opcheck(torch.ops.ssiu.tail_fwd.default, args)


@pytest.mark.parametrize(("factor", "width"), [(2, 37), (3, 19)])
def test_upshuffle_rows_wider_than_a_tile_c64(factor, width):
    """C = 64 stage on rows of several tiles (fp32 tiles are 16 pixels), odd width:
    output, dx, dweight, dbias against float64."""
    c = 64
    g = torch.Generator().manual_seed(1)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float().double()
    x, w, b = rnd(1, c, 2, width), rnd(c * factor**2, c, 1, 1) * c**-0.5, rnd(c * factor**2)
    dout = rnd(1, c, 2 * factor, width * factor)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    ref = F.gelu(F.pixel_shuffle(F.conv2d(ref_leaves[0], *ref_leaves[1:]), factor))
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    out, _ = torch.ops.ssiu.upshuffle_fwd(*leaves, factor)
    grads = torch.autograd.grad(out, leaves, dout.float())
    assert_close_to_reference(out, ref, torch.float32, "out")
    for name, got, want in zip(("dx", "dweight", "dbias"), grads, ref_grads, strict=True):
        assert_close_to_reference(got, want, torch.float32, name)


def test_skip_of_another_dtype_is_added_after_the_kernel():
    """A float64 skip (as autocast can hand a wider one): result promoted as in PyTorch."""
    from ssiu.ops.tail import TailParams, tail

    f, weight, bias, skip, _ = rgb_case(1, 16, 2, 3)
    c = 16
    up_w, up_b = torch.randn(4 * c, c, 1, 1) * c**-0.5, torch.randn(4 * c)
    params = TailParams((up_w,), (up_b,), weight.float(), bias.float())
    skip = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    out = tail(f.float(), params, factors=(2,), skip=skip, backend="triton")
    ref = tail(f.float(), params, factors=(2,), skip=skip, backend="torch")
    assert out.dtype == ref.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sum_partials_order_and_split():
    """Rows summed in order (same bits as a sequential fp32 loop), views per parameter."""
    part = torch.randn(7, 1500) * torch.logspace(-3, 3, 1500)
    out = sum_partials(part)
    want = torch.zeros(1500)
    for row in part:
        want += row
    assert torch.equal(out, want)
    like = (torch.empty(10, 100), torch.empty(500, dtype=torch.float64))
    a, b = split_flat(out, like)
    assert a.shape == (10, 100) and torch.equal(a.flatten(), out[:1000])
    assert b.dtype == torch.float64 and torch.equal(b, out[1000:].double())

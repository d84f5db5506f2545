"""The fused step's S1 and S2 in one launch (`msgm_fwd_pair`): the same bits as two
`msgm_fwd` calls.

Each half of the pair kernel runs `msgm_fwd_kernel`'s tile code with its own weights, so
anything but bit equality (outputs and the cast weight copies the backward reads) is a
bug in the pointer or program split. Shapes: several tiles per row with a partial last
tile, and a single-tile map (tile 0 is also the one that writes the weight copies).
"""

from __future__ import annotations

import pytest
import torch
from ssiu.kernels import msgm as msgm_kernels

from ssiu.ops import MSGMParams

pytestmark = pytest.mark.interpreter


def _params(c: int, gen: torch.Generator) -> MSGMParams:
    shapes = [(c, c, 1, 1), (c,), (c, c, 1, 1), (c,), (c, 1, 3, 3), (c,), (c, c, 1, 1), (c,),
              (c, c, 1, 1), (c,)]  # fmt: skip
    return MSGMParams(*(torch.randn(s, generator=gen) * 0.2 for s in shapes))


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((2, 16, 3, 37), torch.float32),
        ((1, 64, 2, 5), torch.float32),
        ((2, 32, 4, 33), torch.float16),
    ],  # fmt: skip
)
def test_pair_equals_two_single_launches(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    p1, p2 = _params(shape[1], gen), _params(shape[1], gen)
    u, w1, beta, w2 = msgm_kernels.msgm_fwd_pair(x, p1, p2, y)
    u_ref, w1_ref = msgm_kernels.msgm_fwd(x, p1, x, y)
    beta_ref, w2_ref = msgm_kernels.msgm_fwd(x, p2, None)
    for got, want in ((u, u_ref), (w1, w1_ref), (beta, beta_ref), (w2, w2_ref)):
        assert torch.equal(got, want)


def test_int64_index_variant_equals_int32(monkeypatch):
    """The INT64_INDEX build (picked for images of 2**31 elements or more) on a small map:
    the same bits as the int32 one (its strides are computed in int64 in the kernel)."""
    gen = torch.Generator().manual_seed(1)
    x, y = (torch.randn(1, 16, 3, 21, generator=gen) for _ in range(2))
    p1, p2 = _params(16, gen), _params(16, gen)
    int32 = msgm_kernels.msgm_fwd_pair(x, p1, p2, y)
    monkeypatch.setattr(msgm_kernels, "needs_int64_index", lambda *tensors: True)
    int64 = msgm_kernels.msgm_fwd_pair(x, p1, p2, y)
    for got, want in zip(int64, int32, strict=True):
        assert torch.equal(got, want)

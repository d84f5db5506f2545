"""The ESAM top-k selection (`_kth_largest` in ssiu.kernels.esam) against torch.topk.

A small test kernel runs the selection on [16, 128] score tiles whose first 100 columns
are the keys of a 10x10 window (the rest padding, -inf as in the attention kernels);
through the Triton interpreter on CPU.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from ssiu.kernels.esam import SELECT_ITERS, _kth_largest

pytestmark = pytest.mark.interpreter

ROWS, KEYS, KEYS_PAD = 16, 100, 128


@triton.jit
def _kth_kernel(s_ptr, out_ptr, topk, ROWS: tl.constexpr, KEYS: tl.constexpr,
                KEYS_PAD: tl.constexpr, ITERS: tl.constexpr):  # fmt: skip
    offs_r = tl.arange(0, ROWS)
    offs_j = tl.arange(0, KEYS_PAD)
    mask_j = offs_j < KEYS
    b_s = tl.load(s_ptr + offs_r[:, None] * KEYS + offs_j[None, :], mask=mask_j[None, :],
                  other=float("-inf"))  # [ROWS, KEYS_PAD]  # fmt: skip
    tl.store(out_ptr + offs_r, _kth_largest(b_s, mask_j, topk, ITERS))


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.full((ROWS,), float("nan"))
    _kth_kernel[(1,)](scores.contiguous(), out, k, ROWS=ROWS, KEYS=KEYS, KEYS_PAD=KEYS_PAD,
                      ITERS=SELECT_ITERS)  # fmt: skip
    return out


def check(scores: torch.Tensor, k: int) -> None:
    want = scores.topk(k, dim=1).values[:, -1]
    got = kth_largest(scores, k)
    assert torch.equal(got, want), (k, got, want)
    # The keep set (threshold semantics): every score >= the k-th, ties included.
    assert torch.equal(scores >= got[:, None], scores >= want[:, None])
    assert ((scores >= got[:, None]).sum(1) >= k).all()


@pytest.mark.parametrize("k", [1, 16, 50, 99])
def test_random_scores(k):
    check(torch.randn(ROWS, KEYS) * torch.logspace(-3, 3, ROWS)[:, None], k)


@pytest.mark.parametrize("k", [1, 16, 50, 99])
def test_many_ties(k):
    """Five distinct values per row: tens of keys tie at the threshold, all kept."""
    check(torch.randint(-2, 3, (ROWS, KEYS)).float() * 0.25, k)


@pytest.mark.parametrize("k", [1, 16, 50])
def test_signed_zeros_huge_and_tiny(k):
    """+-0, subnormals, +-3e38 and +-inf: the whole key range, no overflow in the bounds."""
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, float("inf"), -float("inf")])
    scores = special[torch.randint(0, len(special), (ROWS, KEYS))]
    scores[:, :10] = torch.randn(ROWS, 10)
    check(scores, k)


def test_clustered_scores_with_an_outlier():
    """99 keys within 1e-6 of each other and one far above."""
    scores = 1.0 + torch.randn(ROWS, KEYS) * 1e-6
    scores[:, 0] = 1e30
    for k in (2, 16, 50):
        check(scores, k)

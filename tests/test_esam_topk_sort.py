"""The attention kernels' top-k selections give bit-identical o, lse (with the saved
thresholds) and gradients: SELECT = "sort" (a GPU's forward), "bisect" (the
interpreter's forward; also a backward that recomputes the selection) and "saved" (the
backward keeping by the forward's thresholds, GPU and interpreter alike).

The launchers pick the mode with `topk_select`; here it is forced (monkeypatched) so the
sort runs through the Triton interpreter (seconds per [64, 128] tile, hence the smallest
input: one 8x8 block, one head of 16, fp32; ~11 s a case on one core). Outputs are
NaN-poisoned (conftest).
"""

from __future__ import annotations

import pytest
import torch
from ssiu.kernels import common
from ssiu.kernels import esam as K
from ssiu.kernels.registry import KERNEL_SPECS

pytestmark = pytest.mark.interpreter

C, HEADS, BLOCK, HALO = 16, 1, 8, 1
WIN, D = BLOCK + 2 * HALO, C // HEADS
RELEASED = dict(channels=64, heads=4, block=8, halo=1)


def attention(qkv, rel_h, rel_w, do, topk, fwd_select, bwd_select, monkeypatch):
    """(o, lse, dq, dK/dV windows, d rel partials) with the kernels in these modes."""
    modes = {"attn_fwd": fwd_select, "attn_bwd": bwd_select}
    monkeypatch.setattr(K, "topk_select", lambda kernel, device: modes[kernel])
    kw = dict(heads=HEADS, block=BLOCK, halo=HALO, topk=topk)
    o, lse = K.attn_fwd(qkv, rel_h, rel_w, **kw)
    part = torch.full((1, 2 * WIN * (D // 2)), float("nan"))
    dq, dkvw = K.attn_bwd(do, qkv, rel_h, rel_w, o, lse, part, **kw)
    return o, lse, dq, dkvw, part


def check_sort_equals_bisect(qkv, rel_h, rel_w, topk, monkeypatch):
    do = torch.randn(1, C, BLOCK, BLOCK)
    want = attention(qkv, rel_h, rel_w, do, topk, "bisect", "bisect", monkeypatch)
    for modes in (("sort", "saved"), ("bisect", "saved")):  # a GPU's, the interpreter's
        got = attention(qkv, rel_h, rel_w, do, topk, *modes, monkeypatch)
        names = ("o", "lse and thresholds", "dq", "dkv windows", "d rel")
        for name, w, g in zip(names, want, got, strict=True):
            assert not g.isnan().any(), name
            assert torch.equal(g, w), (name, modes, topk, (g - w).abs().max())
    lse, thr = want[1].view(HEADS, 2, -1).unbind(1)  # per head: log-sum-exps, thresholds
    assert torch.isfinite(lse).all() and torch.isfinite(thr).all()


def tied_scores():
    """q, k in {-1, 0, 1} / 2 and no relative position: scores take a few values (scale
    1/4 is exact), so tens of keys tie at every threshold."""
    qkv = torch.randint(-1, 2, (1, 3 * C, BLOCK, BLOCK)).float() / 2
    qkv[:, 2 * C :] = torch.randn(1, C, BLOCK, BLOCK)  # values
    zero = torch.zeros(WIN, D // 2)
    return qkv, zero, zero.clone()


def random_scores():
    return torch.randn(1, 3 * C, BLOCK, BLOCK), torch.randn(WIN, D // 2), torch.randn(WIN, D // 2)


@pytest.mark.parametrize("topk", [16, pytest.param(50, marks=pytest.mark.slow)])
def test_ties_at_the_threshold(topk, monkeypatch):
    qkv, rel_h, rel_w = tied_scores()
    s = (qkv[0, :C].flatten(1).T / 4) @ qkv[0, C : 2 * C].flatten(1)  # inner 8x8 keys only
    assert (s == s.topk(topk, dim=1).values[:, -1:]).sum(1).max() > 2  # ties do occur
    check_sort_equals_bisect(qkv, rel_h, rel_w, topk, monkeypatch)


@pytest.mark.parametrize("topk", [1, 99])
def test_random_scores_extreme_k(topk, monkeypatch):
    check_sort_equals_bisect(*random_scores(), topk, monkeypatch)


def test_launchers_pick_bisect_in_the_interpreter_and_the_gpu_modes_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # no GPU needed: device types
    assert K.topk_select("attn_fwd", cpu) == "bisect"
    assert K.topk_select("attn_fwd", cuda) == "sort"
    assert K.topk_select("attn_bwd", cpu) == K.topk_select("attn_bwd", cuda) == "saved"
    with common.modelled_arch(80):  # launches captured for check-kernels / profile
        assert K.topk_select("attn_fwd", cpu) == "sort"
    with common.modelled_sm_count(132):
        assert K.topk_select("attn_fwd", cpu) == "sort"
    assert K.topk_select("attn_fwd", cpu) == "bisect"


@pytest.mark.parametrize("kernel", ["attn_fwd", "attn_bwd"])
def test_registry_lists_every_top_k_config_a_gpu_runs(kernel):
    spec = next(s for s in KERNEL_SPECS if s.name == f"esam_{kernel}_kernel")
    for dtype in common.KERNEL_DTYPES:
        for select in {K.INTERPRETER_SELECT[kernel], K.GPU_SELECT[kernel]}:
            cfg = K.esam_config(kernel, **RELEASED, dtype=dtype, sparse=True, select=select)
            assert cfg.constexprs["SELECT"] == select
            assert common.DtypeConfig.of(cfg, dtype) in spec.configs, (kernel, dtype, select)
    dense = K.esam_config(kernel, **RELEASED, dtype=torch.float16, select="sort")
    assert dense.constexprs["SELECT"] == "none"  # only meaningful with SPARSE
    with pytest.raises(ValueError, match="select"):
        K.esam_config(kernel, **RELEASED, dtype=torch.float16, sparse=True, select="radix")


def test_backward_needs_the_forwards_thresholds():
    qkv, rel_h, rel_w = random_scores()
    o, lse = K.attn_fwd(qkv, rel_h, rel_w, heads=HEADS, block=BLOCK, halo=HALO, topk=0)
    part = torch.zeros(1, 2 * WIN * (D // 2))
    with pytest.raises(ValueError, match="lse"):
        K.attn_bwd(o, qkv, rel_h, rel_w, o, lse, part, heads=HEADS, block=BLOCK, halo=HALO,
                   topk=16)  # fmt: skip


def test_captured_top_k_step_launches_the_gpu_modes():
    """A training step with attn_topk, captured on fake tensors (a modelled H100): the
    attention launches carry the GPU's SELECT."""
    from ssiu import launch_capture as lc

    capture = lc.fake_step(train=True, batch=1, size=(16, 16), dtype=torch.float32,
                           channels=16, heads=1, steps=3, attn_topk=16)  # fmt: skip
    selects = {
        launch.name: launch.kwargs["SELECT"]
        for launch in capture.launches
        if launch.name.startswith("esam_attn")
    }
    assert selects == {f"esam_{k}_kernel": v for k, v in K.GPU_SELECT.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("topk", [1, 16, 99])
def test_gpu_sorting_forward_equals_bisecting(dtype, topk, monkeypatch):
    """The compiled GPU configs, released dims (C = 64, 4 heads), 4 x 4 blocks, ties from
    integer-valued q and k: the sorting forward's o and lse (and thresholds) equal the
    bisecting one's, and the backward by the saved thresholds equals one that bisects."""
    c, heads = 64, 4
    qkv = torch.randint(-2, 3, (2, 3 * c, 32, 32), device="cuda").to(dtype) / 2
    qkv[:, 2 * c :] = torch.randn(2, c, 32, 32, device="cuda").to(dtype)
    rel = [torch.randn(WIN, c // heads // 2, device="cuda").round() for _ in range(2)]
    kw = dict(heads=heads, block=BLOCK, halo=HALO, topk=topk)
    assert K.topk_select("attn_fwd", qkv.device) == "sort"
    got = K.attn_fwd(qkv, *rel, **kw)
    monkeypatch.setattr(K, "topk_select", lambda kernel, device: "bisect")
    want = K.attn_fwd(qkv, *rel, **kw)
    for name, g, w in zip(("o", "lse"), got, want, strict=True):
        assert torch.equal(g, w), (name, dtype, topk)
    do = torch.randn(qkv.shape[0], c, 32, 32, device="cuda").to(dtype)
    grads = {}
    for select in ("saved", "bisect"):
        monkeypatch.setattr(K, "topk_select", lambda kernel, device, s=select: s)
        part = torch.zeros(64, 2 * WIN * (c // heads // 2), device="cuda")  # 64 programs
        grads[select] = (*K.attn_bwd(do, qkv, *rel, *got, part, **kw), part)
    for g, w in zip(grads["saved"], grads["bisect"], strict=True):
        assert torch.equal(g, w), (dtype, topk)

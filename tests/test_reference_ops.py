"""The vectorised reference ops against plain loops written straight from SSIU.md."""

import pytest
import torch
import torch.nn.functional as F

from ssiu import ops
from ssiu.ops.esam import ESAMParams, esam_reference, halo_attention_reference
from ssiu.ops.moe import MoEParams, moe_fs_reference


def naive_halo_attention(q, k, v, rel_h, rel_w, heads, block, halo, topk):
    """One block, one head, one query at a time, as SSIU.md words it."""
    n, c, hb, wb = q.shape
    d, win = c // heads, block + 2 * halo
    kp = F.pad(k, (halo,) * 4)  # zero padding outside the image
    vp = F.pad(v, (halo,) * 4)
    out = torch.zeros_like(q)
    for b in range(n):
        for bi in range(hb // block):
            for bj in range(wb // block):
                for h in range(heads):
                    chans = slice(h * d, (h + 1) * d)
                    keys, values = [], []
                    for r in range(win):
                        for col in range(win):
                            y, x = bi * block + r, bj * block + col
                            rel = torch.cat([rel_h[r], rel_w[col]])
                            keys.append(kp[b, chans, y, x] + rel)
                            values.append(vp[b, chans, y, x])
                    keys, values = torch.stack(keys), torch.stack(values)  # (win^2, d)
                    for i in range(block):
                        for j in range(block):
                            y, x = bi * block + i, bj * block + j
                            s = keys @ (q[b, chans, y, x] * d**-0.5)
                            if topk is not None and topk < win * win:
                                kth = torch.sort(s, descending=True).values[topk - 1]
                                s = torch.where(s >= kth, s, torch.tensor(float("-inf")))
                            out[b, chans, y, x] = torch.softmax(s, 0) @ values
    return out


@pytest.mark.parametrize("topk", [None, 100, 50, 16, 1])
def test_halo_attention_matches_loops(topk):
    torch.manual_seed(0)
    heads, block, halo, c = 2, 4, 1, 8
    q, k, v = (torch.randn(2, c, 8, 12, dtype=torch.float64) for _ in range(3))
    rel_h = torch.randn(block + 2 * halo, c // heads // 2, dtype=torch.float64)
    rel_w = torch.randn_like(rel_h)
    topk_small = None if topk is None else min(topk, 36)
    got = halo_attention_reference(
        q, k, v, rel_h, rel_w, heads=heads, block=block, halo=halo, topk=topk_small
    )
    want = naive_halo_attention(q, k, v, rel_h, rel_w, heads, block, halo, topk_small)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_topk_keeps_ties_at_the_threshold():
    # Integer-valued q and k make exact ties likely; every tied key must be kept.
    torch.manual_seed(1)
    q = torch.randint(-1, 2, (1, 4, 4, 4)).double()
    k = torch.randint(-1, 2, (1, 4, 4, 4)).double()
    v = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    rel = torch.zeros(6, 1, dtype=torch.float64)
    got = halo_attention_reference(q, k, v, rel, rel, heads=2, block=4, halo=1, topk=3)
    want = naive_halo_attention(q, k, v, rel, rel, 2, 4, 1, 3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def esam_params(c, heads, block, halo, dtype=torch.float64):
    win, d = block + 2 * halo, c // heads
    return ESAMParams(
        torch.randn(3 * c, c, 1, 1, dtype=dtype) * c**-0.5,
        torch.randn(win, d // 2, dtype=dtype),
        torch.randn(win, d // 2, dtype=dtype),
        torch.randn(c, 1, 3, 3, dtype=dtype) / 3,
        torch.randn(c, dtype=dtype),
    )


def test_esam_pads_the_sampled_grid_with_reflect_and_crops():
    # H/2 = 6 and W/2 = 5 are not multiples of block 4: reflect-pad to 8x8, crop after.
    torch.manual_seed(2)
    c, heads, block, halo = 8, 2, 4, 1
    p = esam_params(c, heads, block, halo)
    v = torch.randn(1, c, 12, 10, dtype=torch.float64)
    got = esam_reference(v, p, heads=heads, block=block, halo=halo, topk=None, add_input=False)
    u = F.pad(F.max_pool2d(v, 2), (0, 3, 0, 2), mode="reflect")
    q, k, val = F.conv2d(u, p.qkv_weight).chunk(3, 1)
    o = naive_halo_attention(q, k, val, p.rel_h, p.rel_w, heads, block, halo, None)
    o = F.conv2d(F.pad(o, (1, 1, 1, 1), mode="reflect"), p.prop_weight, p.prop_bias, groups=c)
    o = F.interpolate(o, scale_factor=2, mode="bilinear", align_corners=True)[:, :, :12, :10]
    torch.testing.assert_close(got, o, rtol=1e-10, atol=1e-10)
    with_input = esam_reference(v, p, heads=heads, block=block, halo=halo, topk=None)
    torch.testing.assert_close(with_input, o + v, rtol=1e-10, atol=1e-10)


def naive_moe(experts, gate_w, gate_b, fuse_w, fuse_b, topk):
    n, c, h, w = experts[0].shape
    logits = [F.conv2d(e, wt, b) for e, wt, b in zip(experts, gate_w, gate_b, strict=True)]
    mixed = torch.zeros_like(experts[0])
    for b in range(n):
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    p = torch.softmax(torch.stack([lg[b, ch, y, x] for lg in logits]), 0)
                    kth = torch.sort(p, descending=True).values[topk - 1]
                    for i in range(3):
                        if p[i] >= kth:
                            mixed[b, ch, y, x] += p[i] * experts[i][b, ch, y, x]
    return F.conv2d(mixed, fuse_w, fuse_b) + mixed


@pytest.mark.parametrize("topk", [1, 2, 3])
def test_moe_matches_loops(topk):
    torch.manual_seed(3)
    c = 4
    experts = tuple(torch.randn(2, c, 3, 5, dtype=torch.float64) for _ in range(3))
    gw = tuple(torch.randn(c, c, 1, 1, dtype=torch.float64) for _ in range(3))
    gb = tuple(torch.randn(c, dtype=torch.float64) for _ in range(3))
    fw, fb = torch.randn(c, c, 1, 1, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
    got = moe_fs_reference(experts, MoEParams(gw, gb, fw, fb), topk=topk)
    torch.testing.assert_close(got, naive_moe(experts, gw, gb, fw, fb, topk))


def test_moe_top1_passes_gradient_to_the_gate():
    torch.manual_seed(4)
    c = 4
    experts = tuple(torch.randn(1, c, 4, 4) for _ in range(3))
    gw = tuple(torch.randn(c, c, 1, 1, requires_grad=True) for _ in range(3))
    gb = tuple(torch.randn(c, requires_grad=True) for _ in range(3))
    params = MoEParams(gw, gb, torch.randn(c, c, 1, 1), torch.randn(c))
    moe_fs_reference(experts, params, topk=1).sum().backward()
    assert all(w.grad.abs().sum() > 0 for w in gw)


def test_layer_norm_matches_torch_layer_norm():
    torch.manual_seed(5)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    want = F.layer_norm(x.permute(0, 2, 3, 1), (6,), w, b, eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(ops.layer_norm2d_reference(x, w, b), want)


def test_op_input_errors():
    x = torch.randn(1, 8, 6, 6)
    params = esam_params(8, 2, 4, 1, torch.float32)
    with pytest.raises(ValueError, match="even"):
        ops.esam(torch.randn(1, 8, 7, 6), params, heads=2, block=4)
    with pytest.raises(ValueError, match="attn_topk"):
        ops.esam(x, params, heads=2, block=4, topk=0)
    with pytest.raises(ValueError, match="rel_h"):
        ops.esam(x, params._replace(rel_h=torch.zeros(5, 2)), heads=2, block=4)
    with pytest.raises(ValueError, match="moe_topk"):
        ops.moe_fs((x, x, x), MoEParams((None,) * 3, (None,) * 3, None, None), topk=4)
    with pytest.raises(ValueError, match="3 experts"):
        ops.moe_fs((x, x), None)
    with pytest.raises(ValueError, match="backend"):
        ops.layer_norm2d(x, torch.ones(8), torch.zeros(8), backend="cuda")
    with pytest.raises(ValueError, match="weight"):
        ops.layer_norm2d(x, torch.ones(7), torch.zeros(8))

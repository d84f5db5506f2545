"""The reference network: sizes, shapes, options and input checks."""

import pytest
import torch
import torch.nn.functional as F

import ssiu
from ssiu.model import min_input_size

TINY = dict(channels=16, heads=2, steps=3)


@pytest.mark.parametrize("scale, count", [(2, 777_827), (3, 798_627), (4, 794_467)])
def test_parameter_count_is_the_released_one(scale, count):
    assert ssiu.count_parameters(ssiu.build(scale)) == count


def test_full_model_runs_on_odd_size_and_batch():
    torch.manual_seed(0)
    model = ssiu.build(4).eval()
    x = torch.rand(2, 3, 19, 13)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3, 76, 52)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("size", [(9, 9), (16, 16), (17, 30), (33, 10)])
def test_output_size_is_scale_times_input(scale, size):
    torch.manual_seed(0)
    model = ssiu.build(scale, **TINY).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, *size))
    assert out.shape == (1, 3, size[0] * scale, size[1] * scale)


def test_batch_items_are_independent():
    torch.manual_seed(0)
    model = ssiu.build(2, **TINY).eval()
    x = torch.rand(3, 3, 21, 18, dtype=torch.float64)
    model.double()
    with torch.no_grad():
        whole = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(whole, alone, rtol=1e-12, atol=1e-12)


def test_output_is_the_bilinear_skip_plus_the_tail():
    """out = tail(f) + bilinear(x): with the tail's last conv zeroed it is the bilinear
    upscale exactly (a wrong skip, scale or crop fails), and the untrained tail adds a
    correction of the image's own size, not one that swamps it."""
    torch.manual_seed(0)
    model = ssiu.build(2, **TINY).double().eval()
    x = torch.rand(1, 3, 16, 12, dtype=torch.float64)
    # The model reflect-pads to its multiple (16) before the upscale and crops after.
    x_p = F.pad(x, (0, 4, 0, 0), mode="reflect")
    skip = F.interpolate(x_p, scale_factor=2, mode="bilinear", align_corners=False)[..., :24]
    with torch.no_grad():
        out = model(x)
        model.tail.to_rgb.weight.zero_()
        model.tail.to_rgb.bias.zero_()
        bare = model(x)
    torch.testing.assert_close(bare, skip, rtol=0, atol=1e-12)
    correction = (out - skip).square().mean().sqrt()
    assert 1e-3 < correction < 3 * skip.square().mean().sqrt()


def test_attn_topk_at_or_above_window_equals_dense():
    torch.manual_seed(0)
    dense = ssiu.build(2, **TINY).double().eval()
    x = torch.rand(1, 3, 32, 24, dtype=torch.float64)
    with torch.no_grad():
        ref = dense(x)
        for k in (100, 1000):
            sparse = ssiu.build(2, attn_topk=k, **TINY).double().eval()
            sparse.load_state_dict(dense.state_dict())
            assert torch.equal(sparse(x), ref)
        sparse = ssiu.build(2, attn_topk=16, **TINY).double().eval()
        sparse.load_state_dict(dense.state_dict())
        assert not torch.allclose(sparse(x), ref)


# (attn_topk=1 is a hard argmax: its scores get no gradient, by design)
@pytest.mark.parametrize("attn_topk, moe_topk", [(None, 3), (16, 1), (2, 2)])
def test_gradients_reach_every_parameter(attn_topk, moe_topk):
    torch.manual_seed(0)
    model = ssiu.build(2, attn_topk=attn_topk, moe_topk=moe_topk, **TINY)
    model(torch.rand(2, 3, 16, 16)).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_expert_steps_are_the_last_of_each_third():
    assert ssiu.build(4, channels=16, heads=2).expert_steps() == [2, 5, 8]
    assert ssiu.build(4, channels=16, heads=2, steps=4).expert_steps() == [1, 2, 3]
    assert ssiu.build(4, channels=16, heads=2, steps=10).expert_steps() == [5, 8, 9]


def test_set_backend_keeps_state_dict_and_rejects_unknown():
    model = ssiu.build(2, **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for backend in ("auto", "triton", "torch"):
        assert model.set_backend(backend) is model
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.backend == "torch" for m in model.modules() if hasattr(m, "backend"))
    with pytest.raises(ValueError, match="backend"):
        model.set_backend("cuda")


def test_auto_backend_on_cpu_is_the_reference():
    torch.manual_seed(0)
    model = ssiu.build(2, **TINY).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(model.set_backend("auto")(x), ref)


@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.rand(1, 4, 16, 16), ValueError, "channels"),
        (torch.rand(3, 16, 16), ValueError, r"\(N, C, H, W\)"),
        (torch.randint(0, 255, (1, 3, 16, 16)), TypeError, "floating"),
        (torch.rand(1, 3, 8, 16), ValueError, "at least 9x9"),
        (torch.rand(1, 3, 16, 3), ValueError, "at least 9x9"),
    ],
)
def test_bad_input_is_a_clear_error(x, error, words):
    model = ssiu.build(2, **TINY)
    with pytest.raises(error, match=words):
        model(x)


def test_smallest_input_works():
    assert min_input_size() == 9
    model = ssiu.build(2, **TINY).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 9, 9)).shape == (1, 3, 18, 18)


def test_auto_falls_back_to_the_reference_where_the_kernels_cannot_run():
    from types import SimpleNamespace

    from ssiu.ops import resolve

    on_cuda = SimpleNamespace(is_cuda=True)  # resolve() only asks where the tensor lives
    assert resolve("auto", on_cuda) == "triton"
    assert resolve("auto", on_cuda, lambda: None) == "triton"
    assert resolve("auto", on_cuda, lambda: ValueError("C=48")) == "torch"
    assert resolve("auto", SimpleNamespace(is_cuda=False), lambda: None) == "torch"


def test_fused_ops_name_why_they_cannot_run():
    from ssiu.ops import fused, fused_esam, fused_moe, fused_tail

    odd = torch.zeros(1, 48, 4, 4)
    assert "power-of-two" in str(fused.msgm_unsupported(odd))
    assert isinstance(fused.layer_norm2d_unsupported(odd.double()), TypeError)
    assert fused.msgm_unsupported(torch.zeros(1, 64, 4, 4)) is None
    assert fused_esam.unsupported(odd, 4, 8, 1) is not None
    assert fused_moe.unsupported((odd, odd, odd), None) is not None
    assert fused_tail.unsupported(torch.zeros(1, 64, 4, 4), (2, 2)) is None
    assert fused_tail.unsupported(torch.zeros(1, 64, 4, 4), (5,)) is not None

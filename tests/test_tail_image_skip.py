"""The tail's bilinear skip computed in its RGB epilogue (`ops.tail(..., image=x)`): the
input image upsampled (align_corners=False) at each output pixel and added in fp32,
against the float64 reference (F.interpolate + add), forward and every gradient, the
image's included. Also the autocast build (16-bit features, fp32 image: an fp32 output
whose fp32 gradient the backward kernels read as it is) and the model's launches.

Through the Triton interpreter (fp32, fp16); launcher outputs NaN-poisoned (conftest).
"""

from __future__ import annotations

import pytest
import torch
from test_fused_tail import as_params, make_params

import ssiu.ops.fused_tail  # noqa: F401  (registers the ssiu:: custom ops)
from ssiu.launch_capture import fake_step
from ssiu.modules import upsample_stages
from ssiu.ops.tail import tail
from ssiu.testing import assert_close_to_reference

pytestmark = pytest.mark.interpreter


def case(n, c, h, w, factors, seed=0):
    """f, params, image (values in [0, 1), as an image), dout: float64, exact in fp16."""
    torch.manual_seed(seed)
    s = 1
    for r in factors:
        s *= r
    rnd = lambda t: t.half().double()
    f = rnd(torch.randn(n, c, h, w, dtype=torch.float64))
    params = [rnd(p) for p in make_params(c, factors)]
    image = rnd(torch.rand(n, 3, h, w, dtype=torch.float64))
    return f, params, image, rnd(torch.randn(n, 3, h * s, w * s, dtype=torch.float64))


def run(f, params, image, dout, factors, backend):
    leaves = [t.detach().requires_grad_() for t in (f, *params, image)]
    p = as_params(leaves[1:-1], len(factors))
    out = tail(leaves[0], p, factors=factors, image=leaves[-1], backend=backend)
    return out, torch.autograd.grad(out, leaves, dout.to(out.dtype))


def check(factors, dtype, image_dtype, shape=(2, 16, 5, 3), layout=lambda t: t, device="cpu"):
    f, params, image, dout = (t.to(device) if torch.is_tensor(t) else [p.to(device) for p in t]
                              for t in case(*shape, factors))  # fmt: skip
    ref_out, ref_grads = run(f, params, image, dout, factors, "torch")
    out, grads = run(f.to(dtype), [p.to(dtype) for p in params], layout(image.to(image_dtype)),
                     dout, factors, "triton")  # fmt: skip
    assert out.dtype == torch.promote_types(dtype, image_dtype)  # as conv(f) + skip gives
    assert_close_to_reference(out, ref_out, dtype, "out", precision="tail.fwd")
    k = len(factors)
    names = ["f"] + [f"up_weight{i}" for i in range(k)] + [f"up_bias{i}" for i in range(k)]
    names += ["rgb_weight", "rgb_bias", "image"]
    for name, g, ref in zip(names, grads, ref_grads, strict=True):
        assert_close_to_reference(g, ref, dtype, f"d{name}", precision="tail.bwd")


@pytest.mark.parametrize("scale", [1, 2, 3, 4])
def test_fp32_image_skip_forward_and_all_gradients(scale):
    """Scale 1: the 3x3 alone (its own kernel; the skip is the image itself); 3: the x3
    stage then the 3x3 kernel; 2 and 4: the 3x3 inside the last x2 stage's kernels."""
    factors = upsample_stages(scale) if scale > 1 else ()
    check(factors, torch.float32, torch.float32)


@pytest.mark.parametrize("scale", [2, 3])
def test_fp16_features_fp32_image_autocast_build(scale):
    """The training build under autocast: 16-bit features, an fp32 image, an fp32 output
    and output gradient (read by the backward kernels without a cast)."""
    check(upsample_stages(scale), torch.float16, torch.float32)


def test_fp16_features_fp16_image():
    check(upsample_stages(2), torch.float16, torch.float16)


def test_c64_x4_strided_image():
    """Released width, x4, the image a channels-last view with odd sizes."""
    check(upsample_stages(4), torch.float32, torch.float32, shape=(1, 64, 3, 5),
          layout=lambda t: t.to(memory_format=torch.channels_last))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_gpu_image_skip(dtype, scale):
    """Compiled kernels, C = 64, odd sizes; an fp32 image (autocast's case) for every dtype."""
    check(upsample_stages(scale), dtype, torch.float32, shape=(2, 64, 19, 23), device="cuda")


def test_other_image_dtype_is_upsampled_in_pytorch():
    """A float64 image with fp32 features: upsampled and added outside the kernels, the
    result promoted to float64 as in the reference."""
    f, params, image, _ = case(1, 16, 3, 4, (2,))
    p = as_params([t.float() for t in params], 1)
    out = tail(f.float(), p, factors=(2,), image=image, backend="triton")
    ref = tail(f.float(), p, factors=(2,), image=image, backend="torch")
    assert out.dtype == ref.dtype == torch.float64
    assert_close_to_reference(out, ref, torch.float32, "out", precision="tail.fwd")


def test_bad_skip_arguments():
    f, params, image, _ = case(1, 16, 3, 4, (2,))
    p = as_params(params, 1)
    with pytest.raises(ValueError, match="not both"):
        tail(f, p, factors=(2,), skip=torch.zeros(1, 3, 6, 8, dtype=f.dtype), image=image)
    with pytest.raises(ValueError, match=r"image has shape \(1, 3, 6, 8\)"):
        tail(f, p, factors=(2,), image=torch.zeros(1, 3, 6, 8, dtype=f.dtype))
    with pytest.raises(ValueError, match="image has 1 channels"):
        tail(f, p, factors=(2,), image=image[:, :1])


def test_model_runs_no_pytorch_upsampling_or_skip_add():
    """The x4 training step under bf16 autocast: the bilinear skip, its fp32 add and the
    cast of the output gradient are gone from the PyTorch ops (static capture)."""
    capture = fake_step(train=True, batch=2, size=(16, 16))
    names = [op.name for op in capture.ops]
    assert "aten.upsample_bilinear2d.default" not in names
    tail_launches = [launch for launch in capture.launches if launch.op == "ssiu::tail_fwd"]
    assert tail_launches and all(launch.writes for launch in tail_launches)
    # The one add left outside the custom ops is y's gradient sum (the body's and MoE-FS's
    # residual); the casts are the head's (input, weights, weight gradients): none as
    # large as the 3-channel output's gradient in bf16 (the cast before the tail).
    assert names.count("aten.add.Tensor") == 1
    dout_bf16 = 2 * 3 * 64 * 64 * 2
    assert all(op.writes < dout_bf16 for op in capture.ops if op.name == "aten._to_copy.default")

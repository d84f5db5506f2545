"""The GPU precision paths estimated on CPU: are the tolerances for TF32 and bf16 right?

The interpreter's fp32 dots are exact, so CPU parity runs never see the TF32 rounding of
the GPU kernels. Here the float64 reference runs with its dense (1x1) convolutions'
operands rounded as the GPU kernels' dots round them (`ssiu.testing.DotRounding`: 3xTF32
in the forward, TF32 in the backward; bf16 everywhere for bf16), on unit-scale inputs
at C = 64. That estimate must sit well inside the tolerance of its mode (a margin of 2),
and a planted bug of realistic size must not (the tolerance is not vacuous).
"""

from __future__ import annotations

import pytest
import torch

import ssiu
from ssiu.modules import SSReMStep
from ssiu.ops import MSGMParams, msgm_reference
from ssiu.testing import DotRounding, error_ratios

C = 64


def msgm_inputs(dtype=torch.float64, n=2, h=16, w=16):
    """x, params, residual, dout at unit scale, rounded to dtype, held in float64."""
    rnd = lambda t: t.to(dtype).double()
    shapes = [(C, C, 1, 1), (C,), (C, C, 1, 1), (C,), (C, 1, 3, 3), (C,), (C, C, 1, 1), (C,),
              (C, C, 1, 1), (C,)]  # fmt: skip
    params = []
    for shape in shapes:
        fan_in = 9 if shape[1:] == (1, 3, 3) else C
        scale = fan_in**-0.5 if len(shape) == 4 else 0.2
        params.append(rnd(torch.randn(shape, dtype=torch.float64) * scale))
    x, res, dout = (rnd(torch.randn(n, C, h, w, dtype=torch.float64)) for _ in range(3))
    return x, params, res, dout


def msgm_run(x, params, res, dout, rounding=None, out_bias=True):
    """Output and the gradients of x and every parameter, float64 (rounded dots if asked)."""
    leaves = [t.detach().requires_grad_() for t in (x, *params)]
    p = list(leaves[1:])
    if not out_bias:  # planted bug: the output 1x1 loses its bias
        p[9] = torch.zeros_like(p[9])
    with rounding or DotRounding("ieee"):
        out = msgm_reference(leaves[0], MSGMParams(*p)) + res
        grads = torch.autograd.grad(out, leaves, dout, allow_unused=not out_bias)
    return out, grads


def worst(pairs, mode):
    """The largest of error_ratios over (actual, reference) pairs."""
    return max(max(error_ratios(a, r, mode)) for a, r in pairs)


def test_tf32_rounding_is_what_tf32_does():
    x = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-10 + 2**-12, 2**-30 * (1 + 2**-11)],
                     dtype=torch.float64)  # fmt: skip
    from ssiu.testing import round_tf32

    want = torch.tensor([1.0, 1 + 2**-9, 1 + 2**-10, 2**-30], dtype=torch.float64)
    assert torch.equal(round_tf32(x), want)  # ties to even, exact below that


def test_msgm_fp32_gpu_paths_hold_with_margin():
    """3xTF32 forward (mode tf32x3) and TF32 backward (mode tf32) at C = 64."""
    x, params, res, dout = msgm_inputs()
    ref_out, ref_grads = msgm_run(x, params, res, dout)
    out, grads = msgm_run(x, params, res, dout, DotRounding("tf32x3", "tf32"))
    assert worst([(out, ref_out)], "tf32x3") <= 0.5
    assert worst(zip(grads, ref_grads, strict=True), "tf32") <= 0.5
    # and the estimate is not trivially exact: TF32 really moves the gradients
    assert worst(zip(grads, ref_grads, strict=True), "ieee") > 1


def test_msgm_bf16_holds_with_margin():
    """bf16 inputs, bf16 dot operands forward and backward, bf16 results."""
    x, params, res, dout = msgm_inputs(torch.bfloat16)
    ref_out, ref_grads = msgm_run(x, params, res, dout)
    out, grads = msgm_run(x, params, res, dout, DotRounding("bf16"))
    bf = lambda t: t.bfloat16().double()
    assert worst([(bf(out), ref_out)], "bf16") <= 0.5
    assert worst([(bf(g), r) for g, r in zip(grads, ref_grads, strict=True)], "bf16") <= 0.5


@pytest.mark.parametrize("rounding, mode", [(("tf32x3", "tf32"), "tf32"), (("bf16",), "bf16")])
def test_planted_bug_fails_under_emulation(rounding, mode):
    """A dropped output bias (std 0.2 on O(1) outputs) fails the mode's bound on the
    output and on dx even with the GPU's rounding: the tolerances are not vacuous."""
    x, params, res, dout = msgm_inputs(torch.bfloat16 if mode == "bf16" else torch.float32)
    ref_out, _ = msgm_run(x, params, res, dout)
    out, _ = msgm_run(x, params, res, dout, DotRounding(*rounding), out_bias=False)
    assert worst([(out, ref_out)], mode) > 2


def step_run(step, a, y, dout, rounding=None):
    leaves = [a.detach().requires_grad_(), y.detach().requires_grad_(), *step.parameters()]
    with rounding or DotRounding("ieee"):
        out = step(*leaves[:2])
        grads = torch.autograd.grad(out, leaves, dout)
    return out, grads


@pytest.fixture
def step_and_inputs():
    """A released-width SS-ReM step (C = 64, 4 heads, block 8, halo 1) in float64, with its
    LayerNorm's affine terms perturbed, and unit-scale inputs."""
    step = SSReMStep(ssiu.SSIUConfig(scale=2, channels=C, heads=4, steps=3)).double()
    with torch.no_grad():
        step.norm.weight.add_(0.2 * torch.randn_like(step.norm.weight))
        step.norm.bias.add_(0.2 * torch.randn_like(step.norm.bias))
    a, y, dout = (torch.randn(1, C, 16, 16, dtype=torch.float64) for _ in range(3))
    return step, a, y, dout


def test_whole_step_fp32_gpu_paths_hold_with_margin(step_and_inputs):
    step, a, y, dout = step_and_inputs
    ref_out, ref_grads = step_run(step, a, y, dout)
    out, grads = step_run(step, a, y, dout, DotRounding("tf32x3", "tf32"))
    assert worst([(out, ref_out)], "tf32x3") <= 0.5
    assert worst(zip(grads, ref_grads, strict=True), "tf32") <= 0.5


def test_whole_step_ln_variance_bug_fails_tf32(step_and_inputs):
    """The LayerNorm with the unbiased variance (C - 1 = 63 in the denominator) scales
    y - bias by sqrt(63/64): 0.8%. Under TF32 rounding the step's output must still fail
    the tf32 bound (it would pass bf16's, which a GPU bf16 run cannot catch)."""
    step, a, y, dout = step_and_inputs
    ref_out, _ = step_run(step, a, y, dout)
    with torch.no_grad():
        step.norm.weight.mul_((63 / 64) ** 0.5)
    out, _ = step_run(step, a, y, dout, DotRounding("tf32x3", "tf32"))
    assert worst([(out, ref_out)], "tf32") > 1


def test_single_tf32_forward_would_fail_the_tf32x3_bound():
    """A forward compiled with one TF32 product instead of 3xTF32 (a wrong DOT_PRECISION,
    invisible to the exact interpreter) is 3e-4 off: the tf32x3 bound that a GPU fp32 run
    applies catches it."""
    x, params, res, dout = msgm_inputs(n=1)
    ref_out, _ = msgm_run(x, params, res, dout)
    out, _ = msgm_run(x, params, res, dout, DotRounding("tf32"))
    assert worst([(out, ref_out)], "tf32x3") > 2

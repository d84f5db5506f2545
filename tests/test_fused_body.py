"""The fused SS-ReM body (`ops.ssrem_body`, backend "triton": every step in one op, the
gradient sums over the steps in the kernels) against the float64 reference, forward and
every gradient, through the Triton interpreter."""

from __future__ import annotations

import pytest
import torch
from test_fused_step import make_step

import ssiu
from ssiu import ops, training
from ssiu.ops import fused_body, fused_step
from ssiu.testing import assert_close_to_reference, tolerance

pytestmark = pytest.mark.interpreter


def run_body(steps, y, douts, backend, stepwise=False):
    """Outputs of the body and the gradients of y and every parameter, where douts[t]
    is the gradient of step t's output (None: that output unused, as a non-expert's).
    stepwise: one step op after the other, autograd summing the gradients."""
    y = y.clone().requires_grad_()
    params = [step.params() for step in steps]
    geometry = steps[0].geometry()
    if stepwise:
        outs, a = [], y
        for p in params:
            a = ops.ssrem_step(a, y, p, geometry, backend=backend)
            outs.append(a)
    else:
        outs = ops.ssrem_body(y, params, geometry, backend=backend)
    used = [t for t, d in enumerate(douts) if d is not None]
    leaves = [y] + [p for step in steps for p in step.parameters()]
    grads = torch.autograd.grad([outs[t] for t in used], leaves, [douts[t] for t in used])
    names = ["y"] + [f"{s}.{n}" for s, step in enumerate(steps) for n, _ in step.named_parameters()]
    return outs, dict(zip(names, grads, strict=True))


def check_body(n, channels, heads, block, topk, shape, dtype, used):
    torch.manual_seed(0)
    reference = [make_step(channels, heads, block, topk) for _ in range(n)]
    fused = [make_step(channels, heads, block, topk).to(dtype) for _ in range(n)]
    for f, r in zip(fused, reference, strict=True):
        f.load_state_dict(r.state_dict())
    y = torch.randn(shape, dtype=torch.float64)
    douts = [torch.randn(shape, dtype=torch.float64) if t in used else None for t in range(n)]
    ref_outs, ref_grads = run_body(reference, y, douts, "torch")
    low = [d.to(dtype) if d is not None else None for d in douts]
    outs, grads = run_body(fused, y.to(dtype), low, "triton")
    # Each step chains six ops, each within its own bound (test_fused_step's 2x the
    # single-op bound); n steps in a row add theirs.
    tol = tolerance(dtype)
    loose = dict(atol=2 * n * tol.floor * tol.u, rtol=2 * n * tol.elem * tol.u)
    for t, (out, ref) in enumerate(zip(outs, ref_outs, strict=True)):
        assert_close_to_reference(out, ref, dtype, f"a_{t + 1}", **loose)
    for name, g in grads.items():
        assert g.dtype == dtype
        assert_close_to_reference(g, ref_grads[name], dtype, f"d{name}", **loose)


@pytest.mark.parametrize(
    "used",
    [
        pytest.param({0, 1, 2}, marks=pytest.mark.slow),
        pytest.param({2}, marks=pytest.mark.slow),
        {0, 2},
    ],
    ids=["every_output", "last_only", "expert_pattern"],
)
def test_fp32_three_steps(used):
    """Gradients enter at every output, at the last only, or at the first and last (an
    expert's gradient added in the next step's LayerNorm epilogue)."""
    check_body(3, 32, 2, 4, None, (1, 32, 8, 10), torch.float32, used)


def test_one_step_sums_its_own_dy():
    """With one step its d y starts the sum and goes into its own input gradient."""
    check_body(1, 32, 2, 4, 10, (1, 32, 8, 10), torch.float32, {0})


def test_fp16_two_steps_as_the_steps_one_by_one():
    """fp16 against the fused steps run one by one (each proven against float64 by
    test_fused_step): only where the gradient sums round differs, so the single-op
    bound holds. Against float64 both are 1.3% off in d y (norm) after two steps."""
    torch.manual_seed(0)
    steps = [make_step(32, 2, 4, 10).half() for _ in range(2)]
    shape = (1, 32, 8, 10)
    y = torch.randn(shape, dtype=torch.float16)
    douts = [torch.randn(shape, dtype=torch.float16) for _ in steps]
    outs, grads = run_body(steps, y, douts, "triton")
    ref_outs, ref_grads = run_body(steps, y, douts, "triton", stepwise=True)
    for t, (out, ref) in enumerate(zip(outs, ref_outs, strict=True)):
        torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=f"a_{t + 1}")
    for name, g in grads.items():
        assert_close_to_reference(g, ref_grads[name].double(), torch.float16, f"d{name}")


def test_c64_production_geometry():
    """C = 64, 4 heads, block 8, halo 1 (the released step), two steps."""
    check_body(2, 64, 4, 8, 40, (1, 64, 10, 12), torch.float32, {0, 1})


def test_fake_outputs_match_real_ones():
    torch.manual_seed(0)
    steps = [make_step(16, 1, 4, None).float() for _ in range(2)]
    y = torch.randn(1, 16, 8, 8)
    flat = [t for step in steps for t in fused_step.flatten(step.params())]
    args = (2, 1, 4, 1, 0)  # steps, heads, block, halo, topk (dense)
    meta = lambda ts: [t.to("meta") if t is not None else None for t in ts]
    real = fused_body.body_fwd(y, flat, *args)
    fake = fused_body._body_fwd_fake(y.to("meta"), meta(flat), *args)
    assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]
    saved = [y, real[0], *real[2:]]
    grads = [None, torch.randn_like(y)]
    real_b = fused_body.body_bwd(grads, saved, flat, *args)
    fake_b = fused_body._body_bwd_fake(meta(grads), meta(saved), meta(flat), *args)
    assert [(t.shape, t.dtype) for t in real_b] == [(t.shape, t.dtype) for t in fake_b]


def test_model_runs_steps_as_one_op_unless_a_step_must_run_as_a_module(monkeypatch):
    """Training with a fused backend ("auto": the reference on this CPU) the model calls
    the body op once; a hook on a step, or a patched forward (activation checkpointing's),
    makes the steps run one by one as modules, the hook called; backend "torch",
    inference (no autograd) and frozen weights too."""
    calls = []
    body = ops.ssrem_body
    monkeypatch.setattr(ops, "ssrem_body", lambda *a, **k: calls.append(1) or body(*a, **k))
    model = ssiu.build(2, channels=16, heads=1, steps=3).set_backend("auto")
    x = torch.rand(1, 3, 16, 16)
    out = model(x)
    assert calls == [1]
    seen = []
    hook = model.steps[1].register_forward_hook(lambda *args: seen.append(1))
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    assert calls == [1] and seen == [1]
    hook.remove()
    training.set_activation_checkpointing(model, True)
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    training.set_activation_checkpointing(model, False)
    torch.testing.assert_close(model.set_backend("torch")(x), out, rtol=0, atol=0)
    assert calls == [1]
    with torch.no_grad():  # inference: step by step, each step's saved tensors freed
        torch.testing.assert_close(model.set_backend("auto")(x), out, rtol=0, atol=0)
    assert calls == [1]
    model.requires_grad_(False)  # nothing to differentiate: step by step too
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    assert calls == [1]
    model.requires_grad_(True)
    model(x)
    assert calls == [1, 1]


def test_backends_and_bad_input():
    steps = [make_step(32, 2, 4, None).float() for _ in range(2)]
    y = torch.randn(1, 32, 8, 8)
    params = [step.params() for step in steps]
    expected = ops.ssrem_body_reference(y, params, steps[0].geometry())
    for out, ref in zip(ops.ssrem_body(y, params, steps[0].geometry(), backend="auto"),
                        expected, strict=True):  # fmt: skip
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="at least one step"):
        ops.ssrem_body(y, [], steps[0].geometry())
    with pytest.raises(ValueError, match=r"norm_weight has shape \(32,\), expected \(16,\)"):
        ops.ssrem_body(y[:, :16], params, steps[0].geometry())


@pytest.mark.slow
def test_compiled_fused_body_has_no_graph_break():
    """torch.compile(fullgraph=True) traces the body op forward and backward (aot_eager)
    to the eager results exactly."""
    torch.manual_seed(0)
    steps = [make_step(32, 2, 4, 10).float() for _ in range(2)]
    y = torch.randn(1, 32, 8, 10, requires_grad=True)
    geometry = steps[0].geometry()

    def body(y):
        outs = ops.ssrem_body(y, [s.params() for s in steps], geometry, backend="triton")
        return outs[0].square().sum() + outs[1].abs().sum()

    torch._dynamo.reset()
    compiled = torch.compile(body, fullgraph=True, backend="aot_eager", dynamic=False)
    leaves = [y] + [p for s in steps for p in s.parameters()]
    grads_c = torch.autograd.grad(compiled(y), leaves)
    grads_e = torch.autograd.grad(body(y), leaves)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=0, atol=0)

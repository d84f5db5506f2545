"""The whole network with the fused step LN and MSGMs against the float64 reference.

Only the LayerNorm2d and MSGM modules are switched to "triton" here; ESAM and MoE-FS
keep their reference (their fused kernels have their own tests), so a mismatch points
at LN/MSGM.
"""

from __future__ import annotations

import pytest
import torch

import ssiu
import ssiu.modules
from ssiu.modules import MSGM, LayerNorm2d
from ssiu.testing import assert_model_matches_float64

pytestmark = pytest.mark.interpreter

TINY = dict(channels=16, heads=2, steps=3)


def test_tiny_config_is_valid():
    config = ssiu.SSIUConfig(scale=2, **TINY)
    assert config.head_dim == 8 and config.steps == 3


@pytest.mark.slow
def test_triton_backend_matches_float64_reference():
    model = ssiu.build(2, **TINY)
    # Perturb LN affine terms so their gradients are not the identity's.
    with torch.no_grad():
        for step in model.steps:
            step.norm.weight.add_(0.2 * torch.randn_like(step.norm.weight))
            step.norm.bias.add_(0.2 * torch.randn_like(step.norm.bias))
    # ESAM and MoE-FS stay on the reference, so a mismatch points at the LN/MSGM ops.
    assert_model_matches_float64(model, torch.rand(1, 3, 16, 16), fused=(MSGM, LayerNorm2d))


def test_switching_backend_changes_no_state():
    model = ssiu.build(2, **TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_backend("triton")
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_compiled_step_has_no_graph_break():
    """One SS-ReM step (fused LN + 4 MSGMs, reference ESAM) under torch.compile(fullgraph).

    backend="aot_eager" traces forward and backward through the custom ops exactly as
    Inductor would see them, without the C++ compile time on a small CPU.
    """
    torch._dynamo.reset()
    step = ssiu.modules.SSReMStep(ssiu.SSIUConfig(scale=2, **TINY))
    for module in step.modules():
        if isinstance(module, (MSGM, LayerNorm2d)):
            module.backend = "triton"
    a = torch.randn(1, 16, 16, 16, requires_grad=True)
    y = torch.randn(1, 16, 16, 16, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=1):
        out_c = compiled(a, y)
    leaves = [a, y, *step.parameters()]
    grads_c = torch.autograd.grad(out_c.square().sum(), leaves)
    out_e = step(a, y)
    grads_e = torch.autograd.grad(out_e.square().sum(), leaves)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)

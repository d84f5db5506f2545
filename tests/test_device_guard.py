"""Fused ops launch on their tensors' device and refuse tensors spread over several;
they accept exactly the compile-checked channel widths (kernels.common.SUPPORTED_CHANNELS).

Without a GPU the guard's use is observed by replacing it with a recorder.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

pytest.importorskip("triton")

from ssiu.kernels import common  # noqa: E402

from ssiu.ops import fused, fused_esam, fused_moe, fused_tail  # noqa: E402


@pytest.fixture
def guarded(monkeypatch):
    """The devices the fused ops' guard is entered with."""
    seen = []

    def record(device):
        seen.append(device)
        return contextlib.nullcontext()

    monkeypatch.setattr(common, "device_guard", record)
    return seen


def test_custom_op_runs_under_the_guard_of_its_tensors_device(guarded):
    x = torch.randn(1, 16, 3, 5)
    w, b = torch.randn(16), torch.randn(16)
    y = fused.layer_norm2d(x, w, b, 1e-6)
    assert guarded == [x.device]
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (16,), w, b, 1e-6)
    torch.testing.assert_close(y, ref.permute(0, 3, 1, 2), atol=1e-5, rtol=1e-4)


def test_guard_of_a_cuda_tensor_selects_its_device():
    # Constructing torch.cuda.device needs no GPU; entering it would.
    guard = common.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(common.device_guard(torch.device("cpu")), contextlib.nullcontext)


def test_tensors_on_several_devices_are_refused():
    x = torch.randn(1, 16, 3, 5)
    meta = torch.randn(16, device="meta")
    with pytest.raises(ValueError, match="different devices: cpu, meta"):
        common.tensors_device(x, [torch.randn(16), meta])

    @common.on_tensor_device
    def implementation(x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        return x

    with pytest.raises(ValueError, match="different devices"):
        implementation(x, [meta])
    assert implementation(x, params=[x]) is x
    assert common.tensors_device(x, 3, [x[0]]) == x.device
    assert common.tensors_device(1.0) is None


@pytest.mark.parametrize("c", [8, 24, 48, 128, 256])
def test_unchecked_widths_are_refused(c):
    x = torch.zeros(1, c, 8, 8, device="meta")
    assert isinstance(fused.msgm_unsupported(x), ValueError)
    assert isinstance(fused.layer_norm2d_unsupported(x), ValueError)
    assert isinstance(fused_moe.unsupported((x, x, x), None), ValueError)
    assert isinstance(fused_tail.unsupported(x, (2, 2)), ValueError)
    assert isinstance(fused_esam.unsupported(x, max(c // 16, 1), 8, 1), ValueError)


@pytest.mark.parametrize("c", common.SUPPORTED_CHANNELS)
def test_checked_widths_are_accepted(c):
    x = torch.zeros(1, c, 8, 8, device="meta")
    assert fused.msgm_unsupported(x) is None
    assert fused.layer_norm2d_unsupported(x) is None
    assert fused_moe.unsupported((x, x, x), None) is None
    assert fused_tail.unsupported(x, (2, 2)) is None
    assert fused_esam.unsupported(x, c // 16, 8, 1) is None


def test_auto_falls_back_and_triton_raises_at_an_unchecked_width():
    from ssiu.ops import layer_norm2d
    from ssiu.ops.backend import resolve

    on_cuda = types.SimpleNamespace(is_cuda=True)  # what resolve reads of the tensor
    for c, backend in ((128, "torch"), (64, "triton")):
        why = fused.layer_norm2d_unsupported(torch.zeros(1, c, 4, 4, device="meta"))
        assert resolve("auto", on_cuda, lambda why=why: why) == backend
    x = torch.randn(1, 128, 4, 4)
    w, b = torch.ones(128), torch.zeros(128)
    with pytest.raises(ValueError, match="compile-checked"):
        layer_norm2d(x, w, b, backend="triton")

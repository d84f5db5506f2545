"""Parity toolkit for the fused kernels: tolerances, poisoned outputs, verbose comparison.

Kernels are checked against their `*_reference` evaluated in float64 on the same
(rounded) inputs. An element passes when

    |actual - reference| <= atol * scale + rtol * |reference|,   scale = max(1, max |reference|)

so `atol` is relative to the magnitude of the whole tensor (weight gradients are sums
over all pixels and grow with the image), `rtol` to each element.

| dtype | atol | rtol | why |
|---|---|---|---|
| float64 | 1e-10 | 1e-10 | a float64 kernel run is the reference up to summation order |
| float32 | 1e-5 | 1e-4 | CPU (interpreter): every fp32 dot exact; chained 1x1s |
| float32 on CUDA | 5e-3 | 1e-2 | fp32 dots run on tensor cores (3xTF32 forward, TF32 backward) |
| float16 | 5e-3 | 1e-2 | 10-bit mantissa, intermediates re-rounded before each tl.dot |
| bfloat16 | 4e-2 | 5e-2 | 7-bit mantissa: about as far from float64 as the bf16 eager reference |
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator

import torch

TOLERANCES: dict[torch.dtype | str, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4),
    # fp32 on a GPU: TF32 has fp16's 10-bit mantissa, so fp16's tolerance.
    "tf32": (5e-3, 1e-2),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (4e-2, 5e-2),
}

POISON_ENV = "SSIU_POISON_EMPTY"


def tolerance(dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(atol, rtol) for a kernel computing in `dtype` on `device`, against float64."""
    if dtype == torch.float32 and torch.device(device).type == "cuda":
        return TOLERANCES["tf32"]
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance for {dtype}; known: {list(TOLERANCES)}") from None


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN in place (an unwritten element then shows)."""
    return tensor.fill_(float("nan"))


@contextlib.contextmanager
def poison_empty(enabled: bool = True) -> Iterator[None]:
    """Within the block, every buffer the kernel launchers allocate starts as NaN.

    The launchers (`ssiu.kernels.common.empty`) read SSIU_POISON_EMPTY at each call; the
    test suite sets it for every test (tests/conftest.py).
    """
    old = os.environ.get(POISON_ENV)
    os.environ[POISON_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(POISON_ENV, None)
        else:
            os.environ[POISON_ENV] = old


def assert_close_to_reference(
    actual: torch.Tensor,
    reference: torch.Tensor,
    dtype: torch.dtype,
    name: str,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    show: int = 5,
) -> None:
    """Assert `actual` (computed in `dtype`) matches the float64 `reference`.

    On failure the message says how many elements mismatch, the worst absolute and
    relative errors with their indices and values, and the first few mismatches. NaN in
    `actual` (e.g. a poisoned element never written) always fails.
    """
    if actual.shape != reference.shape:
        shapes = f"{tuple(actual.shape)} != reference {tuple(reference.shape)}"
        raise AssertionError(f"{name}: shape {shapes}")
    default_atol, default_rtol = tolerance(dtype, actual.device)
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    a = actual.detach().to(torch.float64).cpu()
    r = reference.detach().to(torch.float64).cpu()
    scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
    err = (a - r).abs()
    bad = ~(err <= atol * scale + rtol * r.abs())  # NaN compares False, so counts as bad
    count = int(bad.sum())
    if count == 0:
        return
    err_nan = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    rel = err_nan / r.abs().clamp_min(1e-30)
    worst_abs = _unravel(int(err_nan.argmax()), r.shape)
    worst_rel = _unravel(int(rel.argmax()), r.shape)
    lines = [
        f"{name} ({dtype}): {count} of {r.numel()} elements differ from the float64 reference "
        f"(atol={atol:g} x scale {scale:.3g}, rtol={rtol:g}); "
        f"{int(torch.isnan(a).sum())} NaN in the result",
        f"  max abs error {err_nan[worst_abs].item():.4g} at {worst_abs}: "
        f"got {a[worst_abs].item():.6g}, expected {r[worst_abs].item():.6g}",
        f"  max rel error {rel[worst_rel].item():.4g} at {worst_rel}: "
        f"got {a[worst_rel].item():.6g}, expected {r[worst_rel].item():.6g}",
    ]
    for flat in bad.flatten().nonzero().flatten()[:show].tolist():
        idx = _unravel(flat, r.shape)
        lines.append(f"  at {idx}: got {a[idx].item():.6g}, expected {r[idx].item():.6g}")
    raise AssertionError("\n".join(lines))


def _unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    idx = []
    for size in reversed(shape):
        idx.append(flat % size)
        flat //= size
    return tuple(reversed(idx))


def output_and_grads(model: torch.nn.Module, x: torch.Tensor):
    """(output, {"input": dx, name: dparam, ...}) for a fixed ramp output gradient."""
    x = x.detach().requires_grad_()
    out = model(x)
    dout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    names, params = zip(*model.named_parameters(), strict=True)
    grads = torch.autograd.grad(out, (x, *params), dout)
    return out, dict(zip(("input", *names), grads, strict=True))


def assert_model_matches_float64(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    fused: tuple[type, ...] | None = None,
    grad_atol: float | None = None,
    grad_rtol: float = 1e-3,
) -> None:
    """`model` in fp32 with fused ops against a float64 copy on the reference backend.

    fused: the module types switched to backend "triton" (None: every module). Compares
    the output and the gradient of the input and of every parameter. Gradients get a
    looser rtol by default: fp32 error compounds through the steps of the network.
    """
    reference = copy.deepcopy(model).double().set_backend("torch")
    ref_out, ref_grads = output_and_grads(reference, x.double())
    model.set_backend("torch" if fused is not None else "triton")
    for module in model.modules():
        if fused is not None and isinstance(module, fused):
            module.backend = "triton"
    out, grads = output_and_grads(model, x.float())
    assert set(grads) == set(ref_grads)
    assert_close_to_reference(out, ref_out, torch.float32, "output")
    for name, g in grads.items():
        assert_close_to_reference(
            g, ref_grads[name], torch.float32, f"d{name}", atol=grad_atol, rtol=grad_rtol
        )

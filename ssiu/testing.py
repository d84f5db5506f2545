"""Parity toolkit for the fused kernels: one tolerance model, poisoned outputs, verbose report.

Kernels are checked against their `*_reference` evaluated in float64 on the same inputs
(already rounded to the kernel's dtype). The bound depends on the precision MODE of the
computation, which is the dtype, and for fp32 the dot precision the kernel compiles on a
GPU ("ieee", "tf32", "tf32x3"; the interpreter's fp32 dots are exact, so CPU is "ieee").
With u the mode's unit roundoff and rms = sqrt(mean(ref**2)), a result passes when

    ||out - ref|| / ||ref||  <= NORM * u                  (relative norm error), and
    |out - ref|              <= ELEM * u * |ref| + FLOOR * u * rms   (every element).

No bound scales with the largest value: a 1% error on half of the elements fails fp32,
TF32 and fp16 alike, however large the biggest element is. NaN never passes.

| mode | used for | u | norm bound | per element |
|---|---|---|---|---|
| float64 | a float64 kernel run | 2^-53 | 3.6e-15 | 3.6e-15 |ref| + 1.4e-14 rms |
| ieee | fp32 on CPU; IEEE dots (LN, attention) | 2^-24 | 1.9e-06 | 1.9e-06 |ref| + 7.6e-06 rms |
| tf32x3 | fp32 forward 1x1 dots on a GPU | 2^-21 | 1.5e-05 | 1.5e-05 |ref| + 6.1e-05 rms |
| tf32 | fp32 backward 1x1 dots on a GPU | 2^-11 | 3.9e-03 | 3.9e-03 |ref| + 1.6e-02 rms |
| fp16 | float16 | 2^-11 | 3.9e-03 | 3.9e-03 |ref| + 1.6e-02 rms |
| bf16 | bfloat16 | 2^-8 | 3.1e-02 | 3.1e-02 |ref| + 1.2e-01 rms |

(norm, elem, floor) = (32, 32, 128) u in the fp32-like modes, where long fp32 sums
dominate, and (8, 8, 32) u in the 11- and 8-bit ones; tf32x3 keeps about 21 of fp32's
24 bits. The factors are set so that the fused ops pass with margin at unit scale
(weights of std 1/sqrt(fan_in), O(1) activations, like a trained network) and so that
every planted bug of tests/mutants.py fails; tests/test_precision_emulation.py checks the GPU modes
(tf32, tf32x3, bf16) on CPU by rounding the dot operands of the float64 reference.
`OP_PRECISION` lists the dot precision of each fused kernel on a GPU (from the kernels'
configs); `precision_mode` turns (dtype, device, op precision) into a mode.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterator

import torch


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Bounds of one precision mode, in units of its unit roundoff `u`."""

    u: float  # unit roundoff: half the spacing of the format's numbers near 1
    norm: float  # ||out - ref|| / ||ref|| <= norm * u
    elem: float  # per element, relative part: elem * u * |ref|
    floor: float  # per element, absolute part: floor * u * rms(ref)

    @property
    def norm_bound(self) -> float:
        return self.norm * self.u

    def element_bound(self, reference: torch.Tensor, rms: float) -> torch.Tensor:
        return self.elem * self.u * reference.abs() + self.floor * self.u * rms


# One row per precision mode (module docstring). In the fp32-like modes the error is the
# rounding of long fp32 sums (weight gradients add up every pixel), many u; in the 8- and
# 11-bit modes it is the rounding of each dot operand and stored intermediate (sums are
# fp32, far below their u), a few u. tf32x3 splits each fp32 operand into two TF32
# halves and drops the lo*lo product: about 21 good bits.
_WIDE = dict(norm=32.0, elem=32.0, floor=128.0)
_NARROW = dict(norm=8.0, elem=8.0, floor=32.0)
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(2.0**-53, **_WIDE),
    "ieee": Tolerance(2.0**-24, **_WIDE),
    "tf32x3": Tolerance(2.0**-21, **_WIDE),
    "tf32": Tolerance(2.0**-11, **_NARROW),
    "fp16": Tolerance(2.0**-11, **_NARROW),
    "bf16": Tolerance(2.0**-8, **_NARROW),
}

# Dot precision of each fused op's fp32 kernels on a GPU, (forward, backward): the loosest
# of the op's kernels, as their config functions choose it (kernels/*.py `*_config`;
# tests/test_op_precision.py checks this table against the registry). fp16/bf16 dots are
# native; LayerNorm has no dot; ESAM's attention dots are "ieee", its qkv 1x1 "tf32x3"
# forward, and the backward's 1x1 gradients TF32 at worst; the tail's final 3x3
# (tail_rgb) is TF32 both ways (tf32x3 spills there), so its output carries TF32 error.
OP_PRECISION: dict[str, tuple[str, str]] = {
    "layer_norm": ("ieee", "ieee"),
    "msgm": ("tf32x3", "tf32"),
    "esam": ("tf32x3", "tf32"),
    "moe_fs": ("tf32x3", "tf32"),
    "tail": ("tf32", "tf32"),
}

_DTYPE_MODE = {torch.float64: "float64", torch.float16: "fp16", torch.bfloat16: "bf16"}

POISON_ENV = "SSIU_POISON_EMPTY"


def precision_mode(
    dtype: torch.dtype, device: torch.device | str = "cpu", precision: str | None = None
) -> str:
    """The tolerance mode of a kernel computing in `dtype` on `device`.

    precision: the fp32 dot precision the kernel uses on a GPU ("ieee", "tf32", "tf32x3"),
    or an op and direction as "msgm.fwd" / "esam.bwd" (looked up in OP_PRECISION). It only
    matters for fp32 on CUDA: the interpreter's fp32 dots are exact ("ieee"). None on CUDA
    fp32 means "tf32", the loosest fp32 mode.
    """
    if dtype in _DTYPE_MODE:
        return _DTYPE_MODE[dtype]
    if dtype != torch.float32:
        raise ValueError(f"no tolerance for {dtype}; known: float64, float32, float16, bfloat16")
    if torch.device(device).type != "cuda":
        return "ieee"
    if precision is None:
        return "tf32"
    if "." in precision:
        op, direction = precision.split(".")
        return OP_PRECISION[op][direction == "bwd"]
    if precision not in ("ieee", "tf32", "tf32x3"):
        raise ValueError(f"unknown fp32 precision {precision!r}")
    return precision


def tolerance(
    dtype: torch.dtype, device: torch.device | str = "cpu", precision: str | None = None
) -> Tolerance:
    """The Tolerance row for a kernel computing in `dtype` on `device` (precision_mode)."""
    return TOLERANCES[precision_mode(dtype, device, precision)]


def relative_error(actual: torch.Tensor, reference: torch.Tensor, scale: float = 0.0) -> float:
    """||actual - reference|| / ||reference|| in float64 (inf if actual has NaN); ||reference||
    taken at least scale * sqrt(numel) (assert_close_to_reference)."""
    a = actual.detach().double().cpu()
    r = reference.detach().double().cpu()
    err = torch.linalg.vector_norm(a - r).item()
    norm = max(torch.linalg.vector_norm(r).item(), scale * r.numel() ** 0.5, 1e-300)
    return err / norm if err == err else float("inf")


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
    precision: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    scale: float = 0.0,
    show: int = 5,
) -> None:
    """Assert `actual` (computed in `dtype`) matches the float64 `reference`.

    The bound is the row of TOLERANCES for precision_mode(dtype, actual.device, precision)
    (module docstring). atol / rtol, where given, replace the per-element bound by
    atol * rms(ref) + rtol * |ref| and raise the norm bound to at least rtol: for a test
    that documents why it needs more. scale: the size of the terms that cancel to give
    `reference`, where that is far above its rms (a gradient that is exactly zero in
    float64 by symmetry, e.g. attention with one kept key): rms and ||ref|| are taken at
    least that large.

    On failure the message names the mode, the relative norm error against its bound, how
    many elements exceed theirs, the worst element (in units of its bound) and the first
    few mismatches. NaN in `actual` (e.g. a poisoned element never written) always fails.
    """
    if actual.shape != reference.shape:
        shapes = f"{tuple(actual.shape)} != reference {tuple(reference.shape)}"
        raise AssertionError(f"{name}: shape {shapes}")
    mode = precision_mode(dtype, actual.device, precision)
    tol = TOLERANCES[mode]
    a = actual.detach().to(torch.float64).cpu()
    r = reference.detach().to(torch.float64).cpu()
    if r.numel() == 0:
        return
    rms = max(r.square().mean().sqrt().item(), scale)
    bound = tol.element_bound(r, rms)
    norm_bound = tol.norm_bound
    if atol is not None or rtol is not None:
        bound = (atol or 0.0) * rms + (rtol or 0.0) * r.abs()
        norm_bound = max(norm_bound, rtol or 0.0)
    err = (a - r).abs()
    bad = ~(err <= bound)  # NaN compares False, so counts as bad
    rel = relative_error(a, r, scale)
    count = int(bad.sum())
    _log(name, dtype, mode, rel, err, r, rms)
    if count == 0 and rel <= norm_bound:
        return
    err_nan = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
    ratio = err_nan / bound.clamp_min(1e-300)
    worst = _unravel(int(ratio.argmax()), r.shape)
    lines = [
        f"{name} ({dtype}, mode {mode}): relative norm error {rel:.3g} "
        f"(bound {norm_bound:.3g}); {count} of {r.numel()} elements over their bound "
        f"({tol.elem:g}u|ref| + {tol.floor:g}u rms, u={tol.u:.3g}, rms={rms:.3g}); "
        f"{int(torch.isnan(a).sum())} NaN in the result",
        f"  worst at {worst}: got {a[worst].item():.6g}, expected {r[worst].item():.6g}, "
        f"error {err_nan[worst].item():.3g} = {ratio[worst].item():.3g} x its bound",
    ]
    for flat in bad.flatten().nonzero().flatten()[:show].tolist():
        idx = _unravel(flat, r.shape)
        lines.append(f"  at {idx}: got {a[idx].item():.6g}, expected {r[idx].item():.6g}")
    raise AssertionError("\n".join(lines))


def error_ratios(
    actual: torch.Tensor, reference: torch.Tensor, mode: str, scale: float = 0.0
) -> tuple[float, float]:
    """(relative norm error / its bound, max over elements of |error| / its bound) for the
    mode's row of TOLERANCES: both <= 1 passes; <= 0.5 passes with a margin of 2."""
    tol = TOLERANCES[mode]
    a = actual.detach().to(torch.float64).cpu()
    r = reference.detach().to(torch.float64).cpu()
    rms = max(r.square().mean().sqrt().item(), scale)
    elem = ((a - r).abs() / tol.element_bound(r, rms).clamp_min(1e-300)).max().item()
    return relative_error(a, r, scale) / tol.norm_bound, elem


def _log(name, dtype, mode, rel, err, reference, rms) -> None:
    """With SSIU_TOLERANCE_LOG=path, append each check's errors in units of its mode's u:
    the relative norm error / u and max |err| / (u (|ref| + 4 rms)) (used to set the
    factors; README "Tolerances")."""
    path = os.environ.get("SSIU_TOLERANCE_LOG")
    if not path:
        return
    u = TOLERANCES[mode].u
    elem = (err / (u * (reference.abs() + 4 * rms)).clamp_min(1e-300)).max().item()
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    with open(path, "a") as f:
        f.write(f"{test}\t{name}\t{dtype}\t{mode}\t{rel / u:.4g}\t{elem:.4g}\n")


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
    grad_rtol: float | None = None,
    grad_scale: dict[str, float] | None = None,
) -> None:
    """`model` in fp32 with fused ops against a float64 copy on the reference backend.

    fused: the module types switched to backend "triton" (None: every module). Compares
    the output and the gradient of the input and of every parameter with the fp32 row of
    the tolerance table; grad_atol / grad_rtol override it for the gradients, grad_scale
    gives the `scale` of named gradients that are zero in float64 by cancellation
    (assert_close_to_reference).
    """
    reference = copy.deepcopy(model).double().set_backend("torch")
    ref_out, ref_grads = output_and_grads(reference, x.double())
    model.set_backend("torch" if fused is not None else "triton")
    for module in model.modules():
        if fused is not None and isinstance(module, fused):
            module.backend = "triton"
    out, grads = output_and_grads(model, x.float())
    assert set(grads) == set(ref_grads)
    assert_close_to_reference(out, ref_out, torch.float32, "output", precision="tf32x3")
    for name, g in grads.items():
        assert_close_to_reference(g, ref_grads[name], torch.float32, f"d{name}", precision="tf32",
                                  atol=grad_atol, rtol=grad_rtol,
                                  scale=(grad_scale or {}).get(name, 0.0))  # fmt: skip


# ---- GPU precision emulation on CPU ----------------------------------------------------


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """t rounded to TF32 (fp32 with a 10-bit mantissa, round to nearest even), as float64."""
    bits = t.float().view(torch.int32)
    lsb = (bits >> 13) & 1  # the last kept bit, for ties to even
    bits = ((bits + 0xFFF + lsb) >> 13) << 13  # arithmetic shift keeps the sign
    return bits.view(torch.float32).double()


_ROUND = {
    "ieee": lambda t: t.float().double(),
    "tf32": round_tf32,
    "fp16": lambda t: t.half().double(),
    "bf16": lambda t: t.bfloat16().double(),
}


class DotRounding(torch.utils._python_dispatch.TorchDispatchMode):
    """Runs float64 dense convolutions with their operands rounded as a GPU dot would.

    fwd / bwd: the mode of the forward convolutions and of the backward's
    (convolution_backward): "ieee", "tf32", "tf32x3" (hi*hi + hi*lo + lo*hi of the TF32
    split, forward only), "fp16" or "bf16". Depthwise convolutions (groups > 1) are FMA
    loops in the kernels, so stay exact; accumulation is float64 (the kernels' fp32
    accumulation is far below these modes' rounding). matmuls too when `matmuls` (the
    16-bit attention dots; ESAM's fp32 attention is IEEE).
    """

    def __init__(self, fwd: str, bwd: str | None = None, matmuls: bool = False):
        super().__init__()
        self.fwd, self.bwd, self.matmuls = fwd, bwd or fwd, matmuls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten.convolution.default and args[8] == 1:
            return self._bilinear(func, args, kwargs, (0, 1), self.fwd)
        if func is aten.convolution_backward.default and args[9] == 1:
            rounded = [_ROUND[self.bwd](a) if i in (0, 1, 2) else a for i, a in enumerate(args)]
            return func(*rounded, **kwargs)
        if self.matmuls and func in (aten.mm.default, aten.bmm.default):
            return self._bilinear(func, args, kwargs, (0, 1), self.fwd)
        return func(*args, **kwargs)

    @staticmethod
    def _bilinear(func, args, kwargs, operands, mode):
        a, b = (args[i] for i in operands)
        if a.dtype != torch.float64:
            return func(*args, **kwargs)
        with_ = lambda x, y, keep_bias=True: func(
            *[x if i == operands[0] else y if i == operands[1] else
              (arg if keep_bias or i != 2 else None) for i, arg in enumerate(args)],
            **kwargs,
        )  # fmt: skip
        if mode != "tf32x3":
            return with_(_ROUND[mode](a), _ROUND[mode](b))
        a_hi, b_hi = round_tf32(a), round_tf32(b)
        a_lo, b_lo = round_tf32(a - a_hi), round_tf32(b - b_hi)
        return with_(a_hi, b_hi) + with_(a_hi, b_lo, False) + with_(a_lo, b_hi, False)

"""End-to-end rows: a whole x4 training step and a whole x4 inference, per provider.

"train_step_x4": Adam step on an L1 loss of the released model (9 steps, 64 channels),
batch 40 of 64x64 LR patches, bf16 autocast on CUDA (fp32 weights, as `ssiu train
--amp`; any bf16/fp16 --dtype autocasts), fp32 on CPU; reported as images/s and the
peak memory of a step.
"inference_x4": one 3x180x320 LR image to 3x720x1280, `torch.inference_mode`, bf16
autocast on CUDA; reported as latency.

Providers as for the ops: the reference model ("eager"), `torch.compile` of it
("compile"), `set_backend("triton")` ("fused") and `torch.compile` of that
("fused+compile"). Before timing, the provider's output (and, for the training step,
every weight gradient of one step) is compared with the float64 reference model on the
same weights and the first CHECK_BATCH images; a provider further from it than
max(2 x the eager run's error, the dtype's floor) gets a "mismatch" row and no time.
The baseline "compile" (torch.compile of the reference, not this package's code) is timed
even outside that bound: the row keeps its error and bound (max_rel_err > tolerance) and
the report lists it under "Timed outside the bound" (on the H200, its bf16 rel_w gradient
was 2.6x eager's error: a bound of 2x would have left the comparison unmeasured).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from ssiu.benchmark import harness
from ssiu.flops import count_flops
from ssiu.model import build

SCALE = 4
# preset -> {row name: (batch, LR height, LR width)}
SHAPES = {
    "train": {"train_step_x4": (40, 64, 64)},
    "infer": {"inference_x4": (1, 180, 320)},
    "quick": {"train_step_x4": (2, 16, 16), "inference_x4": (1, 24, 32)},
}
MODE = {"train_step_x4": "train", "inference_x4": "infer"}
CHECK_BATCH = 4


def _autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16: autocast (fp32 weights, as `ssiu train --amp`); fp32/fp64: as is."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def _images(batch, h, w, device):
    gen = torch.Generator(device="cpu").manual_seed(0)
    lr = torch.rand(batch, 3, h, w, generator=gen, dtype=torch.float64)
    hr = torch.rand(batch, 3, h * SCALE, w * SCALE, generator=gen, dtype=torch.float64)
    return lr.to(device), hr.to(device)


def _model_for(provider: str, base: torch.nn.Module):
    model = copy.deepcopy(base).set_backend("triton" if "fused" in provider else "torch")
    # dynamic=False: every row has its own fixed shape. (torch 2.13 CPU: the automatic
    # dynamic-shape recompile of the model, after a first shape, fails in inductor with
    # "TensorReferenceAnalysis has no attribute python_mod".)
    return torch.compile(model, dynamic=False) if "compile" in provider else model


def _forward_and_grads(model, lr, hr, kind, device, dtype, params):
    """Output (float64) and, for the training step, the weight gradients of one L1 loss."""
    if kind == "infer":
        with torch.inference_mode(), _autocast(device, dtype):
            return [model(lr).double()]
    with _autocast(device, dtype):
        out = model(lr)
        loss = F.l1_loss(out.float(), hr.float())
    grads = torch.autograd.grad(loss, params)
    return [out.double().detach()] + [g.double() for g in grads]


def _check(base, provider, lr, hr, kind, device, dtype):
    ref = copy.deepcopy(base).double().set_backend("torch")
    expected = _forward_and_grads(ref, lr.double(), hr.double(), kind, device, torch.float64,
                                  list(ref.parameters()))  # fmt: skip

    def errors(model):
        params = [p for p in model.parameters()] if kind == "train" else []
        got = _forward_and_grads(model, lr, hr, kind, device, dtype, params)
        return [harness.max_rel_error(g, e)[0] for g, e in zip(got, expected, strict=True)]

    eager = errors(_model_for("eager", base))
    mine = errors(_model_for(provider, base))
    names = ["output"] + [f"grad {n}" for n, _ in base.named_parameters()] * (kind == "train")
    worst, worst_tol = 0.0, 0.0
    for name, err, eager_err in zip(names, mine, eager, strict=True):
        tol = max(2.0 * eager_err, harness.TOLERANCE_FLOOR.get(dtype, 1e-2))
        if not err <= tol:
            return f"mismatch: {name} max rel err {err:.3g} > tol {tol:.3g} " \
                   f"(eager reference {eager_err:.3g} vs float64)", err, tol  # fmt: skip
        if err >= worst:
            worst, worst_tol = err, tol
    return "ok", worst, worst_tol


def _bytes(base, batch, h, w, kind, dtype) -> int:
    """Images in and out once, weights read once; a training step also reads the target,
    writes the weight gradients and reads/writes the weights and Adam's two moments."""
    elem = torch.empty((), dtype=dtype).element_size()
    images = batch * 3 * h * w * elem + batch * 3 * h * w * SCALE**2 * elem
    weights = sum(p.numel() for p in base.parameters()) * 4  # fp32 weights
    if kind == "infer":
        return images + weights
    return images + batch * 3 * h * w * SCALE**2 * elem + weights * (1 + 1 + 6)


def prepare_e2e(name, batch, h, w, provider, *, device, dtype, preset=None, skip=None):
    """(row without times, call or None): checks the provider, then builds the call to time
    (one training step or one inference). The row's status says why there is no call."""
    kind = MODE[name]
    device = torch.device(device)
    row = {field: None for field in harness.FIELDS}
    row.update(harness.environment_stamp(device))
    row.update(op=name, shape=f"{batch}x3x{h}x{w}", dtype=str(dtype).removeprefix("torch."),
               provider=provider, mode=kind, preset=preset, status="ok")  # fmt: skip
    torch.manual_seed(0)
    base = build(SCALE).to(device)
    flops = count_flops(base.config, h, w).flops * batch * (3 if kind == "train" else 1)
    row.update(flops=flops, bytes_moved=_bytes(base, batch, h, w, kind, dtype))
    why_not = skip or harness.PROVIDERS[provider].unavailable(device)
    if why_not:
        row["status"] = why_not
        return row, None
    lr, hr = (t.float() for t in _images(batch, h, w, device))  # fp32 in; autocast below
    try:
        # Parity on the first CHECK_BATCH images: enough to catch a wrong kernel, and the
        # float64 reference of a batch of 40 would need several times the step's memory.
        n = CHECK_BATCH
        status, err, tol = _check(base, provider, lr[:n], hr[:n], kind, device, dtype)
        row.update(status=status, max_rel_err=err, tolerance=tol)
        if status != "ok" and provider == "compile" and status.startswith("mismatch"):
            row["status"] = "ok"  # a baseline: timed, its error kept in the row
        elif status != "ok":
            return row, None
        model = _model_for(provider, base)
        if kind == "infer":

            def call():
                with torch.inference_mode(), _autocast(device, dtype):
                    return model(lr)

        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)

            def call():
                opt.zero_grad(set_to_none=True)
                with _autocast(device, dtype):
                    loss = F.l1_loss(model(lr).float(), hr)
                loss.backward()
                opt.step()

        call()  # the first call compiles / autotunes / allocates Adam's state
    except Exception as e:  # a provider that cannot run here gets a row that says so
        row["status"] = harness.error_status(e)
        return row, None
    return row, call


def measure_e2e(name, batch, h, w, provider, *, device, dtype, reps=20, warmup=3, rates=None,
                preset=None, skip=None) -> dict:  # fmt: skip
    """One end-to-end row: check, peak memory (CUDA), time, images/s, roofline."""
    device = torch.device(device)
    row, call = prepare_e2e(name, batch, h, w, provider, device=device, dtype=dtype,
                            preset=preset, skip=skip)  # fmt: skip
    if call is None:
        return row
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            call()
            torch.cuda.synchronize(device)
            row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
        row.update(harness.time_call(call, device, reps=reps, warmup=warmup))
    except Exception as e:
        row["status"] = harness.error_status(e)
        return row
    row["images_per_s"] = batch / (row["median_ms"] * 1e-3)
    row["gbps"], row["copy_bw_fraction"] = harness.achieved_bandwidth(
        row["bytes_moved"], row["median_ms"], "", rates.get("copy_bw") if rates else None
    )
    if rates:
        row.update(harness.roofline(row["bytes_moved"], row["flops"], row["median_ms"], rates))
    return row
